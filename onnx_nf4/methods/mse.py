"""``method="mse"``: per block, the float32 scale that minimizes the block's squared error (data-free).

The scale of an NF4 block is free: any float32 works at run time. Round-to-nearest uses ``absmax`` (the largest
magnitude decodes exactly, everything else pays for it); a slightly smaller scale usually gives a lower total
error because the grid gets finer where most weights are. For every block the search tries ``scale =
fl32(absmax * alpha)``:

1. a coarse grid of :data:`COARSE_ALPHAS` (``alpha`` from 1 down to 0.5);
2. a fine grid of :data:`FINE_STEPS` around the best coarse ``alpha`` (steps of ``COARSE_STEP / 8``).

Each candidate is scored by the block's squared error ``sum (x - fl32(NF4[code] * scale))**2`` with the codes of
:func:`onnx_nf4.methods.grid.scaled_codes` (the nearest NF4 value of each weight at that scale). The best
candidate wins; ties go to the ``alpha`` closest to 1 (``absmax`` itself when nothing beats it), so a block is never
worse than round-to-nearest. An all-zero block keeps scale 0.

Everything is vectorized over all the blocks of a chunk (about 2**18 weights at a time, so the extra memory is a
few MB whatever the weight's size).
"""

from __future__ import annotations

import numpy as np

from .grid import reciprocal, scaled_codes

__all__ = ["COARSE_ALPHAS", "FINE_STEPS", "block_errors", "search_scales"]

COARSE_STEP = 0.025
#: Coarse candidates, ``alpha = scale / absmax``: 1.0, 0.975, ..., 0.5 (21 values).
COARSE_ALPHAS: np.ndarray = np.round(1.0 - COARSE_STEP * np.arange(21), 6)
#: Offsets of the fine candidates around the best coarse alpha (both sides, steps of ``COARSE_STEP / 8``).
FINE_STEPS: np.ndarray = COARSE_STEP / 8 * np.array([-7, -6, -5, -4, -3, -2, -1, 1, 2, 3, 4, 5, 6, 7])

_CHUNK_ELEMENTS = 1 << 18


def block_errors(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Squared error of each block ``blocks[nb, bs]`` (float32) decoded with ``scales[nb]``: float32 ``[nb]``.

    The codes are the nearest NF4 values at that scale (:func:`onnx_nf4.methods.grid.scaled_codes`).
    """
    scales = np.asarray(scales, dtype=np.float32)
    _, values = scaled_codes(blocks, reciprocal(scales)[:, None])
    diff = blocks - values * scales[:, None]
    return np.einsum("ij,ij->i", diff, diff)


def _search(blocks: np.ndarray, absmax: np.ndarray) -> np.ndarray:
    f32 = np.float32
    best_alpha = np.ones(absmax.shape, dtype=np.float64)
    best_err = block_errors(blocks, absmax)

    def consider(alpha: np.ndarray) -> None:
        nonlocal best_alpha, best_err
        alpha = np.clip(alpha, 1e-3, None)
        err = block_errors(blocks, (absmax * alpha).astype(f32))
        better = (err < best_err) | ((err == best_err) & (alpha > best_alpha))
        best_alpha = np.where(better, alpha, best_alpha)
        best_err = np.where(better, err, best_err)

    for alpha in COARSE_ALPHAS[1:]:
        consider(np.full(absmax.shape, alpha))
    centre = best_alpha.copy()
    for step in FINE_STEPS:
        consider(np.minimum(centre + step, 1.0))
    return (absmax * best_alpha).astype(f32)


def search_scales(blocks: np.ndarray) -> np.ndarray:
    """The error-minimizing scale of each block of ``blocks[nb, bs]`` (float32): float32 ``[nb]``.

    See the module docstring for the search. The scale never exceeds the block's absmax, and equals it exactly
    when no candidate has a strictly lower error.
    """
    blocks = np.asarray(blocks, dtype=np.float32)
    nb, bs = blocks.shape
    scales = np.empty(nb, dtype=np.float32)
    rows = max(1, _CHUNK_ELEMENTS // max(1, bs))
    for start in range(0, nb, rows):
        part = blocks[start : start + rows]
        scales[start : start + rows] = _search(part, np.abs(part).max(axis=1))
    return scales
