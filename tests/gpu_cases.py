"""The shape matrix and the accuracy bound of the CUDA kernels' tests, shared by the GPU run
(tests/test_gpu_kernels.py) and the emulated run (tests/test_cuda_emu_kernels.py); needs no GPU."""

from __future__ import annotations

import ml_dtypes
import numpy as np

import onnx_nf4
from onnx_nf4.op.reference import matmul_nf4 as reference_matmul

F32_EPS = 2.0**-23
# Per-term error of the tensor-core path beyond float32 rounding: the two-term split of each NF4 value
# (2^-23.2 relative for float16, 2^-17.5 for bfloat16; docs/gpu.md), rounded up.
SPLIT_ERROR = {"float32": 0.0, "float16": 2.0**-22, "bfloat16": 2.0**-16}
MANTISSA_BITS = {"float32": 23, "float16": 10, "bfloat16": 7}
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}

# (K, N, block_size, A shape, double_quant, zero_blocks, bias)
CASES = [
    (64, 8, 64, [1, 64], False, False, False),
    (100, 7, 32, [3, 100], False, False, True),  # K not a multiple of the block size
    (40, 5, 64, [17, 40], True, False, False),  # K < block size
    (300, 1, 64, [17, 300], False, False, True),  # N = 1
    (256, 96, 16, [20, 256], True, True, False),  # smallest block, zero blocks
    (1000, 33, 128, [128, 1000], False, True, True),
    (520, 70, 4096, [3, 520], True, False, False),  # largest block
    (128, 40, 64, [2, 3, 128], False, False, True),  # batched 3-D A
    (96, 24, 32, [0, 96], False, False, False),  # M = 0
    (72, 50, 16, [5, 72], True, False, True),  # rows of 40 bytes: 8-byte loads
    (37, 19, 32, [9, 37], False, False, True),  # odd K: unaligned activation rows
    (4096, 64, 64, [1, 4096], True, False, False),  # split-K across 8 warps
    (2048, 300, 256, [33, 2048], False, False, True),  # 3 row tiles of 16
]

#: (dtype, algo): every kernel family with every activation dtype it takes.
KERNELS = [("float32", "simt"), ("float16", "simt"), ("float16", "mma"), ("bfloat16", "simt"), ("bfloat16", "mma")]


def case_id(case) -> str:
    K, N, bs, shape, dq, zero, bias = case
    flags = "".join(f for f, on in (("-dq", dq), ("-zero", zero), ("-bias", bias)) if on)
    return f"K{K}-N{N}-bs{bs}-A{'x'.join(map(str, shape))}{flags}"


def weight(K: int, N: int, bs: int, dq: bool, zero: bool, seed: int = 0) -> onnx_nf4.QuantizedWeight:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((K, N)) * 0.05).astype(np.float32)
    if zero:
        w[: min(K, bs), :] = 0.0
        w[:, N // 2] = 0.0
    return onnx_nf4.quantize_weight(w, bs, double_quant=dq)


def weight_arrays(q: onnx_nf4.QuantizedWeight) -> list[np.ndarray | None]:
    """B, absmax (float32, or uint8 codes), nested_absmax, nested_code, absmax_offset: the op's weight inputs."""
    n = q.nested
    if n is None:
        return [q.packed, q.absmax, None, None, None]
    return [q.packed, q.absmax, n.nested_absmax, n.code, np.asarray(n.offset, np.float32)]


def attrs(q: onnx_nf4.QuantizedWeight) -> dict[str, int]:
    nbs = 256 if q.nested is None else q.nested.block_size
    return {"K": q.K, "N": q.N, "block_size": q.block_size, "nested_block_size": nbs}


def assert_close(y: np.ndarray, ref: np.ndarray, q: onnx_nf4.QuantizedWeight, a: np.ndarray, dtype: str) -> None:
    """Both sides round their float32 results once to T: they may differ by the float32 results' difference
    (bounded by the dot-product error of both plus the split error) and one ulp of T."""
    assert y.shape == ref.shape and y.dtype == ref.dtype
    bound = np.abs(a.astype(np.float64)) @ np.abs(onnx_nf4.dequantize_weight(q).astype(np.float64))
    ref64, y64 = ref.astype(np.float64), y.astype(np.float64)
    ulp = np.abs(ref64) * 2.0 ** -MANTISSA_BITS[dtype] + 1e-30
    tol = (2 * q.K * F32_EPS + 2 * SPLIT_ERROR[dtype]) * bound + (ulp if dtype != "float32" else 0)
    err = np.abs(y64 - ref64)
    assert (err <= tol + 1e-30).all(), (
        f"max error {err.max():.3e}, worst ratio to bound {(err / (tol + 1e-30)).max():.2f}"
    )


def problem(case, dtype: str, seed: int = 1):
    """The weight, A, bias and the numpy reference's Y of one case."""
    K, N, bs, shape, dq, zero, with_bias = case
    q = weight(K, N, bs, dq, zero)
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape).astype(np.float32).astype(DTYPES[dtype])
    bias = (rng.standard_normal(N) * 0.1).astype(np.float32).astype(DTYPES[dtype]) if with_bias else None
    ref = reference_matmul(a, *weight_arrays(q), bias, **attrs(q))
    return q, a, bias, ref
