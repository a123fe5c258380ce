"""The one error metric of the package: the relative RMS error ``rms(W - Wq) / rms(W)``.

Used by the quantization report (:attr:`onnx_nf4.report.LayerReport.rel_rms_error`) and by the bitsandbytes
state-dict export (to check that a layer maps onto the right float weight). Sums of squares are taken in float64
over chunks of about a million elements, so the result never overflows (weights near the float32 limit included)
and the extra memory stays a few MB whatever the weight's size.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from .layout import QuantizedWeight, dequantize_weight
from .native_codec import ErrorSums

__all__ = ["ErrorSums", "nf4_error_sums", "nf4_rel_rms_error", "rel_rms_error"]

_CHUNK_ELEMENTS = 1 << 20


def _sums(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> ErrorSums:
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
    return _sums(pairs).rel_rms_error


def rel_rms_error(w: np.ndarray, wq: np.ndarray) -> float:
    """``rms(w - wq) / rms(w)`` for two arrays of the same shape (0 when both are all zero, inf when only ``w``
    is)."""
    if w.shape != wq.shape:
        raise ValueError(f"shapes differ: {list(w.shape)} and {list(wq.shape)}")
    w2 = w.reshape(w.shape[0], -1) if w.ndim > 1 else w.reshape(1, -1)
    wq2 = wq.reshape(w2.shape)
    rows = max(1, _CHUNK_ELEMENTS // max(1, w2.shape[1]))
    return _ratio((w2[r : r + rows], wq2[r : r + rows]) for r in range(0, w2.shape[0], rows))


def nf4_rel_rms_error(w: np.ndarray, q: QuantizedWeight) -> float:
    """:func:`rel_rms_error` of ``w[K, N]`` and the weight ``q`` stands for, decoding ``q`` a few columns at a
    time (never a decoded copy of the whole weight)."""
    return nf4_error_sums(w, q).rel_rms_error


def nf4_error_sums(w: np.ndarray, q: QuantizedWeight) -> ErrorSums:
    """The :class:`ErrorSums` behind :func:`nf4_rel_rms_error` (the compiled encoder returns the same sums from its
    single pass over ``w``, :func:`onnx_nf4.layout.quantize_weight_and_error`)."""
    absmax = q.float_absmax()
    cols = max(1, _CHUNK_ELEMENTS // max(1, q.K))

    def pairs() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for n0 in range(0, q.N, cols):
            n1 = min(n0 + cols, q.N)
            part = QuantizedWeight(q.K, n1 - n0, q.block_size, q.packed[n0:n1], absmax[n0:n1])
            yield w[:, n0:n1], dequantize_weight(part)

    return _sums(pairs())
