"""The one place where a float weight becomes NF4: :func:`encode_weight`.

Every quantizing path goes through it (the pass for both output formats, hence ``quantize_model``, the CLI and
the torch exporters), so a new way of choosing codes and scales is added here, as a new
:attr:`onnx_nf4.options.QuantizeOptions.method`.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..codec import quantize_blockwise
from ..layout import QuantizedWeight, quantize_weight
from ..options import QuantizeOptions

__all__ = ["as_numpy_float", "encode_flat", "encode_weight"]


def as_numpy_float(tensor: ir.TensorProtocol) -> np.ndarray:
    """A weight tensor as a numpy array the encoders accept: float32/float16 kept, bfloat16 widened exactly."""
    array = tensor.numpy()
    return array.astype(np.float32) if tensor.dtype == ir.DataType.BFLOAT16 else array


def encode_weight(w: np.ndarray, options: QuantizeOptions, *, name: str) -> QuantizedWeight:
    """``w[K, N]`` (float16/32) in the ``MatMulNF4`` layout, by ``options.method`` with ``options.block_size``
    (and double quantization when ``options.double_quant``).

    ``"rtn"``: every element rounds to its nearest NF4 code, each block scaled by its absmax
    (:func:`onnx_nf4.layout.quantize_weight`).

    Raises:
        ValueError: ``w`` holds NaN/Inf (the message names ``name``).
    """
    if options.method == "rtn":
        return quantize_weight(w, options.block_size, double_quant=options.double_quant, name=name)
    raise AssertionError(f"unhandled method {options.method!r}")  # QuantizeOptions admits only METHODS


def encode_flat(w: np.ndarray, options: QuantizeOptions, *, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``w[K, N]`` in ``MatMulBnb4``'s layout: blocks run over ``w.T`` flattened, so a block may span two columns
    when ``K % block_size != 0``. Returns the uint8 codes ``[ceil(N * K / 2)]`` and float32 absmax
    ``[ceil(N * K / block_size)]``.

    When ``K % block_size == 0`` the blocks are those of :func:`encode_weight`, whose bytes are returned.
    """
    K, bs = w.shape[0], options.block_size
    if K % bs == 0:
        q = encode_weight(w, options.replace(double_quant=False), name=name)
        return q.packed.reshape(-1), q.absmax.reshape(-1)
    if options.method != "rtn":
        raise ValueError(
            f"weight {name!r}: method {options.method!r} needs K % block_size == 0 for format com.microsoft "
            f"(K={K}, block_size={bs})"
        )
    return quantize_blockwise(w.T, bs, name=name)
