"""The C++ and CUDA sources are formatted with the repository's ``.clang-format`` (the ``clang-format`` wheel of the
``test`` extra, pinned so that every machine formats alike)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for pattern in ("*.h", "*.cc", "*.cu") for p in (REPO_ROOT / "custom_ops").rglob(pattern))


def test_there_are_sources_to_check():
    assert len(SOURCES) >= 20, SOURCES


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_source_is_clang_formatted(source):
    clang_format = shutil.which("clang-format")
    if clang_format is None:
        pytest.skip("clang-format is not installed (pip install '.[test]')")
    proc = subprocess.run(
        [clang_format, "--dry-run", "--Werror", f"--style=file:{REPO_ROOT / '.clang-format'}", str(source)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"run: clang-format -i {source.relative_to(REPO_ROOT)}\n{proc.stderr[-2000:]}"
