"""MiniLM after onnxruntime's transformer optimizer, float32 and NF4 (the rows beside bench_models.py's MiniLM rows).

onnxruntime's transformer optimizer (``optimize_model(path, "bert", num_heads=12, hidden_size=384)``) fuses
MiniLM's self-attention into ``com.microsoft::Attention`` (QKV weight as an input), its embeddings into
``EmbedLayerNormalization``, its residual + LayerNorm into ``SkipLayerNormalization`` and its FFN bias + GELU into
``BiasGelu``. ``onnx_nf4.quantize_model`` then rewrites the 18 MatMul weights and the 6 packed QKV weights of the
``Attention`` nodes (``MatMulNF4`` + ``Split`` + ``MultiHeadAttention``, :mod:`onnx_nf4.passes.attention`): all
36 linear layers in NF4. Variants, all in one process, interleaved (as ``bench_models.bench_minilm``: 24 real
sentences padded to one batch, spinning off):

* ``fp32``: the exported model; ``nf4``: ``quantize_model`` of it (block 64, ``accuracy_level`` 0);
* ``fp32_opt``: ``optimize_model`` of ``fp32``; ``nf4_opt``: ``quantize_model`` of ``fp32_opt``;
* ``bnb4_opt``: ``quantize_model(format="com.microsoft")`` of ``fp32_opt`` (stock onnxruntime ops only);
* ``fp32_opt_gather`` / ``nf4_opt_gather``: the same without the ``EmbedLayerNormalization`` fusion, so that the
  word embedding stays a ``Gather`` that ``quantize_model`` turns into an NF4 lookup (as it does in ``nf4``).

The table gives the median and the minimum ms over the rounds, each with the speed against ``fp32`` and against
``fp32_opt`` (> 1: faster), and the smallest sentence-embedding cosine with ``fp32``. The check the optimized NF4
model must pass: its speed against ``fp32_opt`` is no worse than 0.97x ``nf4``'s speed against ``fp32`` (printed
for both statistics; "gather": ``nf4_opt_gather`` against ``fp32_opt_gather``).

Usage: ``python tools/bench/bench_optimized.py [--rounds 15] [--markdown tools/bench/RESULTS_optimized.md]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import onnx_nf4

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_env
from bench_models import NF4_BLOCK, _build_once, minilm

HERE = Path(__file__).resolve().parent
#: all-MiniLM-L6-v2: 12 heads of 32, hidden 384.
NUM_HEADS, HIDDEN = 12, 384
HEADER = [
    "| variant | threads | median ms | vs fp32 | vs fp32_opt | min ms | vs fp32 | vs fp32_opt | min cosine vs fp32 |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
]


def optimize(src: Path, dst: Path, embed_layer_norm: bool = True) -> None:
    """onnxruntime's transformer optimizer at its default level for ``"bert"`` (``embed_layer_norm=False``: without
    the ``EmbedLayerNormalization`` fusion, so that the word embedding stays a ``Gather`` that NF4 takes)."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    fusions = FusionOptions("bert")
    fusions.enable_embed_layer_norm = embed_layer_norm
    model = optimize_model(str(src), "bert", num_heads=NUM_HEADS, hidden_size=HIDDEN, optimization_options=fusions)
    model.save_model_to_file(str(dst))


def prepare(work: Path) -> dict[str, Path]:
    """The model file of every variant (built once into ``work``)."""
    work.mkdir(parents=True, exist_ok=True)
    fp32 = _build_once(work / "minilm_fp32.onnx", minilm.export_minilm)
    opt = _build_once(work / "minilm_fp32_opt.onnx", lambda p: optimize(fp32, p))
    gather = _build_once(work / "minilm_fp32_opt_gather.onnx", lambda p: optimize(fp32, p, embed_layer_norm=False))
    return {
        "fp32": fp32,
        "nf4": _build_once(work / "minilm_nf4.onnx", lambda p: onnx_nf4.quantize_model(fp32, p, block_size=NF4_BLOCK)),
        "fp32_opt": opt,
        "nf4_opt": _build_once(
            work / "minilm_nf4_opt.onnx", lambda p: onnx_nf4.quantize_model(opt, p, block_size=NF4_BLOCK)
        ),
        "bnb4_opt": _build_once(
            work / "minilm_bnb4_opt.onnx",
            lambda p: onnx_nf4.quantize_model(opt, p, block_size=NF4_BLOCK, format="com.microsoft"),
        ),
        "fp32_opt_gather": gather,
        "nf4_opt_gather": _build_once(
            work / "minilm_nf4_opt_gather.onnx", lambda p: onnx_nf4.quantize_model(gather, p, block_size=NF4_BLOCK)
        ),
    }


def measure(paths: dict[str, Path], threads: int, rounds: int) -> tuple[list[str], dict[str, float]]:
    """The table rows at ``threads`` and, per statistic (median, min), ``(nf4_opt vs fp32_opt) / (nf4 vs fp32)``.

    Sessions as in ``bench_models.bench_minilm`` (one process, spinning off, interleaved rounds); the minimum is
    given beside the median because on a shared machine other processes only ever add time.
    """
    import onnxruntime as ort

    feeds = minilm.encode(minilm.SENTENCES)
    sessions = {}
    for name, path in paths.items():
        so = onnx_nf4.session_options(intra_op_num_threads=threads, inter_op_num_threads=1)
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sessions[name] = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    embeddings = {n: minilm.mean_pool(s.run(None, feeds)[0], feeds["attention_mask"]) for n, s in sessions.items()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, session in sessions.items():
            t0 = time.perf_counter()
            session.run(None, feeds)
            times[name].append(1e3 * (time.perf_counter() - t0))
    stats = {"median": statistics.median, "min": min}
    ms = {stat: {name: f(values) for name, values in times.items()} for stat, f in stats.items()}
    lines = []
    for name in sessions:
        cosine = float(minilm.cosine(embeddings[name], embeddings["fp32"]).min())
        cells = " | ".join(
            f"{m[name]:.1f} | {m['fp32'] / m[name]:.2f}x | {m['fp32_opt'] / m[name]:.2f}x" for m in ms.values()
        )
        lines.append(f"| {name} | {threads} | {cells} | {cosine:.5f} |")
    relative = {}
    for stat, m in ms.items():
        relative[stat] = (m["fp32_opt"] / m["nf4_opt"]) / (m["fp32"] / m["nf4"])
        relative[f"{stat}, gather"] = (m["fp32_opt_gather"] / m["nf4_opt_gather"]) / (m["fp32"] / m["nf4"])
    return lines, relative


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", default="1,2", help="comma-separated intra-op thread counts")
    parser.add_argument("--work-dir", default=str(HERE.parents[1] / "build" / "bench_optimized"), help="model cache")
    parser.add_argument("--markdown", help="also write the tables to this file")
    args = parser.parse_args()
    header = bench_env.machine_header()
    print(header, flush=True)
    paths = prepare(Path(args.work_dir))
    shape = minilm.encode(minilm.SENTENCES)["input_ids"].shape
    sections = []
    for threads in (int(t) for t in args.threads.split(",")):
        lines, relative = measure(paths, threads, args.rounds)
        summary = f"{threads} thread(s): nf4_opt's speed vs fp32_opt / nf4's speed vs fp32 = " + ", ".join(
            f"{value:.3f} ({stat}; {'pass' if value >= 0.97 else 'FAIL'}: >= 0.97 required)"
            for stat, value in relative.items()
        )
        table = "\n".join([*HEADER, *lines, "", summary])
        print(table + "\n", flush=True)
        sections.append(table)
    if args.markdown:
        command = " ".join(["python tools/bench/bench_optimized.py", *sys.argv[1:]])
        with open(args.markdown, "w") as f:
            f.write("# MiniLM after onnxruntime's transformer optimizer: float32 and NF4 on the CPU\n\n")
            f.write(
                f"Command: `{command}`. What each variant is: the docstring of `tools/bench/bench_optimized.py`.\n\n"
            )
            f.write(bench_env.LOAD_NOTE + "\n\n")
            f.write(
                f"{shape[0]} sentences padded to {shape[1]} tokens, median and minimum of {args.rounds} interleaved "
                f"runs per variant; spinning off.\n\n{header}.\n\n"
            )
            f.write("\n\n".join(sections) + "\n")


if __name__ == "__main__":
    main()
