"""The numpy reference of MatMulNF4 against the spec: an independent decode and a float64 product."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from models import activations, make_model, tensor_info, weight
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnx_nf4.codec.codebook import NF4_CODE
from onnx_nf4.codec.layout import QuantizedWeight, dequantize_weight, quantize_weight
from onnx_nf4.op.reference import MatMulNF4, matmul_nf4

BF16 = np.dtype(ml_dtypes.bfloat16)
EPS = {np.dtype(np.float32): 2.0**-24, np.dtype(np.float16): 2.0**-11, BF16: 2.0**-8}  # unit roundoff


def spec_decode(q: QuantizedWeight) -> np.ndarray:
    """``W[K, N]`` decoded straight from docs/MatMulNF4.md with explicit bit operations (no library decode)."""
    high, low = q.packed >> 4, q.packed & 0xF
    codes = np.stack([high, low], axis=-1).reshape(q.N, q.k_blocks * q.block_size)[:, : q.K]
    if q.nested is None:
        scales = q.absmax.astype(np.float32)
    else:
        flat = np.arange(q.N * q.k_blocks)
        nested = q.nested
        prod = (nested.code[q.absmax.reshape(-1)] * nested.nested_absmax[flat // nested.block_size]).astype(np.float32)
        scales = (prod + np.float32(nested.offset)).astype(np.float32).reshape(q.N, q.k_blocks)
    per_element = np.repeat(scales, q.block_size, axis=1)[:, : q.K]
    return (NF4_CODE[codes] * per_element).astype(np.float32).T


def quantized_inputs(q: QuantizedWeight) -> dict:
    if q.nested is None:
        return {"B": q.packed, "absmax": q.absmax}
    return {
        "B": q.packed,
        "absmax": q.absmax,
        "nested_absmax": q.nested.nested_absmax,
        "nested_code": q.nested.code,
        "absmax_offset": np.array(q.nested.offset, np.float32),
    }


def assert_matches_float64(y: np.ndarray, a: np.ndarray, w: np.ndarray, bias: np.ndarray | None) -> None:
    """``y`` equals ``a @ w + bias`` (float64) within float32 rounding of a length-K dot plus rounding to T."""
    a64, w64 = a.astype(np.float64), w.astype(np.float64)
    expected = a64 @ w64 + (0 if bias is None else bias.astype(np.float64))
    magnitude = np.abs(a64) @ np.abs(w64) + (0 if bias is None else np.abs(bias.astype(np.float64)))
    K = a.shape[-1]
    tol = (K + 2) * EPS[np.dtype(np.float32)] * magnitude + EPS[y.dtype] * np.abs(expected) + 1e-30
    assert y.shape == expected.shape
    np.testing.assert_array_less(np.abs(y.astype(np.float64) - expected), tol)


CASES = [
    # (a_shape, K, N, block_size, dtype, double_quant, bias)
    pytest.param((4, 128), 128, 64, 64, np.float32, False, False, id="plain"),
    pytest.param((3, 100), 100, 24, 64, np.float32, False, True, id="K%bs!=0-bias"),
    pytest.param((2, 40), 40, 8, 64, np.float32, False, False, id="K<bs"),
    pytest.param((1, 256), 256, 48, 128, np.float32, False, False, id="M=1"),
    pytest.param((5, 96), 96, 1, 32, np.float32, False, True, id="N=1"),
    pytest.param((2, 3, 64), 64, 40, 16, np.float32, False, True, id="3-D-A"),
    pytest.param((64,), 64, 24, 64, np.float32, False, False, id="1-D-A"),
    pytest.param((0, 64), 64, 8, 64, np.float32, False, False, id="zero-rows"),
    pytest.param((3, 200), 200, 40, 64, np.float16, False, True, id="fp16"),
    pytest.param((2, 2, 130), 130, 16, 64, BF16, False, True, id="bf16"),
    pytest.param((3, 1000), 1000, 300, 64, np.float32, True, True, id="double-quant"),
    pytest.param((2, 70), 70, 600, 16, np.float16, True, False, id="double-quant-fp16-many-nested-blocks"),
]


@pytest.mark.parametrize(("a_shape", "K", "N", "block_size", "dtype", "double_quant", "with_bias"), CASES)
def test_reference_matches_independent_product(a_shape, K, N, block_size, dtype, double_quant, with_bias):
    w = weight((K, N), seed=K + N)
    w[: min(K, block_size), 0] = 0.0  # a zero block (absmax 0)
    q = quantize_weight(w, block_size, double_quant=double_quant)
    w_spec = spec_decode(q)
    np.testing.assert_array_equal(w_spec.view(np.uint32), dequantize_weight(q).view(np.uint32))
    assert not w_spec[: min(K, block_size), 0].any()
    a = activations(a_shape, seed=K).astype(dtype)
    bias = weight((N,), seed=7).astype(dtype) if with_bias else None
    y = matmul_nf4(a, **quantized_inputs(q), bias=bias, K=K, N=N, block_size=block_size)
    assert y.dtype == a.dtype
    assert_matches_float64(y, a.astype(np.float32), w_spec, None if bias is None else bias.astype(np.float32))


def test_padding_codes_do_not_contribute():
    K, N, bs = 100, 16, 64
    q = quantize_weight(weight((K, N)), bs)
    scrambled = q.packed.copy()
    pad = scrambled[:, -1, (K % bs) // 2 :]  # bytes holding only padding elements (K % bs is even)
    pad[...] = np.random.default_rng(0).integers(0, 256, pad.shape, dtype=np.uint8)
    a = activations((3, K))
    y = matmul_nf4(a, q.packed, q.absmax, K=K, N=N, block_size=bs)
    y_scrambled = matmul_nf4(a, scrambled, q.absmax, K=K, N=N, block_size=bs)
    np.testing.assert_array_equal(y, y_scrambled)


def test_bias_is_added_in_float32_then_rounded_once():
    K, N, bs = 64, 8, 64
    q = quantize_weight(weight((K, N)), bs)
    a = activations((4, K)).astype(np.float16)
    bias = weight((N,), seed=3).astype(np.float16)
    y = matmul_nf4(a, q.packed, q.absmax, bias=bias, K=K, N=N, block_size=bs)
    acc = a.astype(np.float32) @ dequantize_weight(q)
    np.testing.assert_array_equal(y, (acc + bias.astype(np.float32)).astype(np.float16))


def _valid(K=100, N=8, bs=64, double_quant=False):
    q = quantize_weight(weight((K, N)), bs, double_quant=double_quant)
    return q, activations((2, K)), quantized_inputs(q)


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (lambda a, i: (a[:, :-1], i), ValueError, "last dimension of 'A' is 99, but K=100"),
        (lambda a, i: (a.astype(np.float64), i), TypeError, "input 'A' has dtype float64"),
        (lambda a, i: (np.float32(1.0), i), ValueError, "rank >= 1"),
        (lambda a, i: (a, {**i, "B": i["B"].astype(np.int8)}), TypeError, "input 'B' has dtype int8"),
        (lambda a, i: (a, {**i, "B": i["B"].reshape(8, -1)}), ValueError, "input 'B' has shape [8, 64]"),
        (lambda a, i: (a, {**i, "absmax": i["absmax"].T}), ValueError, "input 'absmax' has shape [2, 8]"),
        (lambda a, i: (a, {**i, "absmax": i["absmax"].astype(np.float16)}), TypeError, "'absmax' has dtype"),
        (lambda a, i: (a, {**i, "bias": np.zeros(7, np.float32)}), ValueError, "input 'bias' has shape [7]"),
        (lambda a, i: (a, {**i, "bias": np.zeros(8, np.float16)}), TypeError, "'bias' has dtype float16"),
        (lambda a, i: (a, {**i, "nested_code": np.zeros(256, np.float32)}), ValueError, "must be omitted"),
    ],
)
def test_reference_rejects_invalid_inputs(change, error, message):
    _, a, inputs = _valid()
    a, inputs = change(a, inputs)
    with pytest.raises(error, match="MatMulNF4") as info:
        matmul_nf4(a, **inputs, K=100, N=8, block_size=64)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda i: {k: v for k, v in i.items() if k != "absmax_offset"}, "absmax_offset missing"),
        (lambda i: {**i, "nested_absmax": np.zeros(3, np.float32)}, "'nested_absmax' has shape [3]"),
        (lambda i: {**i, "nested_code": np.zeros(255, np.float32)}, "'nested_code' has shape [255]"),
        (lambda i: {**i, "absmax_offset": np.zeros(2, np.float32)}, "'absmax_offset' has shape [2]"),
    ],
)
def test_reference_rejects_invalid_double_quant_inputs(change, message):
    _, a, inputs = _valid(double_quant=True)
    with pytest.raises(ValueError, match="MatMulNF4") as info:
        matmul_nf4(a, **change(inputs), K=100, N=8, block_size=64)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("attrs", "message"),
    [
        ({"K": 100, "N": 8, "block_size": 48}, "power of two"),
        ({"K": 100, "N": 8, "block_size": 8192}, "power of two"),
        ({"K": 0, "N": 8, "block_size": 64}, "K and N must be >= 1"),
        ({"K": 100, "N": 8, "block_size": 64, "nested_block_size": 24}, "nested_block_size"),
    ],
)
def test_reference_rejects_invalid_attributes(attrs, message):
    _, a, inputs = _valid(double_quant="nested_block_size" in attrs)
    with pytest.raises(ValueError, match=message):
        matmul_nf4(a, **inputs, **attrs)


def _nf4_model(q: QuantizedWeight, dtype, with_bias: bool, a_shape) -> tuple[onnx.ModelProto, dict]:
    inputs = quantized_inputs(q)
    names = ["A", "B", "absmax"]
    if q.nested is not None:
        names += ["nested_absmax", "nested_code", "absmax_offset"]
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in inputs.items()]
    if with_bias:
        names += [""] * (6 - len(names)) + ["bias"]
        inits.append(numpy_helper.from_array(weight((q.N,), seed=9).astype(dtype), "bias"))
    attrs = {"K": q.K, "N": q.N, "block_size": q.block_size}
    node = helper.make_node("MatMulNF4", names, ["Y"], domain="onnx_nf4", **attrs)
    model = make_model(
        [node],
        [tensor_info("A", dtype, a_shape)],
        [tensor_info("Y", dtype, [*a_shape[:-1], q.N])],
        inits,
        opsets=[("onnx_nf4", 1)],
    )
    return model, {i.name: numpy_helper.to_array(i) for i in inits}


@pytest.mark.parametrize(
    ("dtype", "double_quant", "with_bias"),
    [(np.float32, False, True), (np.float16, True, True), (np.float32, True, False), (BF16, False, True)],
)
def test_reference_evaluator_runs_the_op(dtype, double_quant, with_bias):
    q = quantize_weight(weight((96, 20)), 32, double_quant=double_quant)
    model, arrays = _nf4_model(q, dtype, with_bias, ["batch", "seq", 96])
    a = activations((2, 3, 96)).astype(dtype)
    (y,) = ReferenceEvaluator(model, new_ops=[MatMulNF4]).run(None, {"A": a})
    expected = matmul_nf4(
        a, **{k: v for k, v in arrays.items() if k != "bias"}, bias=arrays.get("bias"), K=96, N=20, block_size=32
    )
    assert y.dtype == dtype
    np.testing.assert_array_equal(y, expected)


def test_reference_evaluator_reports_a_shape_error():
    q = quantize_weight(weight((96, 20)), 32)
    model, _ = _nf4_model(q, np.float32, False, ["M", 96])
    with pytest.raises(ValueError, match="last dimension of 'A' is 95, but K=96"):
        ReferenceEvaluator(model, new_ops=[MatMulNF4]).run(None, {"A": activations((2, 95))})
