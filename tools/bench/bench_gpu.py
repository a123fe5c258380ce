"""GPU benchmark of one NF4 layer: ``MatMulNF4``'s CUDA kernels vs cuBLAS float16 (``torch.matmul``).

For each weight shape K x N and row count M, times in one process:

* ``nf4 (lib)``: the kernels of the compiled library (its ``onnx_nf4_cuda_matmul`` entry point, CuPy pointers);
* ``nf4 (cupy)``: the same kernels compiled by NVRTC (``onnx_nf4.op.cupy_backend``, the CuPy path);
* ``fp16``: ``torch.matmul`` of the float16 weight (cuBLAS), or ``cupy.matmul`` when torch has no CUDA.

Activations are float16 (``--dtype bfloat16`` for bfloat16), block 64, float32 absmax. The weights are random
codes and scales (only speed is measured here; tests/test_gpu_kernels.py checks the results). Every call reads
its weight from HBM: each variant cycles through enough copies of its weight to exceed four times the L2 cache.
Calls are captured in a CUDA graph (no launch overhead), replayed ``--reps`` times; the reported time is the
median over replays of the time per call.

Reported per case: median time (us), achieved weight bandwidth (packed codes + absmax bytes / time) as a fraction
of the device's measured copy bandwidth (a device-to-device copy of 1 GiB, read + write), and the speed-up over
fp16 (fp16 time / nf4 time). ``--markdown FILE`` also writes the table (tools/bench/RESULTS_gpu.md).

Usage: ``python tools/bench/bench_gpu.py [--quick] [--reps 20] [--markdown tools/bench/RESULTS_gpu.md]``.
Needs an NVIDIA GPU (compute capability >= 8.0), cupy-cuda13x, and torch with CUDA for the cuBLAS baseline.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import cupy
import numpy as np

from onnx_nf4.op import cupy_backend as cb

BLOCK = 64
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]
ROWS = [1, 4, 16, 128, 2048]
CALLS_PER_GRAPH = 20


def _torch_cuda():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def time_per_call(calls: list[Callable[[], None]], reps: int) -> float:
    """Median over ``reps`` replays of a CUDA graph of ``calls`` (cycled to CALLS_PER_GRAPH), in seconds per call."""
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        for fn in calls:  # warm-up: compile, plan, allocate outside the capture
            fn()
        stream.synchronize()
        stream.begin_capture()
        for i in range(CALLS_PER_GRAPH):
            calls[i % len(calls)]()
        graph = stream.end_capture()
        graph.launch(stream)
        stream.synchronize()
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        times = []
        for _ in range(reps):
            start.record(stream)
            graph.launch(stream)
            end.record(stream)
            end.synchronize()
            times.append(cupy.cuda.get_elapsed_time(start, end) * 1e-3 / CALLS_PER_GRAPH)
    return statistics.median(times)


def copy_bandwidth(reps: int) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second) of a 1 GiB buffer."""
    src = cupy.ones(1 << 28, dtype=cupy.float32)
    dst = cupy.empty_like(src)

    def copy() -> None:
        stream = cupy.cuda.get_current_stream()
        cupy.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, src.nbytes, cupy.cuda.runtime.memcpyDeviceToDevice,
                                      stream.ptr)  # fmt: skip

    return 2 * src.nbytes / time_per_call([copy], reps)


def copies_for(nbytes: int) -> int:
    l2 = int(cupy.cuda.Device().attributes["L2CacheSize"])
    return max(2, math.ceil(4 * l2 / nbytes))


@dataclass
class Row:
    K: int
    N: int
    M: int
    variant: str
    seconds: float
    weight_bytes: int
    fp16_seconds: float

    def cells(self, copy_bw: float) -> list[str]:
        frac = self.weight_bytes / self.seconds / copy_bw
        speedup = self.fp16_seconds / self.seconds
        return [f"{self.K}x{self.N}", str(self.M), self.variant, f"{self.seconds * 1e6:.1f}", f"{frac:.2f}",
                f"{speedup:.2f}"]  # fmt: skip


def nf4_weights(K: int, N: int, copies: int, rng: np.random.Generator) -> list[tuple]:
    k_blocks = -(-K // BLOCK)
    out = []
    for _ in range(copies):
        packed = cupy.asarray(rng.integers(0, 256, (N, k_blocks, BLOCK // 2), dtype=np.uint8))
        absmax = cupy.asarray(rng.uniform(0.05, 0.2, (N, k_blocks)).astype(np.float32))
        out.append((packed, absmax))
    return out


def bench_case(K: int, N: int, M: int, dtype: str, reps: int, torch, rng) -> list[Row]:
    k_blocks = -(-K // BLOCK)
    weight_bytes = N * k_blocks * (BLOCK // 2 + 4)
    bf16 = dtype == "bfloat16"
    a_host = rng.standard_normal((M, K)).astype(np.float32)
    # bfloat16 travels as uint16 bit patterns (CuPy has no bfloat16 dtype).
    a = cupy.asarray((a_host.view(np.uint32) >> 16).astype(np.uint16) if bf16 else a_host.astype(np.float16))
    y = cupy.empty((M, N), dtype=a.dtype)
    weights = nf4_weights(K, N, copies_for(weight_bytes), rng)
    attrs = {"K": K, "N": N, "block_size": BLOCK, "bfloat16": bf16, "out": y}

    def nf4_calls(backend: str) -> list[Callable[[], None]]:
        return [lambda w=w: cb.matmul_nf4(a, w[0], w[1], **attrs, backend=backend) for w in weights]

    # fp16 baseline: cuBLAS through torch (or CuPy), same rows, cycling dense copies.
    dense_bytes = K * N * 2
    if torch is not None:
        dt = torch.bfloat16 if bf16 else torch.float16
        a_t = torch.randn(M, K, device="cuda", dtype=dt)
        ws = [torch.randn(K, N, device="cuda", dtype=dt) for _ in range(copies_for(dense_bytes))]
        y_t = torch.empty(M, N, device="cuda", dtype=dt)
        fp16_t = _time_torch([lambda w=w: torch.matmul(a_t, w, out=y_t) for w in ws], reps, torch)
        baseline = "torch.matmul"
    else:
        a_d = cupy.asarray(rng.standard_normal((M, K)).astype(np.float16))
        ws = [cupy.asarray(rng.standard_normal((K, N)).astype(np.float16)) for _ in range(copies_for(dense_bytes))]
        y_d = cupy.empty((M, N), dtype=np.float16)
        fp16_t = time_per_call([lambda w=w: cupy.matmul(a_d, w, out=y_d) for w in ws], reps)
        baseline = "cupy.matmul"
    rows = [Row(K, N, M, f"fp16 ({baseline})", fp16_t, dense_bytes, fp16_t)]
    for backend, label in (("library", "nf4 (lib)"), ("nvrtc", "nf4 (cupy)")):
        try:
            t = time_per_call(nf4_calls(backend), reps)
        except (FileNotFoundError, RuntimeError) as exc:
            print(f"  {label}: skipped ({exc})")
            continue
        rows.append(Row(K, N, M, label, t, weight_bytes, fp16_t))
    return rows


def _time_torch(calls: list[Callable[[], None]], reps: int, torch) -> float:
    """Like time_per_call, with torch's graph capture (cuBLAS needs torch's own capture setup)."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for fn in calls:
            fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS_PER_GRAPH):
            calls[i % len(calls)]()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3 / CALLS_PER_GRAPH)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="first shape only, M in {1, 16}")
    parser.add_argument("--reps", type=int, default=20, help="graph replays per measurement")
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    parser.add_argument("--markdown", help="also write the table to this Markdown file")
    args = parser.parse_args()

    torch = _torch_cuda()
    device = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(device.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    copy_bw = copy_bandwidth(args.reps)
    header = (f"{name}, {props['multiProcessorCount']} SMs, L2 {device.attributes['L2CacheSize'] >> 20} MiB; "
              f"measured copy bandwidth {copy_bw / 1e9:.0f} GB/s; activations {args.dtype}, block {BLOCK}, "
              f"float32 absmax; CUDA graphs of {CALLS_PER_GRAPH} calls, median of {args.reps} replays")  # fmt: skip
    print(header)
    shapes = SHAPES[:1] if args.quick else SHAPES
    rows_m = [1, 16] if args.quick else ROWS
    rng = np.random.default_rng(0)
    cols = ["K x N", "M", "variant", "time (us)", "weight BW / copy BW", "speed-up vs fp16"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for K, N in shapes:
        for M in rows_m:
            for row in bench_case(K, N, M, args.dtype, args.reps, torch, rng):
                cells = row.cells(copy_bw)
                print("  ".join(f"{c:>20}" if i == 2 else f"{c:>10}" for i, c in enumerate(cells)))
                lines.append("| " + " | ".join(cells) + " |")
            cupy.get_default_memory_pool().free_all_blocks()
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(f"# GPU benchmark (tools/bench/bench_gpu.py)\n\n{header}.\n\n" + "\n".join(lines) + "\n")
        print(f"wrote {args.markdown}")


if __name__ == "__main__":
    main()
