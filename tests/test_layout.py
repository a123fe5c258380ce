"""The MatMulNF4 weight layout: quantize_weight / dequantize_weight against the oracle and an independent decode."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from oracle_vectors import f32_bits, parametrize_cases

from onnx_nf4.codec.blockwise import unpack_nibbles
from onnx_nf4.codec.codebook import NF4_CODE, NF4_THRESHOLDS
from onnx_nf4.codec.double_quant import dequantize_absmax, quantize_absmax
from onnx_nf4.codec.layout import QuantizedWeight, dequantize_weight, quantize_weight

BLOCK_SIZES = (64, 128)


pytest_generate_tests = parametrize_cases


def _codes(q: QuantizedWeight) -> np.ndarray:
    """uint8 ``[N, K_pad]`` codes of ``q``."""
    k_pad = q.k_blocks * q.block_size
    return unpack_nibbles(q.packed.reshape(-1), q.N * k_pad).reshape(q.N, k_pad)


def _ort_codes(x: np.ndarray, absmax: np.ndarray) -> np.ndarray:
    """Straightforward onnxruntime-rounding codes of ``x[..., bs]`` with ``absmax[...]``."""
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        inv = np.where(absmax != 0, np.float32(1) / absmax, np.float32(0)).astype(np.float32)
        s = x * inv[..., None]
    return (s[..., None] > NF4_THRESHOLDS).sum(axis=-1).astype(np.uint8)


@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_weight_layout_against_oracle(oracle, case, bs):
    """``CASE__weight`` is W.T: aligned K gives the flat library bytes, other K the padded-column layout."""
    wt = oracle[f"{case}__weight"]
    N, K = wt.shape
    q = quantize_weight(wt.T, bs)
    k_blocks = -(-K // bs)
    assert (q.K, q.N, q.block_size, q.k_blocks) == (K, N, bs, k_blocks)
    assert q.packed.shape == (N, k_blocks, bs // 2) and q.packed.dtype == np.uint8
    assert q.absmax.shape == (N, k_blocks) and q.absmax.dtype == np.float32
    assert q.nested is None
    if K % bs == 0:
        assert np.array_equal(q.packed.reshape(-1), oracle[f"{case}__ort{bs}__packed"])
        assert np.array_equal(f32_bits(q.absmax), f32_bits(oracle[f"{case}__ort{bs}__absmax"]))
        qb = quantize_weight(wt.T, bs, rounding="bitsandbytes")
        assert np.array_equal(qb.packed.reshape(-1), oracle[f"{case}__bnb{bs}__packed"])
        assert np.array_equal(f32_bits(qb.absmax), f32_bits(oracle[f"{case}__bnb{bs}__absmax"]))
        return
    padded = np.zeros((N, k_blocks * bs), np.float32)
    padded[:, :K] = wt
    blocks = padded.reshape(N, k_blocks, bs)
    expected_absmax = np.abs(blocks).max(axis=-1)  # the padding zeros never raise a maximum
    assert np.array_equal(f32_bits(q.absmax), f32_bits(expected_absmax))
    codes = _codes(q)
    assert np.all(codes[:, K:] == 7)
    expected = _ort_codes(blocks, expected_absmax).reshape(N, -1)
    assert np.array_equal(codes[:, :K], expected[:, :K])


@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_dequantize_weight_roundtrip(oracle, case, bs):
    wt = oracle[f"{case}__weight"]
    q = quantize_weight(wt.T, bs)
    out = dequantize_weight(q)
    assert out.shape == wt.T.shape and out.dtype == np.float32
    scale = np.repeat(q.absmax, bs, axis=1)[:, : q.K]
    expected = NF4_CODE[_codes(q)[:, : q.K]] * scale
    assert np.array_equal(f32_bits(out), f32_bits(expected.T))


@pytest.mark.parametrize(("K", "N"), [(1, 1), (63, 5), (64, 3), (65, 7), (130, 2), (200, 33), (1024, 17)])
@pytest.mark.parametrize("bs", [16, 64, 128])
def test_padding_and_roundtrip_random(K, N, bs):
    w = np.random.default_rng(K * N + bs).standard_normal((K, N)).astype(np.float32)
    q = quantize_weight(w, bs)
    codes = _codes(q)
    assert np.all(codes[:, K:] == 7)
    out = dequantize_weight(q)
    scale = np.repeat(q.absmax, bs, axis=1)[:, :K].T
    assert np.all(np.abs(out - w) <= np.float32(0.152) * scale * np.float32(1 + 1e-6))


def test_padding_codes_with_subnormal_absmax():
    """A float32-subnormal absmax makes 1/absmax infinite; the padding still gets code 7."""
    w = np.full((70, 3), 1e-39, np.float32)
    q = quantize_weight(w, 64)
    assert np.all(_codes(q)[:, 70:] == 7)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_other_float_dtypes(dtype):
    w = np.random.default_rng(2).standard_normal((100, 9)).astype(dtype)
    q = quantize_weight(w, 64)
    ref = quantize_weight(w.astype(np.float32), 64)
    assert np.array_equal(q.packed, ref.packed) and np.array_equal(q.absmax, ref.absmax)


def test_double_quant_path():
    w = (np.random.default_rng(3).standard_normal((1000, 300)) * 0.02).astype(np.float32)
    plain = quantize_weight(w, 64)
    q = quantize_weight(w, 64, double_quant=True)
    assert np.array_equal(q.packed, plain.packed)
    assert q.absmax.dtype == np.uint8 and q.absmax.shape == (300, 16)
    codes, nested = quantize_absmax(plain.absmax.reshape(-1))
    assert np.array_equal(q.absmax.reshape(-1), codes)
    assert np.array_equal(q.nested.nested_absmax, nested.nested_absmax)
    assert np.float32(q.nested.offset) == np.float32(nested.offset)
    assert np.array_equal(f32_bits(q.float_absmax()), f32_bits(dequantize_absmax(codes, nested)))
    assert q.nbytes == plain.packed.nbytes + 300 * 16 + nested.nbytes
    out = dequantize_weight(q)
    scale = np.repeat(q.float_absmax(), 64, axis=1)[:, :1000]
    assert np.array_equal(f32_bits(out), f32_bits((NF4_CODE[_codes(q)[:, :1000]] * scale).T))
    assert np.abs(out - w).max() <= 0.16 * plain.absmax.max()


def test_double_quant_matches_bitsandbytes():
    torch = pytest.importorskip("torch")
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    w = (np.random.default_rng(4).standard_normal((512, 384)) * 0.02).astype(np.float32)
    q = quantize_weight(w, 64, double_quant=True, rounding="bitsandbytes")
    wt = torch.from_numpy(np.ascontiguousarray(w.T))
    packed, state = bnb_f.quantize_4bit(wt, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert np.array_equal(q.packed.reshape(-1), packed.numpy().reshape(-1))
    assert np.array_equal(q.absmax.reshape(-1), state.absmax.numpy())
    assert np.array_equal(f32_bits(q.nested.nested_absmax), f32_bits(state.state2.absmax.numpy()))
    assert np.array_equal(f32_bits(q.nested.offset), f32_bits(state.offset.numpy()))
    expected = bnb_f.dequantize_4bit(packed, state).numpy()
    assert np.array_equal(f32_bits(dequantize_weight(q)), f32_bits(expected.T))


@pytest.mark.parametrize(
    ("w", "exc"),
    [
        (np.ones((4, 4, 4), np.float32), ValueError),
        (np.ones(64, np.float32), ValueError),
        (np.ones((64, 4), np.int8), TypeError),
        (np.ones((64, 4), bool), TypeError),
    ],
    ids=["3d", "1d", "int8", "bool"],
)
def test_bad_weight(w, exc):
    with pytest.raises(exc, match="layer7"):
        quantize_weight(w, 64, name="layer7")


def test_non_finite_message_names_tensor_and_index():
    w = np.ones((100, 8), np.float32)
    w[3, 5] = np.nan
    with pytest.raises(ValueError, match=r"'fc\.weight'.*flat index 29"):
        quantize_weight(w, 64, name="fc.weight")


@pytest.mark.parametrize("K", [4096, 4000])
def test_memory_stays_below_twice_the_weight(K):
    """Quantizing a 64 MB float32 weight allocates at most twice its size beyond it (the output included)."""
    w = np.random.default_rng(5).standard_normal((K, 16_777_216 // K), dtype=np.float32)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        q = quantize_weight(w, 64)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert q.packed.nbytes == w.size // 2 + (q.k_blocks * 64 - K) * q.N // 2
    assert peak <= 2 * w.nbytes, f"peak extra memory {peak / 2**20:.1f} MiB for a {w.nbytes / 2**20:.0f} MiB weight"
