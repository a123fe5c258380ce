"""What the CLI says: layers already NF4, nothing to dequantize, the progress bar, inspect's bytes (in-process)."""

from __future__ import annotations

import io
import re
import time
from pathlib import Path

import pytest
from test_cli import make_float_model

from onnx_nf4 import cli


@pytest.fixture
def float_model(tmp_path: Path) -> Path:
    return make_float_model(tmp_path / "float.onnx")


def _main(capsys, *args: object) -> tuple[int, str, str]:
    status = cli.main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_quantizing_an_nf4_model_names_the_layers_that_already_are(float_model: Path, tmp_path: Path, capsys):
    nf4, again = tmp_path / "nf4.onnx", tmp_path / "again.onnx"
    assert _main(capsys, "quantize", float_model, nf4)[0] == 0
    status, out, _ = _main(capsys, "quantize", nf4, again)
    assert status == 0
    assert "no layer was quantized: 2 layer(s) already NF4, left as they are: mm, gemm" in out.splitlines()


def test_partly_quantized_model_reports_both(float_model: Path, tmp_path: Path, capsys):
    part, rest = tmp_path / "part.onnx", tmp_path / "rest.onnx"
    assert _main(capsys, "quantize", float_model, part, "--exclude", "^gemm$")[0] == 0
    status, out, _ = _main(capsys, "quantize", part, rest)
    assert status == 0
    assert "1 layer(s) already NF4, left as they are: mm" in out.splitlines()
    assert any(line.startswith("quantized 1 layer(s) to NF4") for line in out.splitlines())


def test_dequantizing_a_float_model_says_there_was_nothing_to_do(float_model: Path, tmp_path: Path, capsys):
    status, out, _ = _main(capsys, "dequantize", float_model, tmp_path / "back.onnx")
    assert status == 0
    assert f"nothing to dequantize: {float_model} has no MatMulNF4 or MatMulBnb4 node" in out
    assert (tmp_path / "back.onnx").exists()


def test_dequantize_says_how_many_layers(float_model: Path, tmp_path: Path, capsys):
    nf4 = tmp_path / "nf4.onnx"
    assert _main(capsys, "quantize", float_model, nf4)[0] == 0
    status, out, _ = _main(capsys, "dequantize", nf4, tmp_path / "back.onnx")
    assert status == 0 and "dequantized 2 layer(s) to float MatMul" in out


def test_progress_bar_names_layers_and_starts_its_clock_with_the_run():
    stream = io.StringIO()
    with cli._Progress(enabled=True, stream=stream) as progress:
        time.sleep(0.2)  # loading and planning, before the first weight is done
        progress.update(1, 2, "encoder.layer.0.attention.self.query")
        progress.update(2, 2, "encoder.layer.0.attention.self.key")
    text = stream.getvalue()
    assert "1/2" in text and "2/2" in text and "encoder.layer.0.attention.self.query" in text
    first_rate = float(re.search(r"1/2 \[[^\]]*?([\d.]+)layer/s", text).group(1))
    assert first_rate < 10  # one layer in >= 0.2 s, not the instant after the bar was made


def _column(stdout: str, header: str, layers: tuple[str, ...]) -> dict[str, str]:
    """The right-aligned ``header`` column of the table in ``stdout``, by layer (first column)."""
    lines = stdout.splitlines()
    head = next(line for line in lines if line.startswith("layer ") and header in line)
    end = head.index(header) + len(header)
    cells = {}
    for line in lines:
        name = line.split(" ")[0]
        if name in layers and name not in cells:
            cells[name] = line[:end].rsplit("  ", 1)[-1].strip()
    return cells


@pytest.mark.parametrize("args", [(), ("--double-quant",), ("--format", "com.microsoft"), ("--block-size", "32")])
def test_inspect_per_layer_bytes_agree_with_quantize(float_model: Path, tmp_path: Path, capsys, args: tuple):
    out = tmp_path / "nf4.onnx"
    status, quantized, _ = _main(capsys, "quantize", float_model, out, *args)
    assert status == 0
    status, inspected, _ = _main(capsys, "inspect", out)
    assert status == 0
    after = _column(quantized, "after", ("mm", "gemm"))
    stored = _column(inspected, "bytes", ("mm", "gemm"))
    assert after == stored and len(after) == 2
    if "--double-quant" in args:  # the 256-entry float32 code table: in the totals only, once
        assert "1.0 KiB of it shared by several" in inspected


def test_inspect_marks_a_weight_used_by_several_layers_as_shared(tmp_path: Path, capsys):
    import onnx
    from models import shared_weight_model

    path, out = tmp_path / "shared.onnx", tmp_path / "nf4.onnx"
    onnx.save(shared_weight_model(), path)
    assert _main(capsys, "quantize", path, out, "--double-quant")[0] == 0
    status, inspected, _ = _main(capsys, "inspect", out)
    assert status == 0
    bytes_ = _column(inspected, "bytes", ("mm1", "mm2"))
    assert bytes_["mm2"] == "shared" and bytes_["mm1"] != "shared"
