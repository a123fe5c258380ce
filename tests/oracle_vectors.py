"""Where the oracle vectors are, their case names, and the bit-level comparison the oracle tests use.

The vectors are ``tests/data/nf4_vectors.npz`` (layout and provenance: ``tests/data/README.md``; written and checked
by ``tools/make_oracle_vectors.py``). The ``oracle`` and ``oracle_cases`` fixtures of ``conftest.py`` load it; a test
module parametrizes its ``case`` argument over the cases with ``pytest_generate_tests = parametrize_cases``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
ORACLE_FILE = REPO_ROOT / "tests" / "data" / "nf4_vectors.npz"


def case_names() -> list[str]:
    """The oracle's case names in file order (one placeholder when the file is missing: the fixture then fails)."""
    if not ORACLE_FILE.exists():
        return ["<oracle missing>"]
    with np.load(ORACLE_FILE) as z:
        return json.loads(str(z["meta_json"]))["cases"]


def parametrize_cases(metafunc) -> None:
    """A ``pytest_generate_tests`` hook: a test with a ``case`` argument runs once per oracle case."""
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", case_names())


def f32_bits(a) -> np.ndarray:
    """``a`` as float32, flattened, as its uint32 bit patterns (so that comparisons are bit-exact, NaN and -0 too)."""
    return np.asarray(a).astype(np.float32).reshape(-1).view(np.uint32)
