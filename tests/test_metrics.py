"""The one relative RMS error of the package (onnx_nf4.codec.metrics)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from onnx_nf4.codec.layout import dequantize_weight, nf4_rel_rms_error, quantize_weight
from onnx_nf4.codec.metrics import rel_rms_error


def _direct(w: np.ndarray, wq: np.ndarray) -> float:
    w, wq = w.astype(np.float64), wq.astype(np.float64)
    return math.sqrt(np.sum((w - wq) ** 2) / np.sum(w**2))


def test_matches_the_definition_across_chunks():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3000, 700)).astype(np.float32)  # more than one chunk of 2**20 elements
    wq = w + 0.01 * rng.standard_normal(w.shape).astype(np.float32)
    assert rel_rms_error(w, wq) == pytest.approx(_direct(w, wq), rel=1e-12)
    q = quantize_weight(w, 64)
    assert nf4_rel_rms_error(w, q) == pytest.approx(_direct(w, dequantize_weight(q)), rel=1e-12)


def test_huge_weights_neither_overflow_nor_warn():
    w = np.full((64, 64), 3e38, dtype=np.float32)
    w[::2] = -3e38
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rel_rms_error(w, w) == 0.0
        assert rel_rms_error(w, np.zeros_like(w)) == pytest.approx(1.0)
        assert nf4_rel_rms_error(w, quantize_weight(w, 64)) == pytest.approx(0.0, abs=1e-6)


def test_zero_weights():
    zero = np.zeros((8, 4), np.float32)
    assert rel_rms_error(zero, zero) == 0.0
    assert rel_rms_error(zero, np.ones_like(zero)) == math.inf
    with pytest.raises(ValueError, match="shapes differ"):
        rel_rms_error(zero, zero.T)
