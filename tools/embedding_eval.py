"""Measure NF4 embeddings: file sizes, accuracy and speed of models with and without an NF4 embedding table.

Two jobs:

``python tools/embedding_eval.py minilm [--work-dir DIR]``
    all-MiniLM-L6-v2 (``tools/minilm.py``) in float32, NF4 with the word embedding left float (``MatMul``/``Gemm``
    only, as before NF4 lookups), NF4 by default (word embedding an NF4 lookup), the same with the position table
    too (``--embedding-min-rows 0``), and format ``com.microsoft`` run by stock onnxruntime: file bytes, cosine of
    the mean-pooled sentence embeddings vs float32 on the 24 sentences (mean / min), and ms per batch of the 24
    sentences (rounds interleaved between the models, median).

``python tools/embedding_eval.py llm FOLDER... --text FILE [--window 512] [--tokens 64]``
    onnxruntime-genai folders of one checkpoint: folder bytes, perplexity of ``FILE`` and greedy decode tokens/s.
    Perplexity: the text is tokenized with the folder's ``tokenizer.json`` (no special tokens), cut into
    consecutive windows of ``--window`` tokens; each window is one prefill with plain onnxruntime (empty past,
    mask of ones), every token but the first of a window is scored, ``exp(-mean log p)`` with a float64
    log-softmax of the logits. Decode: onnxruntime-genai generates ``--tokens`` tokens greedily after a fixed prompt
    (the text's first 32 tokens); tokens/s of the generation after the first token, median of rounds interleaved
    between the folders.

``python tools/embedding_eval.py lookup [--rows V] [--hidden H]``
    The lookup alone: ``Gather`` over a float32 table against ``GatherNF4`` over the same table (default block
    size), for a decode step (1 token) and a batch (24 x 16 tokens); microseconds per call, median of interleaved
    rounds, stock onnxruntime with 2 threads.

Timings depend on the machine's load: ``uptime`` is printed beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


# ----------------------------------------------------------------------------------------------------------------
# MiniLM


def minilm_job(work: Path, rounds: int) -> None:
    import minilm
    import onnxruntime as ort

    from onnx_nf4 import quantize_model
    from onnx_nf4.runtime import session_options

    work.mkdir(parents=True, exist_ok=True)
    fp32 = minilm.export_minilm(work / "minilm_fp32.onnx")
    variants = {
        "float32": (fp32, None),
        "NF4, MatMul only (embeddings float)": ({"embedding_min_rows": 1 << 40}, "onnx_nf4"),
        "NF4 (default: word embedding NF4)": ({}, "onnx_nf4"),
        "NF4 + position table (--embedding-min-rows 0)": ({"embedding_min_rows": 0}, "onnx_nf4"),
        "com.microsoft (default), stock onnxruntime": ({"format": "com.microsoft"}, "com.microsoft"),
    }
    inputs = minilm.encode()
    sessions, sizes = {}, {}
    for i, (name, (settings, fmt)) in enumerate(variants.items()):
        path = fp32 if fmt is None else work / f"minilm_{i}.onnx"
        if fmt is not None:
            _, report = quantize_model(fp32, path, **settings)
            print(f"{name}: {len(report.layers)} layers, tensors {report.tensor_bytes_before} -> "
                  f"{report.tensor_bytes_after} bytes, file {path.stat().st_size}")  # fmt: skip
        sizes[name] = path.stat().st_size
        options = session_options() if fmt == "onnx_nf4" else ort.SessionOptions()
        options.intra_op_num_threads = 2
        sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    mask = inputs["attention_mask"]
    reference = minilm.mean_pool(sessions["float32"].run(None, inputs)[0], mask)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, inputs)
            times[name].append(time.perf_counter() - start)
    print(f"\nall-MiniLM-L6-v2, 24 sentences; {uptime()}")
    print("| model | file | vs float32 | cosine mean / min | ms per batch (median of rounds) |")
    print("|---|---:|---:|---|---:|")
    for name, session in sessions.items():
        cos = minilm.cosine(minilm.mean_pool(session.run(None, inputs)[0], mask), reference)
        print(f"| {name} | {sizes[name] / 1e6:.1f} MB | {sizes[name] / sizes['float32']:.3f}x | "
              f"{cos.mean():.4f} / {cos.min():.4f} | {1e3 * statistics.median(times[name]):.1f} |")  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# The lookup alone


def lookup_job(rows: int, hidden: int, rounds: int) -> None:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from onnx_nf4 import quantize_model

    table = np.random.default_rng(0).standard_normal((rows, hidden)).astype(np.float32)
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", hidden])
    node = helper.make_node("Gather", ["E", "ids"], ["y"], name="embed")
    graph = helper.make_graph([node], "lookup", [ids], [out], [numpy_helper.from_array(table, "E")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    nf4, report = quantize_model(model, embedding_min_rows=0)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    sessions = {
        name: ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
        for name, m in (("float32 Gather", model), (f"GatherNF4 (block {report.table_block_size})", nf4))
    }
    print(f"table {rows} x {hidden}; {uptime()}")
    print("| lookup | 1 token (us) | 24 x 16 tokens (us) |")
    print("|---|---:|---:|")
    feeds = [np.array([[rows - 1]]), np.random.default_rng(1).integers(0, rows, (24, 16))]
    times = {name: [[], []] for name in sessions}
    for _ in range(rounds):
        for name, session in sessions.items():
            for i, ids in enumerate(feeds):
                start = time.perf_counter()
                for _ in range(20):
                    session.run(None, {"ids": ids})
                times[name][i].append((time.perf_counter() - start) / 20)
    for name in sessions:
        one, batch = (1e6 * statistics.median(t) for t in times[name])
        print(f"| {name} | {one:.1f} | {batch:.1f} |")


# ----------------------------------------------------------------------------------------------------------------
# LLM folders


def _tokens(folder: Path, text: str) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text, add_special_tokens=False).ids


def _session(folder: Path):
    import onnxruntime as ort

    config = json.loads((folder / "genai_config.json").read_text())
    decoder = config["model"]["decoder"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    library = decoder.get("session_options", {}).get("custom_ops_library")
    if library:
        options.register_custom_ops_library(str(folder / library))
    return ort.InferenceSession(str(folder / decoder["filename"]), options, providers=["CPUExecutionProvider"])


def perplexity(folder: Path, tokens: list[int], window: int) -> float:
    session = _session(folder)
    head_size = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]["head_size"]
    inputs = {value.name: value for value in session.get_inputs()}
    total, count = 0.0, 0
    for start in range(0, len(tokens), window):
        ids = np.array([tokens[start : start + window]], dtype=np.int64)
        if ids.shape[1] < 2:
            break
        feed = {"input_ids": ids}
        for name, value in inputs.items():
            if name == "attention_mask":
                feed[name] = np.ones_like(ids)
            elif name == "position_ids":
                feed[name] = np.arange(ids.shape[1], dtype=np.int64)[None]
            elif name.startswith("past_key_values"):
                dtype = np.float16 if "float16" in value.type else np.float32
                size = value.shape[3] if isinstance(value.shape[3], int) else head_size
                feed[name] = np.zeros((1, value.shape[1], 0, size), dtype=dtype)
        logits = session.run(["logits"], feed)[0][0].astype(np.float64)  # [w, vocab]
        shifted = logits[:-1] - logits[:-1].max(axis=-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        total += float(log_probs[np.arange(ids.shape[1] - 1), ids[0, 1:]].sum())
        count += ids.shape[1] - 1
    return float(np.exp(-total / count))


def decode_seconds(model, prompt: list[int], new_tokens: int) -> float:
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(prompt, dtype=np.int32))
    generator.generate_next_token()  # the prefill and first token are not timed
    start = time.perf_counter()
    produced = 0
    while not generator.is_done():
        generator.generate_next_token()
        produced += 1
    return (time.perf_counter() - start) / max(produced, 1)


def llm_job(folders: list[Path], text_file: Path, window: int, new_tokens: int, rounds: int) -> None:
    import onnxruntime_genai as og

    text = text_file.read_text(encoding="utf-8")
    tokens = _tokens(folders[0], text)
    print(f"text: {text_file} ({len(text)} characters, {len(tokens)} tokens), window {window}")
    results = {}
    for folder in folders:
        results[folder] = {"bytes": folder_bytes(folder), "ppl": perplexity(folder, tokens, window)}
        print(f"{folder}: {results[folder]}", flush=True)
    models = {folder: og.Model(str(folder)) for folder in folders}
    seconds: dict[Path, list[float]] = {folder: [] for folder in folders}
    for _ in range(rounds):
        for folder, model in models.items():
            seconds[folder].append(decode_seconds(model, tokens[:32], new_tokens))
    print(f"\n{uptime()}")
    print("| folder | bytes | perplexity | decode tok/s (median) |")
    print("|---|---:|---:|---:|")
    for folder in folders:
        tok_s = 1 / statistics.median(seconds[folder])
        print(f"| {folder} | {results[folder]['bytes'] / 1e6:.1f} MB | {results[folder]['ppl']:.4f} | {tok_s:.1f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="job", required=True)
    m = sub.add_parser("minilm")
    m.add_argument("--work-dir", type=Path, default=Path("embedding_eval_minilm"))
    m.add_argument("--rounds", type=int, default=20)
    lookup = sub.add_parser("lookup")
    lookup.add_argument("--rows", type=int, default=49152)
    lookup.add_argument("--hidden", type=int, default=576)
    lookup.add_argument("--rounds", type=int, default=30)
    llm = sub.add_parser("llm")
    llm.add_argument("folders", type=Path, nargs="+")
    llm.add_argument("--text", type=Path, required=True)
    llm.add_argument("--window", type=int, default=512)
    llm.add_argument("--tokens", type=int, default=64)
    llm.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.job == "minilm":
        minilm_job(args.work_dir, args.rounds)
    elif args.job == "lookup":
        lookup_job(args.rows, args.hidden, args.rounds)
    else:
        llm_job(args.folders, args.text, args.window, args.tokens, args.rounds)


if __name__ == "__main__":
    main()
