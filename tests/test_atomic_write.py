"""Atomic output: a quantizer killed while writing, or a full disk, leaves the input intact and no output.

``onnx-nf4 quantize`` writes into a hidden temporary directory ``.<OUT name>.<random>.tmp`` beside ``OUT`` and
renames the finished files into place (:func:`onnx_nf4.model.io.save_model`). The kill test runs the real CLI
on a 285 MB model, watches that directory from this process and sends SIGKILL as soon as a file in it has
bytes, so the process dies in the middle of writing; no hook in the product is involved. A killed process
cannot clean up, so its temporary directory stays behind (hidden, never under ``OUT``'s name).
"""

from __future__ import annotations

import contextlib
import errno
import gc
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from onnx_nf4.model.io import load_model

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tools"))
import make_large_model as generator  # noqa: E402

BIG_MODEL = {"layers": 10, "hidden": 768, "ffn": 2048, "vocab": 8000}  # 285 MB of float32
SMALL_MODEL = {"layers": 2, "hidden": 256, "ffn": 512, "vocab": 1024}  # 4.2 MB of float32


def digests(directory: Path) -> dict[str, str]:
    """File name -> sha256 of every file directly in ``directory``."""
    out = {}
    for path in sorted(directory.iterdir()):
        if path.is_file():
            h = hashlib.sha256()
            with path.open("rb") as f:
                for chunk in iter(lambda f=f: f.read(1 << 22), b""):
                    h.update(chunk)
            out[path.name] = h.hexdigest()
    return out


def temp_dirs(directory: Path, target: str) -> list[Path]:
    return [
        p for p in directory.iterdir() if p.is_dir() and p.name.startswith(f".{target}.") and p.name.endswith(".tmp")
    ]


def kill_while_writing(cmd: list[str], directory: Path, target: str, timeout: float = 300) -> list[int]:
    """Start ``cmd``; SIGKILL it once a file in its temporary output directory (at any depth) holds bytes.

    Returns the sizes of the files it had written. Fails if the process ends before it was caught writing.
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            sizes = []
            for tmp in temp_dirs(directory, target):
                for root, _, files in os.walk(tmp):
                    for name in files:
                        with contextlib.suppress(FileNotFoundError):  # renamed or removed between listing and stat
                            sizes.append(os.stat(os.path.join(root, name)).st_size)
            if any(sizes):
                proc.send_signal(signal.SIGKILL)
                assert proc.wait(timeout=30) == -signal.SIGKILL
                return sizes
            assert proc.poll() is None, f"the quantizer ended before it was caught writing: {proc.stderr.read()}"
            time.sleep(0.0005)
        pytest.fail("the quantizer did not start writing in time")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def quantize_cmd(source: Path, target: Path, *options: str) -> list[str]:
    return [sys.executable, "-m", "onnx_nf4", "quantize", str(source), str(target), "-q", *options]


@pytest.fixture(scope="module")
def big_model(tmp_path_factory) -> Path:
    return generator.make_large_model(tmp_path_factory.mktemp("big") / "model.onnx", **BIG_MODEL).model_path


@pytest.mark.slow
def test_sigkill_while_writing_leaves_the_input_and_no_output(big_model):
    directory = big_model.parent
    before = digests(directory)
    written = kill_while_writing(quantize_cmd(big_model, directory / "out.onnx"), directory, "out.onnx")
    assert any(written)
    assert digests(directory) == before  # input byte-identical, and no new file at all ...
    assert not (directory / "out.onnx").exists() and not (directory / "out.onnx.data").exists()
    for tmp in temp_dirs(directory, "out.onnx"):  # ... only the hidden temporary directory of the killed process
        shutil.rmtree(tmp)


@pytest.mark.slow
def test_sigkill_while_overwriting_the_input_leaves_it_intact(big_model):
    """``OUT == IN`` with ``--external-data``: the new ``model.onnx.data`` is written while the input's file of
    that name is still being read; it replaces it only by a rename once complete."""
    directory = big_model.parent
    before = digests(directory)
    kill_while_writing(quantize_cmd(big_model, big_model, "--external-data"), directory, big_model.name)
    assert digests(directory) == before
    for tmp in temp_dirs(directory, big_model.name):
        shutil.rmtree(tmp)
    model = load_model(big_model)  # and it still loads, with every external tensor in place
    assert len(model.graph.initializers) > 50


# ------------------------------------------------------------------------------------------------ disk full


@pytest.fixture
def small_tmpfs(tmp_path):
    """Mount a 1 MiB tmpfs at ``tmp_path / "full"`` (root only; skipped where mounting is not permitted)."""
    mount_point = tmp_path / "full"
    mount_point.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount_point
    finally:
        _unmount(mount_point)


def _unmount(mount_point: Path) -> None:
    """Unmount, once the test's memory maps of external data are collected; a map that outlives the test (a
    reference cycle the collector has not reached yet) gets a lazy unmount, which detaches the tmpfs at once."""
    gc.collect()
    for _ in range(5):
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode == 0:
            return
        gc.collect()
        time.sleep(0.2)
    subprocess.run(["umount", "--lazy", str(mount_point)], check=True)


def test_disk_full_is_one_line_and_leaves_nothing(tmp_path, small_tmpfs):
    """The output (1.7 MiB) does not fit in 1 MiB: ENOSPC, reported on one line, nothing left behind."""
    model = generator.make_large_model(tmp_path / "in" / "model.onnx", **SMALL_MODEL).model_path
    before = digests(model.parent)
    target = small_tmpfs / "out.onnx"
    proc = subprocess.run(quantize_cmd(model, target), capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnx-nf4: error:"), proc.stderr
    assert os.strerror(errno.ENOSPC) in lines[0] or "No space" in lines[0], lines[0]
    assert list(small_tmpfs.iterdir()) == []  # no output, no temporary directory
    assert digests(model.parent) == before


def test_disk_full_while_overwriting_the_input(small_tmpfs):
    """``OUT == IN`` on a full disk: the API raises ``OSError`` and the input is byte-identical."""
    from onnx_nf4 import quantize_model

    model = generator.make_large_model(small_tmpfs / "model.onnx", layers=1, hidden=64, ffn=256, vocab=1536)
    # 1.01 MB of float32 weights in 1 MiB: the new model (0.39 MB float embedding + 0.09 MB NF4) cannot be
    # written beside it
    before = digests(small_tmpfs)
    with pytest.raises(OSError) as info:
        quantize_model(model.model_path, model.model_path, min_elements=0, external_data=True)
    assert info.value.errno == errno.ENOSPC
    assert digests(small_tmpfs) == before
    assert sorted(p.name for p in small_tmpfs.iterdir()) == sorted(before)
