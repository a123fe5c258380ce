"""The ``outside_reads`` plugin: a read beside the repository is caught and fails the session; the environment's
folders (Python, site-packages, temporary and cache directories, /proc) are not reads outside."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import numpy as np
import pytest
from outside_reads import _GUARD_KEY, OutsideReadGuard

TESTS_DIR = Path(__file__).resolve().parent


def test_this_session_catches_a_read_of_shared_beside_the_repository(request, tmp_path):
    guard = request.config.stash[_GUARD_KEY]
    assert guard.active
    # a file absent even where a real ../shared exists
    missing = Path(guard.repo).parent / "shared" / "oracle" / "no_such_vectors.npz"
    session_reads, guard.reads = guard.reads, []
    try:
        with pytest.raises(OSError):  # the audit event comes before the file system is asked
            np.load(missing)
        caught = guard.reads
        (tmp_path / "inside_tmp.txt").write_text("x")
        (tmp_path / "inside_tmp.txt").read_text()
        np.load(TESTS_DIR / "data" / "nf4_vectors.npz").close()
        not_caught = guard.reads[len(caught) :]
    finally:
        guard.reads = session_reads
    assert caught == [(request.node.nodeid, str(missing))]
    assert not_caught == []


@pytest.fixture
def layout(tmp_path) -> tuple[Path, Path]:
    """``tmp/clone`` (the repository) and ``tmp/neighbour/data.txt`` beside it."""
    clone = tmp_path / "clone"
    clone.mkdir()
    (clone / "inside.txt").write_text("in")
    neighbour = tmp_path / "neighbour"
    neighbour.mkdir()
    (neighbour / "data.txt").write_text("out")
    return clone, neighbour


def test_rule(layout):
    clone, neighbour = layout
    guard = OutsideReadGuard.for_repository(clone)
    assert guard.forbidden == (str(neighbour),)
    assert not guard.is_outside(str(clone / "inside.txt"))
    assert guard.is_outside(str(neighbour / "data.txt"))
    assert guard.is_outside(str(neighbour))
    assert guard.is_outside("/somewhere/else/shared/oracle/nf4_vectors.npz")
    assert not guard.is_outside(str(clone.parent / "created_later" / "x"))  # not there when the session started
    environment = [
        sys.prefix,
        sysconfig.get_paths()["stdlib"] + "/json/__init__.py",
        *site.getsitepackages(),
        "/proc/self/status",
        "/sys/devices/system/cpu/online",
        "/dev/null",
        str(Path.home() / ".cache" / "huggingface" / "x"),
    ]
    for path in environment:
        assert not guard.is_outside(os.path.abspath(path)), path


def test_environment_folders_beside_the_repository_are_allowed(layout):
    """A virtual environment or a cache that happens to lie beside the clone is not a neighbour's data."""
    clone, neighbour = layout
    guard = OutsideReadGuard.for_repository(clone, basetemp=neighbour)
    assert not guard.is_outside(str(neighbour / "data.txt"))


def test_a_folder_holding_the_repository_is_never_allowed(layout):
    """``sys.path`` or the temporary directory may contain the clone: allowing them would allow everything."""
    clone, neighbour = layout
    guard = OutsideReadGuard.for_repository(clone, basetemp=clone.parent)
    assert str(clone.parent) not in guard.allowed
    assert guard.is_outside(str(neighbour / "data.txt"))


def _run_pytest(clone: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "outside_reads",
            "-p",
            "no:cacheprovider",
            "-q",
            "--rootdir",
            str(clone),
            "--basetemp",
            str(tmp_path / "basetemp"),
            str(clone),
        ],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_read_beside_the_repository_fails_the_session(layout, tmp_path):
    clone, _ = layout
    (clone / "test_reads.py").write_text(
        textwrap.dedent(
            """
            import os
            from pathlib import Path

            HERE = Path(__file__).parent

            def test_reads_inside_and_tmp(tmp_path):
                assert (HERE / "inside.txt").read_text() == "in"
                (tmp_path / "t.txt").write_text("t")
                assert (tmp_path / "t.txt").read_text() == "t"

            def test_reads_neighbour():
                assert (HERE.parent / "neighbour" / "data.txt").read_text() == "out"

            def test_lists_neighbour():
                assert os.listdir(HERE.parent / "neighbour") == ["data.txt"]
            """
        )
    )
    proc = _run_pytest(clone, tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    assert "3 passed" in out
    assert "reads outside the repository" in out
    assert f"test_reads.py::test_reads_neighbour: {tmp_path / 'neighbour' / 'data.txt'}" in out
    assert f"test_reads.py::test_lists_neighbour: {tmp_path / 'neighbour'}" in out
    assert "test_reads_inside_and_tmp" not in out


def test_a_session_that_stays_inside_passes(layout, tmp_path):
    clone, _ = layout
    (clone / "test_inside.py").write_text(
        textwrap.dedent(
            """
            import json, tempfile
            from pathlib import Path

            def test_inside(tmp_path):
                assert (Path(__file__).parent / "inside.txt").read_text() == "in"
                with tempfile.TemporaryDirectory() as tmp:
                    (Path(tmp) / "x").write_text("x")
                assert json.loads(Path("/proc/self/stat").read_text().split()[0]) > 0
            """
        )
    )
    proc = _run_pytest(clone, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "reads outside the repository" not in proc.stdout
