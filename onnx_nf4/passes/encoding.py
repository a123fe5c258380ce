"""The one place where a float weight becomes NF4: :func:`encode_weight`.

Every quantizing path goes through it (the pass for both output formats, hence ``quantize_model``, the CLI and
the torch exporters), so a new way of choosing codes and scales is added here, as a new
:attr:`onnx_nf4.QuantizeOptions.method`.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..codec import native as native_codec
from ..codec.blockwise import quantize_blockwise
from ..codec.layout import QuantizedWeight, nf4_rel_rms_error, quantize_weight, quantize_weight_and_error
from ..methods import encode_flat_mse
from ..methods import encode_weight as encode_with_method
from .options import QuantizeOptions

__all__ = ["as_numpy_float", "encode_flat", "encode_flat_and_error", "encode_weight", "encode_weight_and_error"]


def as_numpy_float(tensor: ir.TensorProtocol) -> np.ndarray:
    """A weight tensor as a numpy array the encoders accept: float32/float16 kept, bfloat16 widened exactly."""
    array = tensor.numpy()
    return array.astype(np.float32) if tensor.dtype == ir.DataType.BFLOAT16 else array


def encode_weight(w: np.ndarray, options: QuantizeOptions, *, name: str) -> QuantizedWeight:
    """``w[K, N]`` (float16/32) in the ``MatMulNF4`` layout, by ``options.method`` with ``options.block_size``
    (and double quantization when ``options.double_quant``).

    ``"rtn"``: every element rounds to its nearest NF4 code, each block scaled by its absmax
    (:func:`onnx_nf4.codec.layout.quantize_weight`). ``"mse"``: the scale search of :mod:`onnx_nf4.methods.mse`.
    ``"gptq"`` weights come computed (with their layer's calibration statistics) as the pass's ``prequantized``;
    one that reaches this function has no statistics (e.g. a weight used inside a subgraph) and gets ``"mse"``.

    Raises:
        ValueError: ``w`` holds NaN/Inf (the message names ``name``).
    """
    if options.method == "rtn":
        return quantize_weight(w, options.block_size, double_quant=options.double_quant, name=name)
    return encode_with_method(w, options.block_size, method="mse", double_quant=options.double_quant, name=name)


def encode_weight_and_error(w: np.ndarray, options: QuantizeOptions, *, name: str) -> tuple[QuantizedWeight, float]:
    """:func:`encode_weight` and the relative RMS error of ``w`` and the weight the result stands for.

    With ``"rtn"`` and the compiled encoder the error comes from the same pass over ``w``
    (:func:`onnx_nf4.codec.layout.quantize_weight_and_error`); otherwise the result is decoded a few columns at a time
    (:func:`onnx_nf4.codec.layout.nf4_rel_rms_error`).
    """
    if options.method == "rtn":
        q, sums = quantize_weight_and_error(w, options.block_size, double_quant=options.double_quant, name=name)
        assert sums is not None
        return q, sums.rel_rms_error
    q = encode_weight(w, options, name=name)
    return q, nf4_rel_rms_error(w, q)


def encode_flat(w: np.ndarray, options: QuantizeOptions, *, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``w[K, N]`` in ``MatMulBnb4``'s layout: blocks run over ``w.T`` flattened, so a block may span two columns
    when ``K % block_size != 0``. Returns the uint8 codes ``[ceil(N * K / 2)]`` and float32 absmax
    ``[ceil(N * K / block_size)]``.

    When ``K % block_size == 0`` the blocks are those of :func:`encode_weight`, whose bytes are returned. Methods
    other than ``"rtn"`` search the scales of these flat blocks and choose the codes for the scales as
    ``MatMulBnb4`` stores them, in the weight's dtype (``"gptq"`` without statistics: ``"mse"``).
    """
    K, bs = w.shape[0], options.block_size
    if options.method != "rtn":
        return encode_flat_mse(w.T, bs, scale_dtype=w.dtype.type, name=name)
    if K % bs == 0:
        q = encode_weight(w, options.replace(double_quant=False), name=name)
        return q.packed.reshape(-1), q.absmax.reshape(-1)
    return quantize_blockwise(w.T, bs, name=name)


def encode_flat_and_error(
    w: np.ndarray, options: QuantizeOptions, *, name: str
) -> tuple[np.ndarray, np.ndarray, float | None]:
    """:func:`encode_flat`, and the relative RMS error when it comes from the same pass over ``w``: ``"rtn"`` with
    the compiled encoder on a float32 weight (whose absmax ``MatMulBnb4`` stores unrounded); ``None`` otherwise."""
    if options.method == "rtn" and w.dtype == np.float32 and native_codec.use_native("auto"):
        packed, absmax, sums = native_codec.encode_flat(w.T, options.block_size, sums=True, name=name)
        assert sums is not None
        return packed, absmax, sums.rel_rms_error
    packed, absmax = encode_flat(w, options, name=name)
    return packed, absmax, None
