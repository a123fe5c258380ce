"""Float32 kernel speed per weight shape: ``MatMulNF4`` (``accuracy_level`` 0) against fp32 ``MatMul``, in GFLOP/s.

The shapes of all-MiniLM-L6-v2 run on 504 token rows (384 x 384, 384 x 1536, 1536 x 384) and 4096 x 4096 at
1, 16 and 128 rows, each at 1 and 2 threads. One process per run, so the kernel set is the one
``ONNX_NF4_CPU_ISA`` selects (run it once per ISA). Both variants are timed interleaved (one run of each per round,
thread-pool spinning off), and reported as medians of:

* wall-clock time per call (``time.perf_counter``);
* at one thread also the CPU time of the calling thread (``time.thread_time``; onnxruntime runs a one-thread
  session on it), which a machine busy with other jobs disturbs much less than wall-clock time.

onnxruntime's fp32 ``MatMul`` (MLAS) uses the widest vector unit of the CPU, also when the NF4 kernels are capped to
AVX2. ``--openblas-avx2`` adds, at one thread, numpy's OpenBLAS SGEMM forced to its Haswell (AVX2 + FMA) kernels
(``OPENBLAS_CORETYPE=Haswell``), the float32 GEMM rate of AVX2 code on the same CPU.

Usage: ``ONNX_NF4_CPU_ISA=avx2 python tools/bench/bench_cpu_shapes.py [--rounds 11] [--openblas-avx2]
[--markdown FILE]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if "--openblas-avx2" in sys.argv:  # OpenBLAS reads these when numpy loads it
    os.environ["OPENBLAS_CORETYPE"] = "Haswell"
    os.environ["OPENBLAS_NUM_THREADS"] = "1"

import numpy as np
import onnxruntime as ort
from bench_cpu import BLOCK_NF4, fp32_model, nf4_model
from bench_env import machine_header

import onnx_nf4
from onnx_nf4.runtime import custom_op_library

# (M, K, N)
CASES = [(504, 384, 384), (504, 384, 1536), (504, 1536, 384), (1, 4096, 4096), (16, 4096, 4096), (128, 4096, 4096)]
THREADS = [1, 2]


def _session(model: bytes, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.register_custom_ops_library(custom_op_library())
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def run_case(M: int, K: int, N: int, threads: int, rounds: int, openblas: bool) -> dict[str, tuple[float, float]]:
    """Median (wall ms, CPU ms of the calling thread) per variant."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((K, N)) * 0.05).astype(np.float32)
    a = rng.standard_normal((M, K)).astype(np.float32)
    runs = {
        "fp32": _session(fp32_model(w), threads),
        "nf4": _session(nf4_model(onnx_nf4.quantize_weight(w, BLOCK_NF4), 0), threads),
    }
    calls = {name: (lambda s=s: s.run(None, {"A": a})) for name, s in runs.items()}
    if openblas and threads == 1:
        calls["openblas_avx2"] = lambda: a @ w
    for call in calls.values():
        call()  # warm-up
    wall: dict[str, list[float]] = {name: [] for name in calls}
    cpu: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            t0, c0 = time.perf_counter(), time.thread_time()
            call()
            cpu[name].append(time.thread_time() - c0)
            wall[name].append(time.perf_counter() - t0)
    return {name: (1e3 * statistics.median(wall[name]), 1e3 * statistics.median(cpu[name])) for name in calls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=11, help="timed runs of each variant (default 11)")
    parser.add_argument("--openblas-avx2", action="store_true", help="add numpy's OpenBLAS SGEMM on AVX2 (1 thread)")
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()
    lines = [
        f"{machine_header()}; {args.rounds} interleaved rounds, medians.",
        "",
        "| M | K x N | threads | fp32 ms | nf4 ms | fp32 GFLOP/s | nf4 GFLOP/s | nf4 vs fp32 "
        "| CPU time: fp32 ms | nf4 ms | nf4 vs fp32 | OpenBLAS AVX2 GFLOP/s (CPU time) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    for M, K, N in CASES:
        for t in THREADS:
            r = run_case(M, K, N, t, args.rounds, args.openblas_avx2)
            gflop = 2e-6 * M * K * N  # per ms
            (fw, fc), (nw, nc) = r["fp32"], r["nf4"]
            cpu = f"{fc:.3f} | {nc:.3f} | {fc / nc:.2f}x" if t == 1 else "- | - | -"
            blas = f"{gflop / r['openblas_avx2'][1]:.0f}" if "openblas_avx2" in r else "-"
            line = (
                f"| {M} | {K} x {N} | {t} | {fw:.3f} | {nw:.3f} | {gflop / fw:.0f} | {gflop / nw:.0f} "
                f"| {fw / nw:.2f}x | {cpu} | {blas} |"
            )
            lines.append(line)
            print(line, flush=True)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
    main()
