"""``onnx_nf4.torch.export`` on float models: the same file as ``torch.onnx.export`` + ``onnx-nf4 quantize``."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from onnx_nf4.api import quantize_model  # noqa: E402
from onnx_nf4.cli import main  # noqa: E402
from onnx_nf4.codec.layout import dequantize_weight, quantize_weight  # noqa: E402
from onnx_nf4.torch import export  # noqa: E402


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(128, 256)
        self.norm = torch.nn.LayerNorm(256)
        self.out = torch.nn.Linear(256, 64)

    def forward(self, tokens, scale):
        return self.out(torch.relu(self.norm(self.proj(tokens)))) * scale


def block(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return Block().eval()


def without_exporter_metadata(path) -> bytes:
    """The model at ``path`` with every ``metadata_props`` removed, serialized.

    The dynamo exporter records process-global symbol counters there (``range_constraints`` such as
    ``{s52: VR[0, int_oo]}``), so two exports of one module in one process differ in those strings only.
    """
    model = onnx.load(str(path))

    def strip(message) -> None:
        for field, value in message.ListFields():
            if field.name == "metadata_props":
                message.ClearField("metadata_props")
            elif field.type == field.TYPE_MESSAGE:
                for item in value if field.is_repeated else [value]:
                    strip(item)

    strip(model)
    return model.SerializeToString()


def test_minilm_matches_the_cli_path(minilm, minilm_fp32_path, minilm_inputs, tmp_path):
    """Same export settings as ``tools/minilm.py``; ``export`` == ``torch.onnx.export`` + ``onnx-nf4 quantize``."""
    enc = minilm.encode(minilm.SENTENCES[:2])
    args = (torch.from_numpy(enc["input_ids"]), torch.from_numpy(enc["attention_mask"]))
    axes = {name: {0: "batch", 1: "sequence"} for name in (*minilm.INPUT_NAMES, minilm.OUTPUT_NAME)}
    api_out, cli_out = tmp_path / "api.onnx", tmp_path / "cli.onnx"
    report = export(
        minilm.wrap_last_hidden_state(minilm.load_torch_model()),
        args,
        api_out,
        dynamo=False,
        opset_version=17,
        input_names=list(minilm.INPUT_NAMES),
        output_names=[minilm.OUTPUT_NAME],
        dynamic_axes=axes,
    )
    assert main(["quantize", "-q", str(minilm_fp32_path), str(cli_out)]) == 0
    assert api_out.read_bytes() == cli_out.read_bytes()
    matmuls = [layer for layer in report.layers if layer.op_type != "Gather"]
    assert len(matmuls) == 36 and [layer.op_type for layer in report.layers].count("Gather") == 1  # word embedding
    assert all(0 < layer.rel_rms_error < 0.15 for layer in report.layers)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_small_model_matches_quantize_model(tmp_path, dynamo, double_quant):
    model = block()
    args = (torch.randn(2, 5, 128), torch.tensor(0.5))
    float_path, expected, actual = tmp_path / "float.onnx", tmp_path / "expected.onnx", tmp_path / "actual.onnx"
    options = {"dynamo": dynamo, "input_names": ["tokens", "scale"], "dynamic_axes": {"tokens": {0: "batch", 1: "seq"}}}
    with torch.no_grad():
        torch.onnx.export(model, args, str(float_path), **options)
    quantize_model(float_path, expected, block_size=32, double_quant=double_quant)
    report = export(model, args, actual, block_size=32, double_quant=double_quant, **options)
    if dynamo:  # everything but the exporter's symbol counters is identical
        assert without_exporter_metadata(actual) == without_exporter_metadata(expected)
    else:
        assert actual.read_bytes() == expected.read_bytes()
    assert len(report.layers) == 2 and report.block_size == 32 and report.double_quant == double_quant


def test_defaults_name_inputs_and_keep_shapes_static(tmp_path):
    """No input of ``Block`` is a token input: every dimension stays static, as ``torch.onnx.export`` makes it."""
    path = tmp_path / "block.onnx"
    export(block(), (torch.randn(2, 5, 128), torch.tensor(0.5)), path, dynamo=False)
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["tokens", "scale"]
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] == [2, 5, 128]


def test_dynamic_axes_mapping(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from onnx_nf4.runtime import CustomOpLibraryNotFoundError, session_options

    try:
        options = session_options()
    except CustomOpLibraryNotFoundError as err:
        pytest.skip(f"the onnx_nf4 custom-op library is not built: {err}")
    model = block()
    path = tmp_path / "block.onnx"
    axes = {"tokens": {0: "batch", 1: "sequence"}}
    export(model, (torch.randn(2, 5, 128), torch.tensor(0.5)), path, dynamo=False, dynamic_axes=axes)
    dims = [d.dim_param for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]
    assert dims[:2] == ["batch", "sequence"]
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    with torch.no_grad():  # the model with the NF4 weights the pass writes (block size 64, onnxruntime rounding)
        for linear in (model.proj, model.out):
            w = dequantize_weight(quantize_weight(linear.weight.numpy().T, 64))
            linear.weight.copy_(torch.from_numpy(w.T))
    x = torch.randn(3, 9, 128)  # another batch and sequence length than the example
    with torch.no_grad():
        reference = model(x, torch.tensor(0.5)).numpy()
    (actual,) = session.run(None, {"tokens": x.numpy(), "scale": np.array(0.5, np.float32)})
    assert actual.shape == (3, 9, 64)
    assert np.abs(actual - reference).max() <= 1e-4 * np.abs(reference).max()


def test_static_shapes_and_exclusion(tmp_path):
    path = tmp_path / "block.onnx"
    report = export(
        block(), (torch.randn(2, 5, 128), torch.tensor(0.5)), path, dynamo=False, dynamic_axes=False, exclude=["out"]
    )
    assert [layer.weight for layer in report.layers] != [] and len(report.layers) == 1
    assert any("excluded" in skipped.reason for skipped in report.skipped)
    dims = [d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 5, 128]


def test_bad_arguments_fail_before_exporting(tmp_path):
    args = (torch.randn(2, 5, 128), torch.tensor(0.5))
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        export(block(), args, tmp_path / "a.onnx", block_size=48)
    with pytest.raises(ValueError, match="format must be one of"):
        export(block(), args, tmp_path / "a.onnx", format="int4")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export(block(), args, tmp_path / "missing" / "a.onnx")
    assert list(tmp_path.iterdir()) == []
