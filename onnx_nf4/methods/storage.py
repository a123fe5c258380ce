"""How chosen block scales are stored, and the scales the run time then uses.

A method picks a float32 scale per block; what ``MatMulNF4`` reads may differ from it:

* with double quantization the scales become 8-bit codes (:func:`onnx_nf4.codec.double_quant.quantize_absmax`) and
  decode to ``fl32(fl32(DYNAMIC_CODE[c] * nested_absmax) + offset)``;
* ``com.microsoft::MatMulBnb4`` stores the absmax in the weight's dtype (float16 for a float16 model).

:func:`store_scales` returns both the stored tensors and the decoded scales, so that codes are then chosen with
the scale actually used. With double quantization it also lets each block take the neighbouring 8-bit code
(one above or below the nearest) when that lowers the block's squared error: the nested statistics stay as
computed, so decoding is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..codec.double_quant import NestedAbsmax, dequantize_absmax, quantize_absmax

__all__ = ["StoredScales", "store_scales"]

#: ``errors(scales)``: the squared error of every block (flat, row-major ``[N * k_blocks]``) decoded with the
#: float32 ``scales`` of the same shape.
BlockErrors = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class StoredScales:
    """Block scales as stored in the model.

    Attributes:
        absmax: the ``absmax`` input: float32 ``[N, k_blocks]``, or uint8 codes when ``nested`` is set.
        nested: the double-quantization statistics, or ``None``.
        decoded: float32 ``[N, k_blocks]``, the scales the run time computes from them.
    """

    absmax: np.ndarray
    nested: NestedAbsmax | None
    decoded: np.ndarray


def store_scales(
    scales: np.ndarray,
    *,
    double_quant: bool = False,
    dtype: type = np.float32,
    block_errors: BlockErrors | None = None,
) -> StoredScales:
    """Store ``scales`` (float32 ``[N, k_blocks]``).

    Args:
        scales: the chosen scales (non-negative).
        double_quant: 8-bit quantize them (bitsandbytes' layout, nested blocks of 256).
        dtype: without double quantization, the dtype the absmax is stored in (float32, or float16 for
            ``MatMulBnb4`` on a float16 model); the stored value is the float32 scale rounded to it.
        block_errors: with double quantization, the squared error of blocks at given scales: each block then
            takes whichever of its nearest 8-bit code and the two neighbouring codes gives the lowest error
            (ties to the nearest). ``None`` keeps the nearest code.
    """
    scales = np.asarray(scales, dtype=np.float32)
    if not double_quant:
        stored = scales.astype(dtype)
        return StoredScales(stored, None, stored.astype(np.float32))
    shape = scales.shape
    codes, nested = quantize_absmax(scales.reshape(-1))
    decoded = dequantize_absmax(codes, nested)
    if block_errors is not None:
        best_err = block_errors(decoded)
        for step in (-1, 1):
            candidate = np.clip(codes.astype(np.int16) + step, 0, 255).astype(np.uint8)
            value = dequantize_absmax(candidate, nested)
            err = block_errors(value)
            better = err < best_err
            codes = np.where(better, candidate, codes)
            decoded = np.where(better, value, decoded)
            best_err = np.where(better, err, best_err)
    return StoredScales(codes.reshape(shape), nested, decoded.astype(np.float32).reshape(shape))
