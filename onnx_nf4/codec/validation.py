"""The rules every NF4 input obeys, checked once at the edge: block sizes, finite float weights, rounding names.

The lowest module of :mod:`onnx_nf4.codec`: it imports nothing of the package, so the compiled encoder's binding
(:mod:`onnx_nf4.codec.native`) and the numpy codec (:mod:`onnx_nf4.codec.blockwise`) raise the same errors.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

__all__ = [
    "NonFiniteWeightError",
    "Rounding",
    "as_float_array",
    "check_block_size",
    "check_finite",
    "check_rounding",
    "is_valid_block_size",
    "is_valid_nested_block_size",
]

#: ``"onnxruntime"``: ``MatMulBnb4Quantizer``'s rounding; ``"bitsandbytes"``: bitsandbytes' CPU ``quantize_4bit``.
Rounding = Literal["onnxruntime", "bitsandbytes"]

_CHECK_CHUNK_ELEMENTS = 1 << 20  # elements tested for finiteness at a time (bounds the temporary mask)
_FLOAT_DTYPES = (np.float32, np.float16, np.float64)


class NonFiniteWeightError(ValueError):
    """A weight holds NaN or +-Inf (or, in float64, a magnitude beyond float32), which NF4 cannot represent."""


def is_valid_block_size(block_size: int) -> bool:
    """Whether ``block_size`` is an NF4 block size: a power of two in [16, 4096]."""
    return 16 <= block_size <= 4096 and block_size & (block_size - 1) == 0


def is_valid_nested_block_size(block_size: int) -> bool:
    """Whether ``block_size`` is a double-quantization block size: a power of two >= 16."""
    return block_size >= 16 and block_size & (block_size - 1) == 0


def check_block_size(block_size: int) -> int:
    """Return ``block_size`` if it is a power of two in [16, 4096], else raise ``ValueError``."""
    bs = int(block_size)
    if bs != block_size or not is_valid_block_size(bs):
        raise ValueError(f"block_size must be a power of two between 16 and 4096, got {block_size!r}")
    return bs


def check_finite(w: np.ndarray, name: str = "weight") -> None:
    """Raise :class:`NonFiniteWeightError` (a ``ValueError``) naming ``name`` if ``w`` holds NaN or +-Inf, or
    (float64) a value beyond float32.

    Checked in chunks along the first axis, so no copy of ``w`` is made even when it is not contiguous.
    """
    w = np.asarray(w)
    if w.ndim == 0:
        w = w.reshape(1)
    if w.size == 0:
        return
    rows = max(1, _CHECK_CHUNK_ELEMENTS // (w.size // w.shape[0]))
    for start in range(0, w.shape[0], rows):
        chunk = w[start : start + rows]
        with np.errstate(over="ignore"):
            ok = np.isfinite(chunk if chunk.dtype != np.float64 else chunk.astype(np.float32))
        if not ok.all():
            index = np.argwhere(~ok)[0]
            index[0] += start
            bad = int(np.ravel_multi_index(tuple(index), w.shape))
            raise NonFiniteWeightError(
                f"tensor {name!r} holds a value that is not finite in float32 ({float(w[tuple(index)])} at flat "
                f"index {bad}); NF4 cannot represent NaN, Inf or magnitudes beyond float32"
            )


def as_float_array(w: np.ndarray, name: str = "weight") -> np.ndarray:
    """``np.asarray(w)`` if it is float16/bfloat16/float32/float64, else raise ``TypeError`` naming ``name``.

    bfloat16 is ``ml_dtypes.bfloat16`` (what ``onnx_ir`` returns for BFLOAT16 tensors); it widens exactly.
    """
    w = np.asarray(w)
    if w.dtype.type not in _FLOAT_DTYPES and w.dtype.name != "bfloat16":
        raise TypeError(f"tensor {name!r} has dtype {w.dtype}; NF4 quantizes float16/bfloat16/float32/float64 only")
    return w


def check_rounding(rounding: str) -> None:
    """Raise ``ValueError`` unless ``rounding`` is ``"onnxruntime"`` or ``"bitsandbytes"``."""
    if rounding not in ("onnxruntime", "bitsandbytes"):
        raise ValueError(f"rounding must be 'onnxruntime' or 'bitsandbytes', got {rounding!r}")
