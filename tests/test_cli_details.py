"""The command line in detail: ``--accuracy-level`` end to end (CLI, API, pass, inspect), usage errors (exit
status 2), layers already NF4, nothing to dequantize, the progress bar, inspect's bytes.

In-process (``cli.main`` with ``capsys``): faster than a subprocess per case; tests/test_cli.py covers the
process-level behaviour.
"""

from __future__ import annotations

import io
import re
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from test_cli import _inputs, expected_nf4_output, make_float_model, run_reference

from onnx_nf4 import QuantizeNF4Pass, quantize_model
from onnx_nf4.cli import entry as cli
from onnx_nf4.cli.common import Progress


@pytest.fixture
def float_model(tmp_path: Path) -> Path:
    return make_float_model(tmp_path / "float.onnx")


def _main(capsys, *args: object) -> tuple[int, str, str]:
    status = cli.main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _usage_error(capsys, args: tuple, *fragments: str, command: str = "quantize") -> None:
    """Exit status 2 and one ``onnx-nf4: error:`` line holding ``fragments`` and naming the command's --help."""
    with pytest.raises(SystemExit) as exited:
        status = cli.main([str(arg) for arg in args])
        raise SystemExit(status)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exited.value.code == 2 and len(lines) == 1 and lines[0].startswith("onnx-nf4: error: "), err
    for fragment in (*fragments, f"(see 'onnx-nf4 {command} --help')"):
        assert fragment in lines[0], (fragment, lines[0])


def _accuracy_levels(path: Path) -> dict[str, int | None]:
    levels = {}
    for node in onnx.load(path).graph.node:
        if node.op_type == "MatMulNF4":
            attrs = {a.name: a.i for a in node.attribute}
            levels[node.name] = attrs.get("accuracy_level")
    return levels


# ------------------------------------------------------------------------------------------------ accuracy level


def test_accuracy_level_4_is_written_reported_and_inspected(float_model: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "acc4.onnx"
    status, stdout, err = _main(capsys, "quantize", float_model, out, "--accuracy-level", "4")
    assert status == 0, err
    assert "block size 64, accuracy level 4" in stdout
    assert _accuracy_levels(out) == {"mm": 4, "gemm": 4}
    onnx.checker.check_model(onnx.load(out), full_check=True)
    inputs = _inputs()  # the reference computes every level in float32
    np.testing.assert_allclose(run_reference(out, inputs), expected_nf4_output(inputs, 64), rtol=1e-4, atol=1e-5)

    status, stdout, err = _main(capsys, "inspect", out)
    assert status == 0, err
    assert "accuracy level 4 on 2" in stdout
    header = next(line for line in stdout.splitlines() if line.startswith("layer "))
    end = header.index("accuracy level") + len("accuracy level")  # the column is right-aligned
    for layer in ("mm", "gemm"):
        row = next(line for line in stdout.splitlines() if line.startswith(f"{layer} "))
        assert row[end - 2 : end] == " 4", row


def test_accuracy_level_4_runs_in_onnxruntime_close_to_level_0(float_model: Path, tmp_path: Path, capsys) -> None:
    ort = pytest.importorskip("onnxruntime")
    from onnx_nf4.runtime import session_options

    outputs = {}
    for level in (0, 4):
        out = tmp_path / f"acc{level}.onnx"
        assert _main(capsys, "quantize", float_model, out, "--accuracy-level", str(level))[0] == 0
        session = ort.InferenceSession(str(out), session_options(), providers=["CPUExecutionProvider"])
        outputs[level] = session.run(["Y"], _inputs())[0]
    scale = float(np.abs(outputs[0]).max())
    np.testing.assert_allclose(outputs[4], outputs[0], atol=0.05 * scale)


def test_accuracy_level_0_writes_no_attribute(float_model: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "acc0.onnx"
    status, stdout, _ = _main(capsys, "quantize", float_model, out)
    assert status == 0 and "accuracy level" not in stdout
    assert _accuracy_levels(out) == {"mm": None, "gemm": None}  # absent: the op's default, 0
    status, stdout, _ = _main(capsys, "inspect", out)
    assert "accuracy level 0 on 2" in stdout


def test_accuracy_level_through_the_api_and_the_pass(float_model: Path) -> None:
    model, report = quantize_model(float_model, accuracy_level=4)
    assert report.accuracy_level == 4
    levels = [{a.name: a.i for a in n.attribute}.get("accuracy_level") for n in model.graph.node]
    assert levels.count(4) == 2
    ir_model = ir.load(float_model)
    result = QuantizeNF4Pass(accuracy_level=4)(ir_model)
    assert [n.attributes["accuracy_level"].as_int() for n in ir_model.graph if n.op_type == "MatMulNF4"] == [4, 4]
    assert result.report.accuracy_level == 4


@pytest.mark.parametrize("level", ["1", "2", "3", "5", "-1", "four"])
def test_accuracy_level_must_be_0_or_4(float_model: Path, tmp_path: Path, capsys, level: str) -> None:
    _usage_error(capsys, ("quantize", float_model, tmp_path / "o.onnx", "--accuracy-level", level), "--accuracy-level")
    assert not (tmp_path / "o.onnx").exists()


def test_accuracy_level_needs_the_onnx_nf4_format(float_model: Path, tmp_path: Path, capsys) -> None:
    args = ("quantize", float_model, tmp_path / "o.onnx", "--accuracy-level", "4", "--format", "com.microsoft")
    _usage_error(capsys, args, "--accuracy-level 4 needs --format onnx_nf4")
    assert not (tmp_path / "o.onnx").exists()
    with pytest.raises(ValueError, match=r"accuracy_level is not supported by com\.microsoft"):
        quantize_model(float_model, accuracy_level=4, format="com.microsoft")


# ------------------------------------------------------------------------------------------------ usage errors


def test_double_quant_with_com_microsoft_is_a_usage_error(float_model: Path, tmp_path: Path, capsys) -> None:
    args = ("quantize", float_model, tmp_path / "o.onnx", "--double-quant", "--format", "com.microsoft")
    _usage_error(capsys, args, "--double-quant needs --format onnx_nf4")
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize(
    ("command", "args"),
    [("quantize", ("in.onnx", "out.onnx")), ("inspect", ("in.onnx",)), ("dequantize", ("in.onnx", "out.onnx"))],
)
def test_unknown_option_points_to_the_commands_help(capsys, command: str, args: tuple) -> None:
    _usage_error(capsys, (command, *args, "--bits", "3"), "unrecognized arguments: --bits 3", command=command)


def test_unknown_option_before_the_arguments_points_to_the_commands_help(capsys) -> None:
    _usage_error(capsys, ("quantize", "--frobnicate", "in.onnx", "out.onnx"), "--frobnicate")


def test_missing_argument_points_to_the_commands_help(capsys) -> None:
    _usage_error(capsys, ("quantize", "in.onnx"), "OUT", command="quantize")


def test_export_bnb_exclusive_options_are_a_usage_error(tmp_path: Path, capsys) -> None:
    args = ("export-bnb", tmp_path / "m.onnx", tmp_path / "sd.safetensors", tmp_path / "o.onnx")
    _usage_error(capsys, (*args, "--no-check", "--max-rel-error", "0.2"), "exclude each other", command="export-bnb")
    _usage_error(capsys, (*args, "--frobnicate"), "unrecognized arguments: --frobnicate", command="export-bnb")


# ------------------------------------------------------------------------------------------------ what it says


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
    with Progress(enabled=True, stream=stream) as progress:
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
