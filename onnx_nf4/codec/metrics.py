"""The one error metric of the package: the relative RMS error ``rms(W - Wq) / rms(W)``.

Used by the quantization report (:attr:`onnx_nf4.passes.report.LayerReport.rel_rms_error`) and by the bitsandbytes
state-dict export (through :func:`onnx_nf4.codec.layout.nf4_rel_rms_error`, to check that a layer maps onto the
right float weight). Sums of squares are taken in float64 over chunks of about a million elements, so the result never
overflows (weights near the float32 limit included) and the extra memory stays a few MB whatever the weight's size.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .native import ErrorSums

__all__ = ["CHUNK_ELEMENTS", "ErrorSums", "error_sums", "rel_rms_error"]

#: Elements per chunk of the float64 sums (bounds the temporary memory).
CHUNK_ELEMENTS = 1 << 20


def error_sums(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> ErrorSums:
    """``sum((ref - approx)^2)`` and ``sum(ref^2)`` over the chunk pairs, in float64."""
    num = den = 0.0
    for ref, approx in pairs:
        ref = np.asarray(ref, dtype=np.float64).ravel()
        diff = ref - np.asarray(approx, dtype=np.float64).ravel()
        num += float(np.dot(diff, diff))
        den += float(np.dot(ref, ref))
    return ErrorSums(num, den)


def _ratio(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> float:
    """``sqrt(sum((ref - approx)^2) / sum(ref^2))`` over the chunk pairs (0 when both are all zero, inf when only
    ``ref`` is)."""
    return error_sums(pairs).rel_rms_error


def rel_rms_error(w: np.ndarray, wq: np.ndarray) -> float:
    """``rms(w - wq) / rms(w)`` for two arrays of the same shape (0 when both are all zero, inf when only ``w``
    is)."""
    if w.shape != wq.shape:
        raise ValueError(f"shapes differ: {list(w.shape)} and {list(wq.shape)}")
    w2 = w.reshape(w.shape[0], -1) if w.ndim > 1 else w.reshape(1, -1)
    wq2 = wq.reshape(w2.shape)
    rows = max(1, CHUNK_ELEMENTS // max(1, w2.shape[1]))
    return _ratio((w2[r : r + rows], wq2[r : r + rows]) for r in range(0, w2.shape[0], rows))
