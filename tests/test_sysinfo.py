"""``onnx_nf4.info()`` and ``onnx-nf4 info``: versions, the library, the CPU kernel set chosen, CUDA support.

The ctypes queries are checked against small stand-in libraries compiled here (one with the kernel-set function
and the CUDA entry point, one without either), so both answers are exercised whatever the real library holds; the
real library is checked for consistency with ``ONNX_NF4_CPU_ISA`` in subprocesses (the choice is made once per
process).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnx_nf4
from onnx_nf4.cli import entry as cli
from onnx_nf4.op import sysinfo
from onnx_nf4.runtime import CustomOpLibraryNotFoundError, custom_op_library

REPO_ROOT = Path(__file__).resolve().parents[1]

STAND_IN_WITH = """
const char* OnnxNF4CpuKernelSet(void) { return "avx2"; }
int onnx_nf4_cuda_matmul(void) { return 0; }
"""
STAND_IN_WITHOUT = "int unrelated_function(void) { return 0; }\n"


def _compile(tmp_path: Path, name: str, source: str) -> str:
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None or sys.platform == "win32":
        pytest.skip("no C compiler for the stand-in library")
    src, lib = tmp_path / f"{name}.c", tmp_path / f"lib{name}.so"
    src.write_text(source)
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(lib), str(src)], check=True, capture_output=True)
    return str(lib)


def _real_library() -> str:
    try:
        return custom_op_library()
    except CustomOpLibraryNotFoundError as err:
        pytest.skip(str(err))


def _info_in_subprocess(**env: str) -> dict:
    """``onnx-nf4 info --json`` in a fresh process with ``env`` added to the environment."""
    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "onnx_nf4", "info", "--json"],
        env={**os.environ, "PYTHONPATH": pythonpath, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_query_library_reads_kernel_set_and_cuda_symbol(tmp_path):
    assert sysinfo.query_library(_compile(tmp_path, "with", STAND_IN_WITH)) == ("avx2", True)


def test_query_library_without_the_functions_says_unknown(tmp_path):
    assert sysinfo.query_library(_compile(tmp_path, "without", STAND_IN_WITHOUT)) == (sysinfo.UNKNOWN, False)


def test_info_reports_versions_and_the_library(monkeypatch, tmp_path):
    lib = _compile(tmp_path, "with", STAND_IN_WITH)
    monkeypatch.setattr(sysinfo, "custom_op_library", lambda: lib)
    monkeypatch.setenv("ONNX_NF4_CPU_ISA", "avx2")
    got = onnx_nf4.info()
    assert isinstance(got, onnx_nf4.SystemInfo)
    assert got.onnx_nf4_version == onnx_nf4.__version__
    assert got.numpy_version == np.__version__
    assert got.onnx_version == onnx.__version__
    assert (got.library_path, got.library_error) == (lib, None)
    assert (got.cpu_kernel_set, got.cuda_kernels, got.cpu_isa_env) == ("avx2", True, "avx2")
    assert set(got.cpu_features) <= set(sysinfo.RELEVANT_CPU_FEATURES)
    ort = pytest.importorskip("onnxruntime")
    assert got.onnxruntime_version == ort.__version__
    assert got.onnxruntime_providers == tuple(ort.get_available_providers())


def test_info_without_library_never_raises(monkeypatch):
    def missing() -> str:
        raise CustomOpLibraryNotFoundError("the onnx_nf4 custom-op library is not built; searched: /x")

    monkeypatch.setattr(sysinfo, "custom_op_library", missing)
    monkeypatch.delenv("ONNX_NF4_CPU_ISA", raising=False)
    got = onnx_nf4.info()
    assert got.library_path is None and "not built" in got.library_error
    assert (got.cpu_kernel_set, got.cuda_kernels, got.cpu_isa_env) == (sysinfo.UNKNOWN, None, None)
    text = sysinfo.format_info(got)
    assert "library:" in text and "not found (the onnx_nf4 custom-op library is not built" in text
    assert "ONNX_NF4_CPU_ISA: (not set)" in text


def test_info_with_unloadable_library(monkeypatch, tmp_path):
    bogus = tmp_path / "libonnx_nf4_ops.so"
    bogus.write_bytes(b"not a shared object")
    monkeypatch.setattr(sysinfo, "custom_op_library", lambda: str(bogus))
    got = onnx_nf4.info()
    assert got.library_path == str(bogus) and got.library_error
    assert "cannot be loaded" in sysinfo.format_info(got)


def test_cli_info_text_and_json(monkeypatch, tmp_path, capsys):
    lib = _compile(tmp_path, "without", STAND_IN_WITHOUT)
    monkeypatch.setattr(sysinfo, "custom_op_library", lambda: lib)
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    lines = dict(line.split(":", 1) for line in text.splitlines())
    assert lines["library"].strip() == lib
    assert lines["CPU kernel set"].strip().startswith("unknown (the library has no OnnxNF4CpuKernelSet")
    assert lines["CUDA kernels"].strip() == "no (CPU-only build)"
    assert lines["onnx_nf4"].strip() == onnx_nf4.__version__
    assert cli.main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(dataclasses.asdict(onnx_nf4.info())))


def test_real_library_kernel_set_follows_the_cap():
    """With ``ONNX_NF4_CPU_ISA=portable`` the library runs the portable kernels (when it can say so)."""
    path = _real_library()
    has_function = sysinfo.query_library(path)[0] != sysinfo.UNKNOWN
    capped = _info_in_subprocess(ONNX_NF4_CPU_ISA="portable")
    assert capped["library_path"] == path and capped["cpu_isa_env"] == "portable"
    assert capped["cpu_kernel_set"] == ("portable" if has_function else sysinfo.UNKNOWN)
    best = _info_in_subprocess()
    if has_function and {"avx2", "fma"} <= set(best["cpu_features"]):
        assert best["cpu_kernel_set"] != "portable"
