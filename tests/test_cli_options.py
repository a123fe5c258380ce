"""``--accuracy-level`` end to end (CLI, API, pass, inspect) and the CLI's usage errors (exit status 2).

In-process (``cli.main`` with ``capsys``): faster than a subprocess per case; tests/test_cli.py covers the
process-level behaviour.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from test_cli import _inputs, expected_nf4_output, make_float_model, run_reference

from onnx_nf4 import QuantizeNF4Pass, cli, quantize_model


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
