"""``tools/example.py``, the main job on the bundled example, runs end to end and reports sensible numbers."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def table_row(stdout: str, label: str) -> list[str]:
    """The cells of the results table row of model ``label`` (columns separated by two or more spaces)."""
    line = next(line for line in stdout.splitlines() if re.match(rf"{re.escape(label)}\s{{2,}}", line))
    return re.split(r"\s{2,}", line.strip())


@pytest.mark.slow
def test_example_runs_and_reports_sizes_accuracy_and_search(minilm, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "example.py"), "--work-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert {p.name for p in tmp_path.glob("*.onnx")} == {"minilm_fp32.onnx", "minilm_nf4.onnx", "minilm_bnb4.onnx"}
    # Step 2: the CLI's per-layer report and totals.
    assert "quantized 36 layer(s) to NF4, format onnx_nf4, block size 64" in out
    assert "skipped 12 layer(s):" in out
    # Step 3: one row per model: model, layers, runtime, file, bits/weight, cos min, cos mean, run s.
    fp32 = table_row(out, "float32")
    assert fp32[1:3] == ["MatMul", "onnxruntime"]
    assert float(fp32[6]) == pytest.approx(1.0, abs=1e-6)
    for label, op in (("NF4", "onnx_nf4::MatMulNF4"), ("NF4 (com.microsoft)", "com.microsoft::MatMulBnb4")):
        row = table_row(out, label)
        assert row[1] == op
        assert float(row[4]) == pytest.approx(4.5, abs=1e-3)  # block size 64, K a multiple of 64
        assert 0.9 <= float(row[5]) <= float(row[6]) <= 1.0
        assert float(row[6]) >= 0.97
    # Step 4: the semantic search prints both answers per query and how often they agree.
    assert out.count("query: ") == 6
    agree_line = next(line for line in out.splitlines() if line.startswith("NF4 finds the same nearest sentence"))
    agree, total = (int(x) for x in agree_line.split(" for ")[1].split()[0].split("/"))
    assert total == 6
    assert agree >= total - 1
