"""``tools/example.py``, the main job on the bundled example, runs end to end, reports sensible numbers, keeps its
models in ``./onnx_nf4_example`` and ends with ``onnx-nf4`` commands that work on them."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CLI_PREFIXES = ("onnx-nf4 ", "python -m onnx_nf4 ")


def table_row(stdout: str, label: str) -> list[str]:
    """The cells of the results table row of model ``label`` (columns separated by two or more spaces)."""
    line = next(line for line in stdout.splitlines() if re.match(rf"{re.escape(label)}\s{{2,}}", line))
    return re.split(r"\s{2,}", line.strip())


def next_commands(stdout: str) -> list[list[str]]:
    """The command lines of the example's last section (after the ``== next:`` heading), as argument lists."""
    section = stdout.split("\n== next:", 1)[1].splitlines()[1:]
    return [shlex.split(line) for line in section if line.startswith(CLI_PREFIXES)]


def cli_args(command: list[str]) -> list[str]:
    """The arguments of a printed ``onnx-nf4 ...`` or ``python -m onnx_nf4 ...`` command."""
    return command[1:] if command[0] == "onnx-nf4" else command[3:]


def run_cli(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """A printed command, run with this interpreter and this checkout's ``onnx_nf4``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "onnx_nf4", *cli_args(command)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
        check=False,
    )


@pytest.mark.slow
def test_example_runs_and_reports_sizes_accuracy_and_search(minilm, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "example.py")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    work = tmp_path / "onnx_nf4_example"  # the default folder, in the current directory
    assert {p.name for p in work.glob("*.onnx")} == {"minilm_fp32.onnx", "minilm_nf4.onnx", "minilm_bnb4.onnx"}
    # Step 2: the CLI's per-layer report and totals.
    assert "quantized 37 layer(s) to NF4, format onnx_nf4, block size 64 (embedding tables 32)" in out
    assert "skipped 14 layer(s):" in out  # 12 MatMuls of two activations, the position and token-type tables
    # Step 3: one row per model: model, layers, runtime, file, bits/weight, cos min, cos mean, run s.
    fp32 = table_row(out, "float32")
    assert fp32[1:3] == ["MatMul", "onnxruntime"]
    assert float(fp32[6]) == pytest.approx(1.0, abs=1e-6)
    for label, op in (("NF4", "onnx_nf4::MatMulNF4"), ("NF4 (com.microsoft)", "com.microsoft::MatMulBnb4")):
        row = table_row(out, label)
        assert row[1] == op
        # 36 MatMuls (10616832 weights) at 4.5 bits (block 64), the word embedding (11720448) at 5 (block 32)
        assert float(row[4]) == pytest.approx((10616832 * 4.5 + 11720448 * 5) / (10616832 + 11720448), abs=1e-3)
        assert 0.9 <= float(row[5]) <= float(row[6]) <= 1.0
        assert float(row[6]) >= 0.97
    # Step 4: the semantic search prints both answers per query and how often they agree.
    assert out.count("query: ") == 6
    agree_line = next(line for line in out.splitlines() if line.startswith("NF4 finds the same nearest sentence"))
    agree, total = (int(x) for x in agree_line.split(" for ")[1].split()[0].split("/"))
    assert total == 6
    assert agree >= total - 1

    # Step 5: where the models are, and commands to try on them that work as printed.
    assert "\n== next: the models are in onnx_nf4_example/" in out
    commands = next_commands(out)
    assert [cli_args(command)[0] for command in commands] == [
        "inspect",
        "quantize",
        "inspect",
        "dequantize",
        "quantize",
    ]
    assert "--double-quant" in commands[1]
    results = [run_cli(command, tmp_path) for command in commands]
    for command, result in zip(commands, results, strict=True):
        assert result.returncode == 0, (command, result.stderr[-2000:])
    assert "4.762 bits per weight" in results[0].stdout  # MatMuls at block 64, the word embedding at 32
    assert "double quantization" in results[1].stdout
    assert "com.microsoft" in results[2].stdout
    assert (work / "minilm_nf4_dq.onnx").exists() and (work / "minilm_nf4_dequantized.onnx").exists()
    assert "usage: onnx-nf4 quantize" in results[4].stdout


@pytest.fixture(scope="module")
def example(minilm):
    """``tools/example.py`` as a module."""
    spec = importlib.util.spec_from_file_location("example", REPO_ROOT / "tools" / "example.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_work_dir_is_visible_by_default_and_can_be_changed(example, tmp_path, monkeypatch):
    assert example.build_parser().parse_args([]).work_dir == Path("onnx_nf4_example")
    assert example.build_parser().parse_args(["--work-dir", "models"]).work_dir == Path("models")
    monkeypatch.chdir(tmp_path)
    assert example.shown_path(Path("onnx_nf4_example") / "a.onnx") == "onnx_nf4_example/a.onnx"
    elsewhere = tmp_path.parent / "other dir" / "a.onnx"
    assert example.shown_path(elsewhere) == shlex.quote(str(elsewhere))  # absolute, quoted for the shell
