"""Perplexity of onnxruntime-genai LLM folders on a fixed English text, through plain onnxruntime.

The text is the Python documentation that every CPython ships (``pydoc_data.topics``: the language reference's
topics, in sorted order), so the number is reproducible offline. It is tokenized by the first folder's tokenizer
(``tokenizer.json``) and cut into ``--windows`` windows of ``--window`` tokens; each window is one prefill of the
folder's ``model.onnx`` (empty KV cache) in ``onnxruntime.InferenceSession`` (the op library registered), and every
position but the last predicts the next token. Perplexity = exp(mean negative log-likelihood over all predictions).

Usage: ``python tools/bench/llm_perplexity.py FOLDER [FOLDER ...] [--window 512] [--windows 8]``; e.g. the builder's
fp32 and int4 folders of ``tools/real_llm.py`` and ``onnx-nf4 quantize`` folders of the fp32 one.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import onnx_nf4


def text_tokens(folder: Path, count: int) -> list[int]:
    """The first ``count`` tokens of the text, tokenized by the folder's ``tokenizer.json``."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer

    text = "\n\n".join(topics[key] for key in sorted(topics))
    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids
    if len(ids) < count:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than {count}")
    return ids[:count]


def _session(folder: Path, threads: int):
    import onnxruntime as ort

    config = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    options = onnx_nf4.session_options(intra_op_num_threads=threads, inter_op_num_threads=1)
    return ort.InferenceSession(str(folder / config["filename"]), options, providers=["CPUExecutionProvider"]), config


def window_nll(session, config: dict, ids: Sequence[int]) -> np.ndarray:
    """Negative log-likelihood (nats) of tokens 1..T-1 of ``ids`` given the ones before, from one prefill."""
    T = len(ids)
    feeds: dict[str, np.ndarray] = {}
    kv_shape = (1, config["num_key_value_heads"], 0, config["head_size"])
    for inp in session.get_inputs():
        if inp.name == "input_ids":
            feeds[inp.name] = np.asarray(ids, dtype=np.int64)[None]
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones((1, T), dtype=np.int64)
        elif inp.name == "position_ids":
            feeds[inp.name] = np.arange(T, dtype=np.int64)[None]
        elif inp.name.startswith("past_key_values"):
            feeds[inp.name] = np.zeros(kv_shape, dtype=np.float16 if "float16" in inp.type else np.float32)
        else:
            raise ValueError(f"unexpected model input {inp.name!r}")
    logits = session.run(["logits"], feeds)[0][0, :-1].astype(np.float64)  # [T - 1, vocab]
    logits -= logits.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(logits).sum(axis=1))
    return log_z - logits[np.arange(T - 1), np.asarray(ids[1:])]


def perplexity(folder: Path, tokens: Sequence[int], window: int, threads: int) -> float:
    """exp(mean NLL) of the folder's model over the windows of ``tokens``."""
    session, config = _session(folder, threads)
    nll = [window_nll(session, config, tokens[i : i + window]) for i in range(0, len(tokens), window)]
    return math.exp(float(np.concatenate(nll).mean()))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="onnxruntime-genai folders")
    parser.add_argument("--window", type=int, default=512, help="tokens per prefill")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    tokens = text_tokens(args.folders[0], args.window * args.windows)
    print(f"{len(tokens)} tokens of pydoc_data.topics in {args.windows} windows of {args.window}")
    for folder in args.folders:
        print(f"{folder}: perplexity {perplexity(folder, tokens, args.window, args.threads):.3f}", flush=True)


if __name__ == "__main__":
    main()
