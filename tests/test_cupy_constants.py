"""The CuPy path's launch constants are those of ``custom_ops/cuda/matmul_nf4.cu`` (read from the source here)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from onnx_nf4.op import cupy_backend as cb

SOURCE = (Path(__file__).resolve().parents[1] / "custom_ops" / "cuda" / "matmul_nf4.cu").read_text()


def _constants() -> dict[str, int]:
    """Every ``constexpr int``/``int64_t`` name = integer expression of the source, evaluated in order."""
    values: dict[str, int] = {}
    for name, expr in re.findall(r"constexpr\s+(?:int|int64_t)\s+(k\w+)\s*=\s*([^;]+);", SOURCE):
        for known, value in values.items():
            expr = re.sub(rf"\b{known}\b", str(value), expr)
        if re.fullmatch(r"[\d\s*+/()-]+", expr):
            values[name] = int(eval(expr))  # only digits and arithmetic, checked above
    return values


CONSTANTS = _constants()


@pytest.mark.parametrize(
    ("python", "cpp"),
    [
        ("THREADS", "kThreads"),
        ("WARPS", "kWarps"),
        ("MAX_ROW_TILES", "kMaxRowTiles"),
        ("SKINNY_MAX_ROWS", "kSkinnyMaxRows"),
        ("TILE_N", "kTileN"),
        ("TILE_M", "kTileM"),
        ("_FLAG_CODES_VEC16", "kFlagCodesVec16"),
        ("_FLAG_ACT_VEC16", "kFlagActVec16"),
    ],
)
def test_constant_matches_the_cuda_source(python: str, cpp: str):
    assert getattr(cb, python) == CONSTANTS[cpp]


def _tile_chain(expr: str) -> tuple[int, ...]:
    """The tiles of ``p.M <= a ? a : (p.M <= b ? b : c)``: every value after a ``?``, then the last one."""
    return (*(int(v) for v in re.findall(r"\? (\d+)", expr)), int(re.search(r": (\d+)\)*$", expr).group(1)))


def test_row_tiles_match_the_launcher():
    simt = re.search(r"mt = (p\.M <= 1 \? 1 : [^;]+);", SOURCE)
    mma = re.search(r"mt = (p\.M <= 8 \? 8 : [^;]+);", SOURCE)
    assert simt and mma
    assert _tile_chain(simt.group(1)) == cb._SIMT_TILES
    assert _tile_chain(mma.group(1)) == cb._MMA_TILES


def test_k_split_target_matches_the_launcher():
    target = re.search(r"const int64_t target = int64_t\{(\d+)\} \* sm_count;", SOURCE)
    assert target and int(target.group(1)) == cb.WARPS_PER_SM
    # the Python plan's rule, for one case per side of the target
    assert cb._k_split(units=1, row_tiles=1, stretches=64, sm_count=1) == cb.WARPS
    assert cb._k_split(units=16, row_tiles=1, stretches=64, sm_count=1) == 1
