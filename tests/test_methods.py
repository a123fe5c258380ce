"""The quantization methods on synthetic weights: ``rtn`` bytes, the ``mse`` scale search, GPTQ, storage."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_nf4.codec.blockwise import quantize_blockwise, unpack_nibbles
from onnx_nf4.codec.codebook import NF4_CODE
from onnx_nf4.codec.double_quant import dequantize_absmax, quantize_absmax
from onnx_nf4.codec.layout import dequantize_weight, quantize_weight
from onnx_nf4.methods import METHODS, PreparedHessian, check_method, encode_weight, weight_blocks
from onnx_nf4.methods.gptq import gptq_codes, inverse_hessian_factor, relative_output_error
from onnx_nf4.methods.grid import nf4_codes, reciprocal, scaled_codes
from onnx_nf4.methods.mse import block_errors, block_weights, search_scales
from onnx_nf4.methods.storage import store_scales


def _weight(rng: np.random.Generator, K: int, N: int) -> np.ndarray:
    """A weight with a heavy-tailed spread like a trained layer's (Student t, 5 degrees of freedom)."""
    return (rng.standard_t(5, size=(K, N)) * 0.02).astype(np.float32)


def _codes(q) -> np.ndarray:
    return unpack_nibbles(q.packed, q.packed.size * 2).reshape(q.N, -1)


def test_method_names() -> None:
    assert METHODS == ("rtn", "mse", "gptq")
    assert check_method("mse") == "mse"
    with pytest.raises(ValueError, match="method must be one of"):
        check_method("awq")


@pytest.mark.parametrize("n", [7, 500, 20000])  # both code paths of nf4_codes (search and comparisons)
def test_codes_at_the_absmax_scale_are_the_codec_codes(n: int) -> None:
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n * 64).astype(np.float32).reshape(-1, 64)
    x[0] = 0.0  # an all-zero block: scale 0, code 7
    x[1, :3] = [1e-40, 0.0, -1e-40]  # subnormal weights in an otherwise normal block
    packed, absmax = quantize_blockwise(x, 64)
    codes, values = scaled_codes(x, reciprocal(absmax)[:, None])
    assert np.array_equal(codes.reshape(-1), unpack_nibbles(packed, x.size))
    assert np.array_equal(values, NF4_CODE[codes])
    assert np.array_equal(nf4_codes(np.array([np.nan, -2.0, 2.0], np.float32)), [0, 0, 15])


def test_rtn_is_byte_identical_to_quantize_weight() -> None:
    w = _weight(np.random.default_rng(0), 200, 24)  # K not a multiple of the block
    for dq in (False, True):
        a, b = encode_weight(w, 64, method="rtn", double_quant=dq), quantize_weight(w, 64, double_quant=dq)
        assert a.packed.tobytes() == b.packed.tobytes() and a.absmax.tobytes() == b.absmax.tobytes()


def test_mse_scale_never_loses_to_absmax_and_ties_go_to_absmax() -> None:
    rng = np.random.default_rng(1)
    blocks = weight_blocks(_weight(rng, 512, 64), 64)
    absmax = np.abs(blocks).max(axis=1)
    scales = search_scales(blocks)
    weights = block_weights(blocks)
    rtn, mse = block_errors(blocks, absmax, weights), block_errors(blocks, scales, weights)
    assert np.all(mse <= rtn)  # the weighted error, block by block
    gain = 1 - mse.sum() / rtn.sum()
    assert gain > 0.12, gain  # measured 14.4% lower weighted error on heavy-tailed weights
    plain_gain = 1 - block_errors(blocks, scales).sum() / block_errors(blocks, absmax).sum()
    assert plain_gain > 0.06, plain_gain  # and 7.8% lower plain squared error
    # A block lying exactly on the NF4 grid at its absmax has zero error there: it keeps the absmax.
    on_grid = np.tile(NF4_CODE * np.float32(0.37), 4)[None, :]
    assert search_scales(on_grid)[0] == np.float32(0.37)
    assert search_scales(np.zeros((2, 16), np.float32)).tolist() == [0.0, 0.0]


def test_mse_keeps_the_outliers_a_plain_least_squares_scale_clips() -> None:
    """One large weight among small ones: the weighted search keeps it, where an unweighted one would clip it."""
    rng = np.random.default_rng(11)
    blocks = (rng.standard_normal((256, 64)) * 0.01).astype(np.float32)
    blocks[:, 5] = 0.2 * np.sign(rng.standard_normal(256)).astype(np.float32)  # 20 sigma
    scales = search_scales(blocks)
    _, values = scaled_codes(blocks, reciprocal(scales)[:, None])
    outlier_error = np.abs(values[:, 5] * scales - blocks[:, 5])
    assert np.all(outlier_error <= 0.01 * 0.2)
    # The best scale for the plain squared error clips the outlier by far more (coarse search down to 0.5).
    alphas = np.linspace(0.5, 1.0, 51, dtype=np.float32)
    plain = np.stack([block_errors(blocks, np.abs(blocks).max(axis=1) * a) for a in alphas])
    clipped = np.abs(blocks).max(axis=1) * alphas[np.argmin(plain, axis=0)]
    assert np.median(np.abs(blocks[:, 5]) - clipped) > 0.03 * 0.2  # measured 0.04 * 0.2


def test_mse_weight_error_is_lower_and_padding_codes_are_zero() -> None:
    w = _weight(np.random.default_rng(2), 100, 16)  # K = 100: the second block of each column is padded
    q = encode_weight(w, 64, method="mse")
    assert q.absmax.dtype == np.float32 and q.packed.shape == (16, 2, 32)
    assert np.all(_codes(q)[:, 100:] == 7)
    err_mse = np.linalg.norm(dequantize_weight(q) - w)
    err_rtn = np.linalg.norm(dequantize_weight(quantize_weight(w, 64)) - w)
    assert err_mse < 0.97 * err_rtn


def test_mse_codes_are_chosen_with_the_double_quantized_scale() -> None:
    w = _weight(np.random.default_rng(3), 1024, 32)
    q = encode_weight(w, 64, method="mse", double_quant=True)
    assert q.absmax.dtype == np.uint8 and q.nested is not None
    decoded = q.float_absmax()
    blocks = weight_blocks(w, 64)
    codes, _ = scaled_codes(blocks, reciprocal(decoded.reshape(-1))[:, None])
    assert np.array_equal(codes.reshape(32, -1), _codes(q))  # the nearest codes at the scale the op uses
    # ... which beats codes chosen for the float32 scales and then decoded with the 8-bit ones.
    scales = search_scales(blocks)
    naive, _ = scaled_codes(blocks, reciprocal(scales)[:, None])
    naive_err = np.sum((blocks - NF4_CODE[naive] * decoded.reshape(-1, 1)) ** 2)
    assert np.sum(block_errors(blocks, decoded.reshape(-1))) < naive_err
    err_dq = np.linalg.norm(dequantize_weight(q) - w)
    err_rtn_dq = np.linalg.norm(dequantize_weight(quantize_weight(w, 64, double_quant=True)) - w)
    assert err_dq < 0.97 * err_rtn_dq


def test_stored_scales_in_float16_and_the_neighbouring_8_bit_codes() -> None:
    scales = np.array([[0.013, 0.0271], [0.0399, 0.004]], np.float32)
    stored = store_scales(scales, dtype=np.float16)
    assert stored.absmax.dtype == np.float16 and np.array_equal(stored.decoded, scales.astype(np.float16))
    nearest = store_scales(scales, double_quant=True)
    codes, nested = quantize_absmax(scales.reshape(-1))
    assert np.array_equal(nearest.absmax.reshape(-1), codes)
    # An error function preferring the largest scale moves each code up by one where that is possible.
    up = store_scales(scales, double_quant=True, block_errors=lambda s: -s)
    assert np.array_equal(up.absmax.reshape(-1), np.minimum(codes.astype(int) + 1, 255))
    assert np.array_equal(up.decoded.reshape(-1), dequantize_absmax(up.absmax.reshape(-1), nested))


def test_inverse_hessian_factor() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((50, 300))  # fewer rows than K: H is singular, damping makes it definite
    h = x.T @ x
    u = inverse_hessian_factor(h, 0.01)
    damped = h + 0.01 * np.mean(np.diag(h)) * np.eye(300)
    assert np.allclose(u, np.triu(u)) and np.all(np.diag(u) > 0)
    assert np.allclose(u.T @ u, np.linalg.inv(damped), rtol=1e-7, atol=1e-12)
    h[5, :] = h[:, 5] = 0  # a dead input
    assert np.all(np.isfinite(inverse_hessian_factor(h)))
    with pytest.raises(ValueError, match="square"):
        inverse_hessian_factor(np.zeros((3, 4)))


def test_gptq_with_uncorrelated_inputs_is_nearest_rounding() -> None:
    """A diagonal H moves no error between rows: GPTQ then gives the mse codes, in any order."""
    rng = np.random.default_rng(5)
    w = _weight(rng, 256, 8)
    h = np.diag(rng.uniform(0.5, 2.0, 256))
    mse = encode_weight(w, 64, method="mse")
    for act_order in (False, True):
        q = encode_weight(w, 64, method="gptq", hessian=h, act_order=act_order)
        assert q.packed.tobytes() == mse.packed.tobytes() and q.absmax.tobytes() == mse.absmax.tobytes()


def _correlated_inputs(rng: np.random.Generator, rows: int, K: int) -> np.ndarray:
    mixing = rng.standard_normal((K, K)) / np.sqrt(K) + np.eye(K)
    scale = np.exp(rng.standard_normal(K))  # channels of very different magnitude, as after a LayerNorm
    return (rng.standard_normal((rows, K)) @ mixing * scale).astype(np.float32)


def test_gptq_lowers_the_output_error() -> None:
    rng = np.random.default_rng(6)
    K, N = 256, 64
    w = _weight(rng, K, N)
    x = _correlated_inputs(rng, 2048, K)
    h = x.astype(np.float64).T @ x
    errors = {}
    for label, q in {
        "rtn": encode_weight(w, 64),
        "mse": encode_weight(w, 64, method="mse"),
        "gptq": encode_weight(w, 64, method="gptq", hessian=h, act_order=False),
        "gptq act-order": encode_weight(w, 64, method="gptq", hessian=h),
    }.items():
        wq = dequantize_weight(q)
        errors[label] = relative_output_error(w, wq, h)
        direct = np.linalg.norm(x.astype(np.float64) @ (w - wq)) / np.linalg.norm(x.astype(np.float64) @ w)
        assert errors[label] == pytest.approx(direct, rel=1e-4)
    # Measured (damping 0.1): rtn 0.1034, mse 0.0993, gptq 0.0860, gptq act-order 0.0732.
    assert errors["mse"] < 0.97 * errors["rtn"]
    assert errors["gptq"] < 0.89 * errors["mse"]
    assert errors["gptq act-order"] < 0.76 * errors["mse"]


def test_gptq_codes_validate_shapes() -> None:
    w = np.zeros((64, 4), np.float32)
    with pytest.raises(ValueError, match="scales have shape"):
        gptq_codes(w, PreparedHessian(np.eye(64)), np.ones((4, 2), np.float32), 64)
    with pytest.raises(ValueError, match="K = 64"):
        gptq_codes(w, PreparedHessian(np.eye(32)), np.ones((4, 1), np.float32), 64)
    with pytest.raises(ValueError, match="needs the Hessian"):
        encode_weight(w, 64, method="gptq")
    with pytest.raises(ValueError, match="expected 64 x 64"):
        encode_weight(w, 64, method="gptq", hessian=np.eye(32))
    with pytest.raises(ValueError, match="not finite"):
        encode_weight(np.full((64, 4), np.nan, np.float32), 64, method="mse")
