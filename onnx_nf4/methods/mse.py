"""``method="mse"``: per block, the float32 scale minimizing the block's importance-weighted squared error.

The scale of an NF4 block is free: any float32 works at run time. Round-to-nearest uses ``absmax`` (the largest
magnitude decodes exactly, everything else pays for it). A plain least-squares search (every weight counting the
same) prefers a smaller scale that clips the block's largest weights to give a finer grid to the many small ones;
in a language model the large weights carry more than their share of the output, and that search measured worse
than round-to-nearest (SmolLM2-135M, issue #22). So the error is weighted, as llama.cpp's IQ4_NL search does:

    E(scale) = sum_i w_i (x_i - fl32(NF4[code_i] * scale))**2,   w_i = sigma2 + x_i**2

with ``sigma2`` the block's mean ``x**2`` (so that small weights still count). (Weighting ``w_i`` further by the
mean square of weight ``i``'s input on calibration data gave GPTQ worse outputs on a synthetic layer, 0.096
against 0.084 relative error: GPTQ's error feedback does that job, so it keeps these data-free scales.)

For every block:

1. for each ``alpha`` of :data:`ALPHAS` (``0.8 .. 1.1`` of the absmax), take the nearest codes at
   ``scale = absmax * alpha`` and the scale that is optimal for those codes (weighted least squares:
   ``d = sum w q x / sum w q**2``), which lowers ``E`` by ``(sum w q x)**2 / sum w q**2``; the largest drop wins;
2. the winner's ``d`` is rounded to float32 and the codes are chosen again at it (nearest: never worse);
3. ``absmax`` itself (round-to-nearest) is kept unless the winner's ``E`` is strictly lower.

So a block's weighted error is never above round-to-nearest's. An all-zero block keeps scale 0. Everything is
vectorized over all the blocks of a chunk (about 2**18 weights at a time, so the extra memory is a few MB
whatever the weight's size).
"""

from __future__ import annotations

import numpy as np

from .grid import reciprocal, scaled_codes

__all__ = ["ALPHAS", "block_errors", "block_weights", "search_scales"]

#: Candidate ``scale / absmax`` ratios whose nearest codes are tried (each then gets its least-squares scale).
ALPHAS: np.ndarray = np.round(np.arange(0.80, 1.1001, 0.01), 6)

_CHUNK_ELEMENTS = 1 << 18


def block_weights(blocks: np.ndarray) -> np.ndarray:
    """The error weights ``sigma2 + x**2`` of ``blocks[nb, bs]`` (float32 ``[nb, bs]``), ``sigma2`` each block's
    mean ``x**2``."""
    square = np.square(blocks, dtype=np.float32)
    return square + square.mean(axis=1, keepdims=True)


def block_errors(blocks: np.ndarray, scales: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Squared error of each block ``blocks[nb, bs]`` (float32) decoded with ``scales[nb]``: float32 ``[nb]``.

    The codes are the nearest NF4 values at that scale (:func:`onnx_nf4.methods.grid.scaled_codes`); ``weights``
    (``[nb, bs]``, e.g. :func:`block_weights`) weight each element's squared error, ``None`` for the plain sum.
    """
    scales = np.asarray(scales, dtype=np.float32)
    _, values = scaled_codes(blocks, reciprocal(scales)[:, None])
    diff = blocks - values * scales[:, None]
    if weights is None:
        return np.einsum("ij,ij->i", diff, diff)
    return np.einsum("ij,ij,ij->i", diff, diff, weights)


def _search(blocks: np.ndarray, absmax: np.ndarray, weights: np.ndarray) -> np.ndarray:
    f32 = np.float32
    best_drop = np.full(absmax.shape, -1.0)
    best_scale = absmax.astype(np.float64)
    for alpha in ALPHAS:
        scale = (absmax * alpha).astype(f32)
        _, values = scaled_codes(blocks, reciprocal(scale)[:, None])
        wq = weights * values
        sum_qx = np.einsum("ij,ij->i", wq, blocks, dtype=np.float64)
        sum_q2 = np.einsum("ij,ij->i", wq, values, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            drop = np.where(sum_q2 > 0, sum_qx * sum_qx / sum_q2, 0.0)
            scale_ls = np.where(sum_q2 > 0, sum_qx / sum_q2, 0.0)
        better = (drop > best_drop) & (scale_ls > 0)
        best_drop = np.where(better, drop, best_drop)
        best_scale = np.where(better, scale_ls, best_scale)
    candidate = best_scale.astype(f32)
    keep_absmax = block_errors(blocks, candidate, weights) >= block_errors(blocks, absmax, weights)
    return np.where(keep_absmax, absmax, candidate).astype(f32)


def search_scales(blocks: np.ndarray) -> np.ndarray:
    """The weighted-error-minimizing scale of each block of ``blocks[nb, bs]`` (float32): float32 ``[nb]``.

    See the module docstring for the weights and the search. The scale is the block's absmax exactly when no
    candidate has a strictly lower weighted error; it may exceed the absmax (the codes then stop short of +-1).
    """
    blocks = np.asarray(blocks, dtype=np.float32)
    nb, bs = blocks.shape
    scales = np.empty(nb, dtype=np.float32)
    rows = max(1, _CHUNK_ELEMENTS // max(1, bs))
    for start in range(0, nb, rows):
        part = blocks[start : start + rows]
        scales[start : start + rows] = _search(part, np.abs(part).max(axis=1), block_weights(part))
    return scales
