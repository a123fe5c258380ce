"""A saved bitsandbytes 4-bit state dict mapped into an exported float graph (``export_bnb_state_dict``, CLI).

The state dict / ``.safetensors`` file is produced by bitsandbytes itself (``Linear4bit.state_dict()``); the
mapping, conversion and graph rewrite must not need bitsandbytes or PyTorch (checked in a subprocess where both
are unimportable).
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")
safetensors_torch = pytest.importorskip("safetensors.torch")

from bnb_models import (  # noqa: E402
    REL_TOL,
    LastHiddenState,
    TwoLayers,
    bnb_minilm,
    bnb_tensors,
    decoded_float_model,
    graph_tensors,
    nf4_nodes,
    ort_session,
    relative_error,
    small_model,
    torch_output,
)

from onnx_nf4.cli import main  # noqa: E402
from onnx_nf4.torch import BnbFormatError, bnb_quantized_weights, export_bnb_state_dict  # noqa: E402
from onnx_nf4.torch.safetensors_io import SafetensorsError, read_safetensors  # noqa: E402


def save_state_dict(module: torch.nn.Module, path) -> None:
    safetensors_torch.save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))


def export_float(model: torch.nn.Module, x: torch.Tensor, path, dynamo: bool) -> None:
    with torch.no_grad():
        torch.onnx.export(model, (x,), str(path), dynamo=dynamo, input_names=["x"], dynamic_axes={"x": {0: "b"}})


# ---------------------------------------------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def minilm_state_dict(minilm, tmp_path_factory):
    """(bnb model, .safetensors of its BertModel with NF4 + double quantization, blocksize 64)."""
    model = bnb_minilm(minilm, 64, True)
    path = tmp_path_factory.mktemp("bnb_sd") / "model.safetensors"
    save_state_dict(model.bert, path)  # keys 'encoder.layer.0.attention.self.query.weight', ...
    return model, path


@pytest.fixture(scope="module")
def minilm_float_graph(minilm, tmp_path_factory):
    """all-MiniLM-L6-v2 in float exported by the TorchScript exporter, through the same wrapper as the bnb model."""
    from test_bnb_export import example_inputs

    path = tmp_path_factory.mktemp("float") / "minilm.onnx"
    with torch.no_grad():
        torch.onnx.export(
            LastHiddenState(minilm.load_torch_model()).eval(),
            example_inputs(minilm),
            str(path),
            dynamo=False,
            input_names=list(minilm.INPUT_NAMES),
            output_names=[minilm.OUTPUT_NAME],
            dynamic_axes={name: {0: "batch", 1: "sequence"} for name in minilm.INPUT_NAMES},
        )
    return path


def test_minilm_state_dict_into_float_graph(minilm_state_dict, minilm_float_graph, minilm_inputs, tmp_path):
    model, sd_path = minilm_state_dict
    out = tmp_path / "nf4.onnx"
    with pytest.warns(UserWarning, match=r"1 bitsandbytes layer\(s\) have no MatMul/Gemm.*'pooler.dense'"):
        report = export_bnb_state_dict(minilm_float_graph, sd_path, out)
    assert len(report.layers) == 36 and report.block_size == 64 and report.double_quant
    layers = {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit) and "pooler" not in name}
    assert {graph_tensors(inputs) for _, inputs in nf4_nodes(out)} == {bnb_tensors(m) for m in layers.values()}
    (actual,) = ort_session(out).run(None, minilm_inputs)
    assert relative_error(actual, torch_output(model, minilm_inputs)) <= REL_TOL


def test_cli_export_bnb_writes_the_same_file(minilm_state_dict, minilm_float_graph, tmp_path, capsys):
    _, sd_path = minilm_state_dict
    api_out, cli_out = tmp_path / "api.onnx", tmp_path / "cli.onnx"
    with pytest.warns(UserWarning):
        export_bnb_state_dict(minilm_float_graph, sd_path, api_out)
    assert main(["export-bnb", str(minilm_float_graph), str(sd_path), str(cli_out)]) == 0
    captured = capsys.readouterr()
    assert "/bert/encoder/layer.0/attention/self/query/MatMul" in captured.out  # the per-layer report
    assert "quantized 36 layer(s)" in captured.out
    assert "warning: 1 bitsandbytes layer(s)" in captured.err and "'pooler.dense'" in captured.err
    assert cli_out.read_bytes() == api_out.read_bytes()


def test_cli_export_bnb_errors_are_one_line(minilm_float_graph, tmp_path, capsys):
    _, quantized = small_model(blocksize=64, double_quant=False, quant_type="fp4")
    sd_path = tmp_path / "fp4.safetensors"
    save_state_dict(quantized, sd_path)
    assert main(["export-bnb", str(minilm_float_graph), str(sd_path), str(tmp_path / "out.onnx")]) == 1
    err = capsys.readouterr().err
    assert re.match(r"onnx-nf4: error: layer '(up|down)': bitsandbytes quant_type 'fp4' is not supported", err)
    assert err.count("\n") == 1
    assert not (tmp_path / "out.onnx").exists()


def test_without_bitsandbytes_or_torch(minilm_state_dict, minilm_float_graph, tmp_path):
    """The state-dict path imports neither bitsandbytes nor torch (both made unimportable in a fresh process)."""
    _, sd_path = minilm_state_dict
    expected, out = tmp_path / "expected.onnx", tmp_path / "isolated.onnx"
    with pytest.warns(UserWarning):
        export_bnb_state_dict(minilm_float_graph, sd_path, expected)
    script = textwrap.dedent(
        f"""
        import sys, warnings
        sys.modules["torch"] = None
        sys.modules["bitsandbytes"] = None
        from onnx_nf4.cli import main
        warnings.simplefilter("ignore")
        sys.exit(main(["export-bnb", {str(minilm_float_graph)!r}, {str(sd_path)!r}, {str(out)!r}]))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == expected.read_bytes()


# ---------------------------------------------------------------------------------------------------- small models


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_both_exporters_map_by_module_path(tmp_path, dynamo):
    _, quantized = small_model(blocksize=32, double_quant=True)
    sd_path, float_path, out = tmp_path / "sd.safetensors", tmp_path / "float.onnx", tmp_path / "out.onnx"
    save_state_dict(quantized, sd_path)
    float_model, _ = small_model(blocksize=32, double_quant=True)  # same seed: the original float weights
    x = torch.randn(3, 5, 128)
    export_float(float_model, x, float_path, dynamo)
    report = export_bnb_state_dict(float_path, sd_path, out)
    assert len(report.layers) == 2 and report.block_size == 32
    expected = {bnb_tensors(quantized.up), bnb_tensors(quantized.down)}
    assert {graph_tensors(inputs) for _, inputs in nf4_nodes(out)} == expected
    with torch.no_grad():
        reference = decoded_float_model(quantized)(x).numpy()
    (actual,) = ort_session(out).run(None, {"x": x.numpy()})
    assert relative_error(actual, reference) <= REL_TOL


def test_prefixed_names_and_in_memory_state_dict(tmp_path):
    """State dict keys with a prefix the graph lacks (and the reverse) still map; a torch state dict works too."""
    _, quantized = small_model(blocksize=64, double_quant=False)
    float_model, _ = small_model(blocksize=64, double_quant=False)
    float_path = tmp_path / "float.onnx"
    export_float(float_model, torch.randn(2, 4, 128), float_path, dynamo=False)
    wrapped = torch.nn.Module()
    wrapped.model = quantized  # keys 'model.up.weight', ...
    report = export_bnb_state_dict(float_path, wrapped.state_dict(), tmp_path / "out.onnx")
    assert len(report.layers) == 2
    assert set(bnb_quantized_weights(wrapped.state_dict())) == {"model.up", "model.down"}


def test_wrong_layer_is_refused(tmp_path):
    """Two same-shaped layers swapped in the state dict: the value check names the layer."""
    torch.manual_seed(3)
    float_model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128)).eval()
    float_path = tmp_path / "float.onnx"
    export_float(float_model, torch.randn(2, 3, 128), float_path, dynamo=False)
    swapped = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128))
    swapped[0].load_state_dict(float_model[2].state_dict())
    swapped[2].load_state_dict(float_model[0].state_dict())
    from test_bnb_export import quantize_linears

    state_dict = quantize_linears(swapped, 64, False).state_dict()
    with pytest.raises(ValueError, match=r"layer '0': graph weight .* is not close"):
        export_bnb_state_dict(float_path, state_dict, tmp_path / "out.onnx")
    report = export_bnb_state_dict(float_path, state_dict, tmp_path / "out.onnx", max_rel_error=None)
    assert len(report.layers) == 2


def test_shape_mismatch_and_empty_state_dict(tmp_path):
    float_model = TwoLayers().eval()
    float_path = tmp_path / "float.onnx"
    export_float(float_model, torch.randn(2, 128), float_path, dynamo=False)
    other = torch.nn.Module()
    other.up = torch.nn.Linear(64, 128)  # same name, different shape
    from test_bnb_export import quantize_linears

    with pytest.raises(ValueError, match=r"layer 'up': the state dict's weight is \[out=128, in=64\]"):
        export_bnb_state_dict(float_path, quantize_linears(other, 64, False).state_dict(), tmp_path / "o.onnx")
    with pytest.raises(ValueError, match="no bitsandbytes 4-bit layer"):
        export_bnb_state_dict(float_path, float_model.state_dict(), tmp_path / "o.onnx")
    with pytest.raises(ValueError, match="none of the 1 bitsandbytes layers"):
        renamed = torch.nn.Module()
        renamed.elsewhere = torch.nn.Linear(128, 128)
        export_bnb_state_dict(float_path, quantize_linears(renamed, 64, False).state_dict(), tmp_path / "o.onnx")


def test_missing_tensor_names_the_layer():
    _, quantized = small_model(blocksize=64, double_quant=True)
    state_dict = dict(quantized.state_dict())
    del state_dict["up.weight.nested_absmax"]
    with pytest.raises(BnbFormatError, match=r"layer 'up': the state dict has no 'up.weight.nested_absmax'"):
        bnb_quantized_weights(state_dict)


# ---------------------------------------------------------------------------------------------------- safetensors


def test_safetensors_reader_matches_the_library(tmp_path):
    tensors = {
        "f32": torch.randn(3, 4),
        "f16": torch.randn(5).half(),
        "bf16": torch.randn(2, 3).bfloat16(),
        "u8": torch.arange(7, dtype=torch.uint8),
        "i64": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(1.5),
    }
    path = tmp_path / "t.safetensors"
    safetensors_torch.save_file(tensors, str(path))
    read = read_safetensors(path)
    assert set(read) == set(tensors)
    for name, tensor in tensors.items():
        raw = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
        np.testing.assert_array_equal(read[name].view(raw.numpy().dtype), raw.numpy())
        assert read[name].shape == tuple(tensor.shape)


def test_safetensors_reader_rejects_garbage(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(SafetensorsError, match="invalid header length"):
        read_safetensors(path)
    path.write_bytes((5).to_bytes(8, "little") + b"nope!")
    with pytest.raises(SafetensorsError, match="not valid JSON"):
        read_safetensors(path)


def test_onnx_model_of_state_dict_path_is_valid(minilm_state_dict, minilm_float_graph, tmp_path):
    _, sd_path = minilm_state_dict
    out = tmp_path / "nf4.onnx"
    with pytest.warns(UserWarning):
        export_bnb_state_dict(minilm_float_graph, sd_path, out)
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
