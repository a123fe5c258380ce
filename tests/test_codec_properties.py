"""Property tests: the codec against a straightforward per-element definition of NF4 quantization.

The reference below shares nothing with ``onnx_nf4.codec.blockwise`` but the tables: it computes every float32 operation
in float64 and rounds once (exact for one float32 +, *, / by the double-rounding theorem), finds blocks with
``np.maximum.reduceat``, counts the bounds below each scaled value by broadcasting, and unpacks nibbles
arithmetically.
"""

from __future__ import annotations

import os

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from onnx_nf4.codec.blockwise import dequantize_blockwise, quantize_blockwise
from onnx_nf4.codec.codebook import NF4_CODE, NF4_MIDPOINTS_BNB, NF4_THRESHOLDS

SETTINGS = {
    "deadline": None,
    "derandomize": os.environ.get("CI", "").lower() == "true",
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}
BLOCK_SIZES = st.sampled_from([16, 32, 64, 128, 256, 1024, 4096])
DTYPES = st.sampled_from([np.float16, np.float32, np.float64])
ROUNDINGS = st.sampled_from(["onnxruntime", "bitsandbytes"])


def _fl32(x64: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.asarray(x64, dtype=np.float64).astype(np.float32)


def reference(w: np.ndarray, bs: int, rounding: str) -> tuple[np.ndarray, np.ndarray]:
    """``(codes uint8[n], absmax float32[ceil(n/bs)])`` by the per-element definition."""
    x = np.asarray(w).astype(np.float32).reshape(-1)
    n = x.size
    if n == 0:
        return np.zeros(0, np.uint8), np.zeros(0, np.float32)
    absmax = np.maximum.reduceat(np.abs(x), np.arange(0, n, bs))
    block = np.arange(n) // bs
    x64 = x.astype(np.float64)
    if rounding == "onnxruntime":
        with np.errstate(divide="ignore"):
            inv = _fl32(np.where(absmax > 0, 1.0 / absmax.astype(np.float64), 0.0))
        with np.errstate(invalid="ignore"):
            s = _fl32(x64 * inv[block].astype(np.float64))  # 0 * inf = NaN: every comparison false, code 0
        bounds = NF4_THRESHOLDS
    else:
        clamped = np.maximum(absmax, np.float32(1e-38)).astype(np.float64)
        inv = _fl32(1.0 / clamped)
        s = _fl32(x64 * inv[block].astype(np.float64))
        tail = block == (n - 1) // bs if n % bs else np.zeros(n, bool)
        s[tail] = _fl32(x64[tail] / clamped[block[tail]])  # the partial last block divides
        s = np.minimum(np.maximum(s, np.float32(-1)), np.float32(1))
        bounds = NF4_MIDPOINTS_BNB
    codes = (s[:, None] > bounds[None, :]).sum(axis=1).astype(np.uint8)
    return codes, absmax.astype(np.float32)


def unpack(packed: np.ndarray, n: int) -> np.ndarray:
    p = packed.astype(np.int64)
    both = np.empty(2 * p.size, np.int64)
    both[0::2], both[1::2] = p // 16, p % 16
    return both[:n].astype(np.uint8)


@st.composite
def weights(draw, dtype=None):
    """Arrays of many shapes and distributions (seeded numpy draws keep large arrays cheap)."""
    dtype = draw(DTYPES) if dtype is None else dtype
    shape = draw(st.sampled_from([(), (1,), (7,), (2, 3), (1, 4096), (3, 1000), (5, 7, 11), (64, 64), (33, 130)]))
    shape = draw(st.one_of(st.just(shape), hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=40)))
    kind = draw(st.sampled_from(["normal", "uniform", "denormal", "huge", "zeros", "mixed", "sparse", "ints"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    size = int(np.prod(shape, dtype=np.int64))
    fmax = float(np.finfo(np.float16 if dtype == np.float16 else np.float32).max)
    if kind == "normal":
        x = rng.standard_normal(size) * 10.0 ** rng.uniform(-4, 4)
    elif kind == "uniform":
        x = rng.uniform(-1, 1, size)
    elif kind == "denormal":  # float32 (or float16) subnormals and their neighbourhood
        tiny = 1e-45 if dtype != np.float16 else 6e-8
        x = rng.standard_normal(size) * tiny * 10.0 ** rng.uniform(0, 8)
    elif kind == "huge":
        x = rng.uniform(-1, 1, size) * fmax
    elif kind == "zeros":
        x = np.where(rng.random(size) < 0.5, 0.0, -0.0)
    elif kind == "mixed":
        x = rng.standard_normal(size) * 10.0 ** rng.integers(-30, 30, size)
        x = np.clip(x, -fmax, fmax)
    elif kind == "sparse":
        x = np.where(rng.random(size) < 0.9, 0.0, rng.standard_normal(size))
    else:
        x = rng.integers(-8, 9, size).astype(np.float64)
    return x.reshape(shape).astype(dtype)


@settings(max_examples=350, **SETTINGS)
@given(w=weights(), bs=BLOCK_SIZES, rounding=ROUNDINGS)
def test_codes_and_absmax_match_definition(w, bs, rounding):
    packed, absmax = quantize_blockwise(w, bs, rounding=rounding)
    codes, ref_absmax = reference(w, bs, rounding)
    assert packed.shape == ((codes.size + 1) // 2,)
    assert np.array_equal(absmax.view(np.uint32), ref_absmax.view(np.uint32))
    assert np.array_equal(unpack(packed, codes.size), codes)
    if codes.size % 2:
        assert packed[-1] % 16 == 7


@st.composite
def arbitrary_floats(draw):
    """Small arrays of any finite values of their dtype (hypothesis picks the awkward ones)."""
    dtype = draw(st.sampled_from([np.float16, np.float32]))
    width = 16 if dtype == np.float16 else 32
    elements = st.floats(allow_nan=False, allow_infinity=False, width=width)
    return draw(hnp.arrays(dtype, st.integers(1, 300), elements=elements))


@settings(max_examples=250, **SETTINGS)
@given(w=arbitrary_floats(), bs=BLOCK_SIZES, rounding=ROUNDINGS)
def test_arbitrary_floats_match_definition(w, bs, rounding):
    packed, absmax = quantize_blockwise(w, bs, rounding=rounding)
    codes, ref_absmax = reference(w, bs, rounding)
    assert np.array_equal(absmax.view(np.uint32), ref_absmax.view(np.uint32))
    assert np.array_equal(unpack(packed, codes.size), codes)


@st.composite
def ties(draw):
    """Blocks whose scaled values hit a bound exactly: x = bound * 2**e with absmax 2**e."""
    rounding = draw(ROUNDINGS)
    bounds = NF4_THRESHOLDS if rounding == "onnxruntime" else NF4_MIDPOINTS_BNB
    bs = draw(BLOCK_SIZES)
    n = draw(st.integers(1, 3 * bs))
    e = draw(st.integers(-60, 60))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = np.float32(2.0**e)
    x = (bounds[rng.integers(0, 15, n)] * scale).astype(np.float32)
    x[:: max(1, bs // 2)] = np.where(rng.random(x[:: max(1, bs // 2)].size) < 0.5, scale, -scale)
    return x, bs, rounding


@settings(max_examples=250, **SETTINGS)
@given(case=ties())
def test_exact_ties_go_to_the_lower_code(case):
    x, bs, rounding = case
    packed, absmax = quantize_blockwise(x, bs, rounding=rounding)
    codes, _ = reference(x, bs, rounding)
    assert np.array_equal(unpack(packed, x.size), codes)
    bounds = NF4_THRESHOLDS if rounding == "onnxruntime" else NF4_MIDPOINTS_BNB
    block_absmax = np.repeat(absmax, bs)[: x.size]
    on_bound = np.isin(x / block_absmax, bounds)
    lower = np.searchsorted(bounds, x / block_absmax, side="left")  # index of the bound = the lower code
    assert np.array_equal(codes[on_bound], lower[on_bound])


@settings(max_examples=200, **SETTINGS)
@given(w=weights(), bs=BLOCK_SIZES, rounding=ROUNDINGS)
def test_dequantize_is_code_times_absmax(w, bs, rounding):
    packed, absmax = quantize_blockwise(w, bs, rounding=rounding)
    out = dequantize_blockwise(packed, absmax, w.shape, bs)
    assert out.shape == w.shape and out.dtype == np.float32
    codes, _ = reference(w, bs, rounding)
    scale = np.repeat(absmax, bs)[: codes.size].astype(np.float64)
    expected = _fl32(NF4_CODE[codes].astype(np.float64) * scale)
    assert np.array_equal(out.reshape(-1).view(np.uint32), expected.view(np.uint32))
    x = w.reshape(-1).astype(np.float32).astype(np.float64)
    normal = scale >= 1e-37  # a float32-subnormal absmax has no usable reciprocal
    err = np.abs(out.reshape(-1).astype(np.float64) - x)[normal]
    assert np.all(err <= 0.152 * scale[normal] * (1 + 1e-6))
