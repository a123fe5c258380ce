"""The NF4 rounding every method shares: codes of scaled values and the values they decode to.

A weight ``x`` in a block of scale ``scale`` (float32) gets the code ``#{t in NF4_THRESHOLDS : s > t}`` of its
scaled value ``s = fl32(x * fl32(1 / scale))`` (a scale of 0 gives ``s = 0``, code 7). With ``scale = absmax``
this is exactly :mod:`onnx_nf4.codec.blockwise`'s default rounding (onnxruntime's ``MatMulBnb4Quantizer``); with any
other scale it is the nearest NF4 value of ``x / scale`` (``|s| > 1`` saturates to code 0 or 15), ties going to the
lower code. Decoding is ``fl32(NF4_CODE[code] * scale)``, the ``MatMulNF4`` semantics.
"""

from __future__ import annotations

import numpy as np

from ..codec.codebook import NF4_CODE, NF4_THRESHOLDS

__all__ = ["nf4_codes", "reciprocal", "scaled_codes"]

_SEARCH_MAX_SIZE = 8192  # below this many values one searchsorted call beats fifteen comparisons


def reciprocal(scale: np.ndarray) -> np.ndarray:
    """``fl32(1 / scale)`` elementwise, 0 where ``scale`` is 0 (float32, same shape)."""
    scale = np.asarray(scale, dtype=np.float32)
    with np.errstate(divide="ignore", over="ignore"):
        return np.where(scale != 0, np.float32(1) / scale, np.float32(0)).astype(np.float32)


def nf4_codes(scaled: np.ndarray) -> np.ndarray:
    """uint8 codes of float32 scaled values: the count of ``NF4_THRESHOLDS`` strictly below each (NaN: 0).

    Small arrays use one ``np.searchsorted``; large ones fifteen vectorized comparisons, several times faster
    there. Same result.
    """
    scaled = np.asarray(scaled)
    if scaled.size <= _SEARCH_MAX_SIZE:
        codes = np.searchsorted(NF4_THRESHOLDS, scaled, side="left").astype(np.uint8)
        codes[np.isnan(scaled)] = 0
        return codes
    codes = np.zeros(scaled.shape, dtype=np.uint8)
    for bound in NF4_THRESHOLDS:
        codes += scaled > bound
    return codes


def scaled_codes(x: np.ndarray, inv_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes of ``x`` (float32) given broadcastable reciprocal scales, and their NF4 values (float32, unscaled).

    Returns ``(codes, NF4_CODE[codes])``.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        codes = nf4_codes(x * inv_scale)
    return codes, NF4_CODE[codes]
