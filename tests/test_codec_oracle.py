"""The flat codec against every oracle vector (onnxruntime and bitsandbytes outputs), plus its error paths."""

from __future__ import annotations

import numpy as np
import pytest
from oracle_vectors import case_names, f32_bits, parametrize_cases

from onnx_nf4.codec.blockwise import dequantize_blockwise, quantize_blockwise, unpack_nibbles
from onnx_nf4.codec.codebook import NF4_CODE, NF4_MIDPOINTS_BNB, NF4_THRESHOLDS

BLOCK_SIZES = (64, 128)


pytest_generate_tests = parametrize_cases


def _codes(packed: np.ndarray, n: int) -> np.ndarray:
    return unpack_nibbles(packed, n)


def test_every_case_is_collected(oracle_cases):
    assert case_names() == oracle_cases


@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_default_rounding_matches_onnxruntime(oracle, case, bs):
    packed, absmax = quantize_blockwise(oracle[f"{case}__weight"], bs)
    assert packed.dtype == np.uint8 and absmax.dtype == np.float32
    assert np.array_equal(packed, oracle[f"{case}__ort{bs}__packed"])
    assert np.array_equal(f32_bits(absmax), f32_bits(oracle[f"{case}__ort{bs}__absmax"]))


@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_bitsandbytes_rounding_matches_bitsandbytes(oracle, case, bs):
    packed, absmax = quantize_blockwise(oracle[f"{case}__weight"], bs, rounding="bitsandbytes")
    assert np.array_equal(packed, oracle[f"{case}__bnb{bs}__packed"])
    assert np.array_equal(f32_bits(absmax), f32_bits(oracle[f"{case}__bnb{bs}__absmax"]))


@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_default_codes_differ_from_bitsandbytes_only_at_diff(oracle, case, bs):
    w = oracle[f"{case}__weight"]
    ours = _codes(quantize_blockwise(w, bs)[0], w.size)
    bnb = _codes(oracle[f"{case}__bnb{bs}__packed"], w.size)
    differ = np.flatnonzero(ours != bnb)
    assert np.array_equal(differ, np.sort(oracle[f"{case}__diff{bs}"]))


@pytest.mark.parametrize("bs", BLOCK_SIZES)
@pytest.mark.parametrize("rounding", ["onnxruntime", "bitsandbytes"])
def test_dequantize_roundtrip(oracle, case, bs, rounding):
    w = oracle[f"{case}__weight"]
    packed, absmax = quantize_blockwise(w, bs, rounding=rounding)
    out = dequantize_blockwise(packed, absmax, w.shape, bs)
    assert out.dtype == np.float32 and out.shape == w.shape
    scale = np.repeat(absmax, bs)[: w.size]
    expected = NF4_CODE[_codes(packed, w.size)] * scale
    assert np.array_equal(f32_bits(out), f32_bits(expected))
    normal = scale >= np.float32(1e-37)  # a float32-subnormal absmax has no usable reciprocal
    err = np.abs(out.reshape(-1) - w.reshape(-1).astype(np.float32))[normal]
    assert np.all(err <= np.float32(0.152) * scale[normal] * np.float32(1 + 1e-6))


def test_oracle_tables_equal_codebook(oracle):
    assert np.array_equal(f32_bits(oracle["nf4_code"]), f32_bits(NF4_CODE))
    assert np.array_equal(f32_bits(oracle["ort_thresholds_f32"]), f32_bits(NF4_THRESHOLDS))
    assert np.array_equal(f32_bits(oracle["bnb_cpu_midpoints_f32"]), f32_bits(NF4_MIDPOINTS_BNB))


# The four scaled values whose code depends on the rounding (tests/data/README.md):
# (s, bitsandbytes code, onnxruntime code)
BOUNDARY = [
    (-0.8480963706970215, 0, 1),
    (0.1202552542090416, 9, 8),
    (0.5016634464263916, 12, 13),
    (0.8614784479141235, 14, 15),
]


@pytest.mark.parametrize(("s", "bnb_code", "ort_code"), BOUNDARY, ids=[f"s={b[0]}" for b in BOUNDARY])
def test_documented_boundary_values(s, bnb_code, ort_code):
    block = np.zeros(64, np.float32)
    block[0] = 1.0  # absmax 1: the scaled value is the element itself
    block[1] = np.float32(s)
    assert float(np.float32(s)) == s
    for rounding, expected in (("onnxruntime", ort_code), ("bitsandbytes", bnb_code)):
        codes = _codes(quantize_blockwise(block, 64, rounding=rounding)[0], 64)
        assert codes[1] == expected, rounding


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_non_finite_raises_value_error_naming_tensor(bad, dtype):
    w = np.ones((4, 70), dtype)
    w[2, 33] = bad
    with pytest.raises(ValueError, match=r"model\.layers\.0\.q_proj\.weight"):
        quantize_blockwise(w, 64, name="model.layers.0.q_proj.weight")


@pytest.mark.parametrize(
    "w", [np.ones(64, np.int8), np.ones(64, bool), np.ones(64, np.complex64)], ids=["int8", "bool", "complex64"]
)
def test_non_float_raises_type_error(w):
    with pytest.raises(TypeError, match="w_in"):
        quantize_blockwise(w, 64, name="w_in")


@pytest.mark.parametrize("bs", [0, 8, 48, 8192, 63])
def test_bad_block_size_raises(bs):
    with pytest.raises(ValueError, match="block_size"):
        quantize_blockwise(np.ones(256, np.float32), bs)


def test_bad_rounding_raises():
    with pytest.raises(ValueError, match="rounding"):
        quantize_blockwise(np.ones(64, np.float32), 64, rounding="nearest")


@pytest.mark.parametrize("rounding", ["onnxruntime", "bitsandbytes"])
def test_float64_is_rounded_to_float32_first(rounding):
    w = np.random.default_rng(0).standard_normal((37, 91))
    got = quantize_blockwise(w, 64, rounding=rounding)
    ref = quantize_blockwise(w.astype(np.float32), 64, rounding=rounding)
    assert np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1])


@pytest.mark.parametrize("rounding", ["onnxruntime", "bitsandbytes"])
def test_float16_equals_its_float32_values(rounding):
    w = np.random.default_rng(1).standard_normal((29, 50)).astype(np.float16)
    got = quantize_blockwise(w, 128, rounding=rounding)
    ref = quantize_blockwise(w.astype(np.float32), 128, rounding=rounding)
    assert np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1])


def test_dequantize_checks_absmax_size():
    packed, absmax = quantize_blockwise(np.ones(200, np.float32), 64)
    with pytest.raises(ValueError, match="absmax"):
        dequantize_blockwise(packed, absmax[:-1], 200, 64)
