"""CPU benchmark of one MatMul layer: ``onnx_nf4::MatMulNF4`` vs fp32 ``MatMul`` vs onnxruntime's 4-bit ops.

For each weight shape K x N, row count M and thread count, builds single-node models of the same random
weight (normal(0, 0.05)) and times them in one process, interleaved (one run of each variant per round, so
that load from other processes hits every variant alike), with ``onnxruntime.InferenceSession`` on the CPU
(thread-pool spinning off for every session, so that one session's idle pool never competes with the next):

* ``fp32``: ``MatMul`` with the float32 weight;
* ``nf4``: ``MatMulNF4`` (block 64, ``accuracy_level`` 0: float32 compute);
* ``nf4_acc4``: ``MatMulNF4`` (block 64, ``accuracy_level`` 4: int8 activations);
* ``nf4_b128_acc4``: the same with block 128 (the block size of ``nbits128``);
* ``bnb4``: ``com.microsoft::MatMulBnb4`` (NF4, block 64, the same codes and scales as ``nf4``);
* ``nbits{32,128}_acc{0,4}``: ``com.microsoft::MatMulNBits`` (symmetric int4, block 32 / 128);
* ``openvino_nf4``: OpenVINO's own NF4 (NNCF ``compress_weights(mode=NF4, group_size=64, ratio=1.0,
  all_layers=True)`` of the fp32 model, compiled for the CPU with the same thread count and a static M; OpenVINO's
  default precision, bf16 activations on CPUs with AVX512_BF16 / AMX), and ``openvino_nf4_f32`` (float32 activations;
  only where the default is not already f32). Left out when openvino / nncf are not installed (``bench`` extra).

Prints, per case, the median and minimum time in ms, the speed-up of ``nf4`` / ``nf4_acc4`` over each other
variant (from the medians), and each variant's relative error against the fp32 MatMul
(``||y - y_fp32|| / ||y_fp32||``; the 4-bit error of the weight itself dominates). The summary takes the minimum.
``--markdown FILE`` also writes the tables.

Usage: ``python tools/bench/bench_cpu.py [--quick] [--rounds 15] [--shapes llama|smollm2] [--isa avx512,avx2]
[--markdown tools/bench/RESULTS_cpu.md]``; ``--shapes smollm2`` (the MatMuls of a real small LLM, SmolLM2-135M:
hidden 576, MLP 1536, vocabulary 49152) writes ``tools/bench/RESULTS_cpu_smollm2.md``. ``--isa`` runs every case
once per ``ONNX_NF4_CPU_ISA`` value, each in its own process (the kernel set is chosen once per process), and writes
one file; without it the environment decides (``ONNX_NF4_CPU_ISA=avx2`` measures the AVX2 kernels on an AVX-512 CPU).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

import onnx_nf4
from onnx_nf4.runtime import custom_op_library

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_env  # sibling script modules (the path above)
import openvino_peer

BLOCK_NF4 = 64
#: Weight shapes (K, N) and row counts M of each ``--shapes`` set: ``llama`` the 7B-class projections at M = 1, 16
#: and 128; ``smollm2`` the MatMuls of SmolLM2-135M (hidden 576: q/k/v 576 x 960, o 576 x 576, gate and up
#: 576 x 1536, down 1536 x 576, the tied lm_head 576 x 49152), at M = 1 (a decode token) and 64 (a 64-token prompt).
SHAPE_SETS = {
    "llama": ([(4096, 4096), (4096, 11008), (11008, 4096)], [1, 16, 128]),
    "smollm2": ([(576, 960), (576, 576), (576, 1536), (1536, 576), (576, 49152)], [1, 64]),
}
THREADS = [1, 2]


def _model(node: onnx.NodeProto, K: int, inits: list[onnx.TensorProto], domain: str) -> bytes:
    graph = helper.make_graph(
        [node],
        "bench",
        [helper.make_tensor_value_info("A", onnx.TensorProto.FLOAT, ["M", K])],
        [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, None)],
        inits,
    )
    opsets = [helper.make_opsetid("", 18)]
    if domain:
        opsets.append(helper.make_opsetid(domain, 1))
    return helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString()


def fp32_model(w: np.ndarray) -> bytes:
    node = helper.make_node("MatMul", ["A", "W"], ["Y"])
    return _model(node, w.shape[0], [numpy_helper.from_array(w, "W")], "")


def nf4_model(q: onnx_nf4.QuantizedWeight, accuracy_level: int) -> bytes:
    node = helper.make_node(
        "MatMulNF4",
        ["A", "B", "absmax"],
        ["Y"],
        domain="onnx_nf4",
        K=q.K,
        N=q.N,
        block_size=q.block_size,
        accuracy_level=accuracy_level,
    )
    inits = [numpy_helper.from_array(q.packed, "B"), numpy_helper.from_array(q.absmax, "absmax")]
    return _model(node, q.K, inits, "onnx_nf4")


def bnb4_model(q: onnx_nf4.QuantizedWeight) -> bytes:
    """MatMulBnb4 with the same bytes (valid when K % block_size == 0: no padding, see docs/MatMulNF4.md)."""
    node = helper.make_node(
        "MatMulBnb4", ["A", "B", "absmax"], ["Y"], domain="com.microsoft", K=q.K, N=q.N,
        block_size=q.block_size, quant_type=1,
    )  # fmt: skip
    inits = [
        numpy_helper.from_array(q.packed.reshape(-1), "B"),
        numpy_helper.from_array(q.absmax.reshape(-1), "absmax"),
    ]
    return _model(node, q.K, inits, "com.microsoft")


def nbits_model(w: np.ndarray, block_size: int, accuracy_level: int) -> bytes:
    """MatMulNBits, symmetric int4 (zero point 8, scale = max|w| / 7 per block of a column)."""
    K, N = w.shape
    k_blocks = -(-K // block_size)
    wt = np.zeros((N, k_blocks * block_size), dtype=np.float32)
    wt[:, :K] = w.T
    blocks = wt.reshape(N, k_blocks, block_size)
    scale = np.abs(blocks).max(axis=2) / 7.0
    safe = np.where(scale > 0, scale, 1.0)[..., None]
    q = (np.clip(np.rint(blocks / safe), -8, 7) + 8).astype(np.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)  # low nibble = even k
    node = helper.make_node(
        "MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft", K=K, N=N, bits=4,
        block_size=block_size, accuracy_level=accuracy_level,
    )  # fmt: skip
    inits = [
        numpy_helper.from_array(packed, "B"),
        numpy_helper.from_array(scale.astype(np.float32).reshape(-1), "scales"),
    ]
    return _model(node, K, inits, "com.microsoft")


@functools.cache
def openvino_variants() -> list[tuple[str, str | None]]:
    """``(name, precision)`` of the OpenVINO columns: the default precision, and f32 where that is not the default."""
    variants: list[tuple[str, str | None]] = [("openvino_nf4", None)]
    if openvino_peer.default_precision() != "f32":
        variants.append(("openvino_nf4_f32", "f32"))
    return variants


@dataclass
class Result:
    name: str
    ms: float  # median
    min_ms: float
    rel_err: float


def run_case(K: int, N: int, M: int, threads: int, rounds: int, seed: int = 0) -> list[Result]:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((K, N)) * 0.05).astype(np.float32)
    a = rng.standard_normal((M, K)).astype(np.float32)
    q = onnx_nf4.quantize_weight(w, BLOCK_NF4)
    q128 = onnx_nf4.quantize_weight(w, 128)
    models = {
        "fp32": fp32_model(w),
        "nf4": nf4_model(q, 0),
        "nf4_acc4": nf4_model(q, 4),
        "nf4_b128_acc4": nf4_model(q128, 4),
        "bnb4": bnb4_model(q),
        "nbits32_acc0": nbits_model(w, 32, 0),
        "nbits32_acc4": nbits_model(w, 32, 4),
        "nbits128_acc0": nbits_model(w, 128, 0),
        "nbits128_acc4": nbits_model(w, 128, 4),
    }
    runners: dict[str, Callable[[], np.ndarray]] = {}
    for name, model in models.items():
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        # Nine sessions take turns in one process: a pool that spin-waits after its run would take the cores the next
        # session needs (2-thread medians of 17 ms instead of 2 ms for fp32 were seen), so no pool spins.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.register_custom_ops_library(custom_op_library())
        session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        runners[name] = lambda session=session: session.run(None, {"A": a})[0]
    if openvino_peer.openvino_version() is not None:
        for name, precision in openvino_variants():
            run_ov = openvino_peer.compile_nf4(models["fp32"], {"A": (M, K)}, threads, precision)
            runners[name] = lambda run_ov=run_ov: run_ov({"A": a})
    del models
    outputs = {name: run() for name, run in runners.items()}  # also the warm-up
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    ref = outputs["fp32"].astype(np.float64)
    norm = float(np.linalg.norm(ref))
    return [
        Result(
            name,
            1e3 * statistics.median(times[name]),
            1e3 * min(times[name]),
            float(np.linalg.norm(outputs[name] - ref)) / norm,
        )
        for name in runners
    ]


def format_case(K: int, N: int, M: int, threads: int, results: list[Result]) -> str:
    by = {r.name: r for r in results}
    lines = [
        f"### K={K} N={N} M={M} threads={threads}",
        "",
        "| variant | median ms | min ms | nf4 speed-up | nf4_acc4 speed-up | rel. error vs fp32 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.ms:.3f} | {r.min_ms:.3f} | {r.ms / by['nf4'].ms:.2f}x | {r.ms / by['nf4_acc4'].ms:.2f}x "
            f"| {r.rel_err:.2e} |"
        )
    return "\n".join(lines)


SUMMARY_HEADER = [
    "| K x N | M | threads | fp32 min ms | nf4 min ms | nf4_acc4 min ms | nf4 vs fp32 | nf4_acc4 vs fp32 "
    "| nf4 vs nbits32_acc0 | nf4 vs nbits128_acc0 | nf4 vs bnb4 | nf4_acc4 vs nbits128_acc4 "
    "| nf4_b128_acc4 vs nbits128_acc4 | nf4 vs openvino_nf4 | nf4_acc4 vs openvino_nf4 |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
]


def summary_row(K: int, N: int, M: int, threads: int, results: list[Result]) -> str:
    """One line of the summary: the best (minimum) times and their speed-ups (> 1: MatMulNF4 is faster) against the
    baselines. On a shared machine the best of the interleaved runs is the one least disturbed by other processes."""
    by = {r.name: r.min_ms for r in results}

    def ratio(peer: str, ours: str) -> str:
        return f"{by[peer] / by[ours]:.2f}x" if peer in by else "n/a"

    return (
        f"| {K} x {N} | {M} | {threads} | {by['fp32']:.3f} | {by['nf4']:.3f} | {by['nf4_acc4']:.3f} "
        f"| {ratio('fp32', 'nf4')} | {ratio('fp32', 'nf4_acc4')} | {ratio('nbits32_acc0', 'nf4')} "
        f"| {ratio('nbits128_acc0', 'nf4')} | {ratio('bnb4', 'nf4')} | {ratio('nbits128_acc4', 'nf4_acc4')} "
        f"| {ratio('nbits128_acc4', 'nf4_b128_acc4')} | {ratio('openvino_nf4', 'nf4')} "
        f"| {ratio('openvino_nf4', 'nf4_acc4')} |"
    )


def measure(args: argparse.Namespace) -> dict:
    """Every case in this process (kernel set as ``ONNX_NF4_CPU_ISA`` caps it); the tables as they are printed."""
    shapes, rows = SHAPE_SETS[args.shapes]
    shapes, threads = (shapes[:1], THREADS[:1]) if args.quick else (shapes, THREADS)
    header = bench_env.machine_header()
    print(header, flush=True)
    sections, summary = [], []
    for K, N in shapes:
        for M in rows:
            for t in threads:
                results = run_case(K, N, M, t, args.rounds)
                text = format_case(K, N, M, t, results)
                print(text + "\n", flush=True)
                sections.append(text)
                summary.append(summary_row(K, N, M, t, results))
    print("\n".join(SUMMARY_HEADER + summary), flush=True)
    return {"header": header, "kernel_set": bench_env.kernel_set_label(), "summary": summary, "sections": sections}


def write_markdown(path: str, runs: list[dict], command: str, rounds: int) -> None:
    """One results file: the command, then per kernel set its machine line, summary and every variant's table."""
    ov = openvino_peer.openvino_version()
    with open(path, "w") as f:
        f.write("# CPU benchmark: MatMulNF4 vs onnxruntime MatMul / MatMulBnb4 / MatMulNBits / OpenVINO NF4\n\n")
        f.write(f"Command: `{command}` (median of {rounds} interleaved runs per variant, all variants in one process; ")
        f.write(f"NF4 block size {BLOCK_NF4}; weights normal(0, 0.05), A normal(0, 1)). ")
        f.write(f"OpenVINO peer: {ov or 'not installed'} (see `tools/bench/openvino_peer.py`).\n\n")
        f.write(bench_env.LOAD_NOTE + "\n\n")
        for run in runs:
            f.write(f"## {run['kernel_set']}\n\n{run['header']}.\n\n")
            f.write(
                "Summary, from the best (minimum) time of each variant (speed-up > 1: MatMulNF4 is faster):\n\n"
                + "\n".join(SUMMARY_HEADER + run["summary"])
            )
            f.write("\n\n")
        for run in runs:
            f.write(f"## Every variant, {run['kernel_set']}\n\n" + "\n\n".join(run["sections"]) + "\n\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, help="timed runs of each variant (default 15, 3 with --quick)")
    parser.add_argument("--quick", action="store_true", help="smoke run: the first shape only, threads=1")
    parser.add_argument("--shapes", choices=sorted(SHAPE_SETS), default="llama", help="the weight shapes (SHAPE_SETS)")
    parser.add_argument(
        "--isa",
        help="comma-separated ONNX_NF4_CPU_ISA values, e.g. avx512,avx2: one child process per value "
        "(default: this process, the environment as it is)",
    )
    parser.add_argument("--markdown", help="also write the tables to this file")
    parser.add_argument("--results-json", help=argparse.SUPPRESS)  # a child of --isa writes its results here
    args = parser.parse_args()
    if args.rounds is None:
        args.rounds = 3 if args.quick else 15
    child_argv = [f"--rounds={args.rounds}", f"--shapes={args.shapes}"] + (["--quick"] if args.quick else [])
    runs = bench_env.run_per_isa(__file__, child_argv, args.isa.split(",")) if args.isa else [measure(args)]
    if args.results_json:
        Path(args.results_json).write_text(json.dumps(runs[0]))
    if args.markdown:
        isa = [f"--isa {args.isa}"] if args.isa else []
        command = " ".join(["python tools/bench/bench_cpu.py", *child_argv, *isa, f"--markdown {args.markdown}"])
        write_markdown(args.markdown, runs, command, args.rounds)


if __name__ == "__main__":
    main()
