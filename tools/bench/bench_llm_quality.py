"""Quality of every quantization variant of a real LLM: perplexity, folder size, decode speed (docs/llm.md).

Needs a float genai folder of the checkpoint and the builder's int4 folder (e.g. ``/work/data/smollm2/
{builder_fp32,builder_int4}``, SmolLM2-135M-Instruct). Each NF4 variant is written once into ``--work`` from the
float folder with ``onnx-nf4 quantize`` (kept there: a second run reuses it), then for every folder:

* perplexity on ``--eval`` (:func:`onnx_nf4.genai.perplexity.perplexity`, windows of ``--window`` tokens, the
  first ``--max-tokens`` tokens of the text);
* for the folders named by ``--check``: the same perplexity computed directly (a feed built here, onnxruntime
  logits, numpy log-softmax in float64, the same windows) and the relative difference;
* the bytes of its model files (``.onnx`` and external data);
* with ``--decode-tokens N``: greedy decode speed in onnxruntime-genai (``tools/bench/bench_models.py``).

The GPTQ variants are calibrated on ``--calibration``, which must be a text disjoint from ``--eval``.

Usage: ``python tools/bench/bench_llm_quality.py --fp32 DIR --int4 DIR --work DIR --eval TEXT --calibration TEXT
[--variants rtn-b64,...] [--max-tokens 2048] [--check "builder fp32,rtn-b64"] [--decode-tokens 32]
[--json OUT.jsonl]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]

#: name -> ``onnx-nf4 quantize`` options (the calibration text is added to the gptq ones).
VARIANTS: dict[str, list[str]] = {
    "rtn-b64": ["--block-size", "64"],
    "rtn-b32": ["--block-size", "32"],
    "mse-b64": ["--block-size", "64", "--method", "mse"],
    "mse-b32": ["--block-size", "32", "--method", "mse"],
    "gptq-b64": ["--block-size", "64", "--method", "gptq", "--calibration-tokens", "2048"],
    "gptq-b32": ["--block-size", "32", "--method", "gptq", "--calibration-tokens", "2048"],
    "rtn-b64-lmhead-float": ["--block-size", "64", "--exclude", "lm_head"],
    "rtn-b64-table-b16": ["--block-size", "64", "--embedding-block-size", "16"],
}


def model_bytes(folder: Path) -> int:
    """Bytes of the folder's ONNX models and their external data (tokenizer, config and op library left out)."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".onnx", ".data"))


def quantize(fp32: Path, out: Path, options: list[str], calibration: Path) -> float:
    """Write variant ``out`` (unless it exists); returns the wall seconds it took (0 when reused)."""
    if out.exists():
        return 0.0
    if "gptq" in options:
        options = [*options, "--calibration", str(calibration)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "onnx_nf4", "quantize", str(fp32), str(out), "-q", *options],
                   check=True, env=env, stdout=subprocess.DEVNULL)  # fmt: skip
    return time.perf_counter() - start


def direct_perplexity(folder: Path, text: str, window: int, max_tokens: int) -> float:
    """Perplexity computed without :mod:`onnx_nf4.genai.perplexity`: the feed, the windows and the log-softmax."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    config = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    options = ort.SessionOptions()
    library = config.get("session_options", {}).get("custom_ops_library")
    if library:
        options.register_custom_ops_library(str(folder / library))
    session = ort.InferenceSession(str(folder / config["filename"]), options, providers=["CPUExecutionProvider"])
    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text, add_special_tokens=False).ids[:max_tokens]
    total, count = 0.0, 0
    for start in range(0, len(ids), window):
        part = np.array(ids[start : start + window], dtype=np.int64)
        if len(part) < 2:
            continue
        feed = {}
        for value in session.get_inputs():
            if value.name == "input_ids":
                feed[value.name] = part[None, :]
            elif value.name == "attention_mask":
                feed[value.name] = np.ones((1, len(part)), np.int64)
            elif value.name == "position_ids":
                feed[value.name] = np.arange(len(part), dtype=np.int64)[None, :]
            else:
                shape = (1, config["num_key_value_heads"], 0, config["head_size"])
                feed[value.name] = np.zeros(shape, np.float16 if "float16" in value.type else np.float32)
        logits = session.run(["logits"], feed)[0][0].astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        total -= float(log_softmax[np.arange(len(part) - 1), part[1:]].sum())
        count += len(part) - 1
    return math.exp(total / count)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fp32", type=Path, required=True)
    parser.add_argument("--int4", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--eval", type=Path, required=True)
    parser.add_argument("--calibration", type=Path, required=True)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--check", default="", help="comma-separated folders (variant names) to check directly")
    parser.add_argument("--no-builders", dest="builders", action="store_false", help="only the NF4 variants")
    parser.add_argument("--decode-tokens", type=int, default=0)
    parser.add_argument("--json", type=Path, help="append one JSON line per folder here")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO_ROOT))
    from onnx_nf4.genai.perplexity import perplexity

    eval_text = args.eval.read_text(encoding="utf-8")
    if eval_text.strip() and eval_text in args.calibration.read_text(encoding="utf-8"):
        raise SystemExit("the calibration text holds the evaluation text")
    args.work.mkdir(parents=True, exist_ok=True)
    folders = {"builder fp32": args.fp32, "builder int4": args.int4} if args.builders else {}
    seconds: dict[str, float] = {}
    for name in [v for v in args.variants.split(",") if v]:
        seconds[name] = quantize(args.fp32, args.work / name, VARIANTS[name], args.calibration)
        folders[name] = args.work / name
        print(f"{name}: quantized in {seconds[name]:.0f} s", file=sys.stderr, flush=True)
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
    print(f"# {platform.node()} {cpu}, load {os.getloadavg()}", file=sys.stderr)
    for name, folder in folders.items():
        result = perplexity(folder, eval_text, window=args.window, threads=args.threads, max_tokens=args.max_tokens)
        record = {
            "variant": name,
            "model_bytes": model_bytes(folder),
            "perplexity": result.perplexity,
            "tokens": result.tokens,
            "prefill_tok_s": result.tokens_per_second,
            "quantize_s": seconds.get(name),
            "load": os.getloadavg()[0],
        }
        if name in args.check.split(","):
            direct = direct_perplexity(folder, eval_text, args.window, args.max_tokens)
            record["direct_perplexity"] = direct
            record["relative_difference"] = abs(result.perplexity - direct) / direct
        print(json.dumps(record), flush=True)
        if args.json:
            with args.json.open("a") as out:
                out.write(json.dumps(record) + "\n")
    if args.decode_tokens:
        sys.path.insert(0, str(Path(__file__).parent))
        import bench_models

        renamed = {
            "fp32" if n == "builder fp32" else "int4" if n == "builder int4" else n: f for n, f in folders.items()
        }
        for row in bench_models.bench_llm(renamed, args.threads, 64, args.decode_tokens, rounds=3):
            record = {"variant": row.variant, "decode_tok_s": row.decode_tok_s, "load": os.getloadavg()[0]}
            print(json.dumps(record), flush=True)
            if args.json:
                with args.json.open("a") as out:
                    out.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
