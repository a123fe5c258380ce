"""bitsandbytes ``Linear4bit`` (NF4) models exported with ``onnx_nf4.torch.export``: bnb's bytes, bnb's outputs.

The real model is all-MiniLM-L6-v2 with its 37 ``nn.Linear`` layers replaced by bitsandbytes ``Linear4bit`` (NF4,
quantized on CPU by bitsandbytes itself). The exported graph must hold bitsandbytes' packed codes, absmax and nested
statistics byte for byte, and onnxruntime with the ``MatMulNF4`` op (and the numpy reference runtime) must give
the ``last_hidden_state`` of the bitsandbytes model in PyTorch, on real sentences.

bitsandbytes' CPU inference path on AVX512-BF16 machines replaces a layer's statistics by bfloat16 ones and
computes in bfloat16 on the first ``no_grad`` call; the tests turn that off (``support_avx512bf16_for_cpu``) so
the PyTorch reference computes with the layers' stored tensors, as bitsandbytes does on every other CPU.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("onnxruntime")

from bnb_models import (  # noqa: E402
    REL_TOL,
    LastHiddenState,
    TwoLayers,
    attribute,
    bnb_minilm,
    bnb_tensors,
    decoded_float_model,
    example_inputs,
    graph_tensors,
    nf4_nodes,
    ort_session,
    quantize_linears,
    relative_error,
    small_model,
    to_linear4bit,
    torch_output,
)

from onnx_nf4.codec.blockwise import dequantize_blockwise  # noqa: E402
from onnx_nf4.op.reference import MatMulNF4  # noqa: E402
from onnx_nf4.torch import BnbFormatError, export, to_quantized_weight  # noqa: E402
from onnx_nf4.torch.bnb_modules import bnb_weight  # noqa: E402

# ---------------------------------------------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module", params=[(64, False, False), (64, True, True)], ids=["nf4-torchscript", "nf4-dq-dynamo"])
def exported(request, minilm, tmp_path_factory):
    """(bnb model, exported path, report) for (blocksize, double_quant, dynamo)."""
    blocksize, double_quant, dynamo = request.param
    model = bnb_minilm(minilm, blocksize, double_quant)
    path = tmp_path_factory.mktemp("bnb") / "minilm_nf4.onnx"
    report = export(model, example_inputs(minilm), path, dynamo=dynamo, output_names=["last_hidden_state"])
    return model, path, report, double_quant


def test_initializers_are_bitsandbytes_bytes(exported):
    model, path, report, double_quant = exported
    layers = {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(layers) == 37  # 36 in the encoder + the pooler, whose output the graph does not use
    expected = {bnb_tensors(m) for name, m in layers.items() if "pooler" not in name}
    nodes = nf4_nodes(path)
    assert len(nodes) == len(report.layers) == 36
    got = {graph_tensors(inputs) for _, inputs in nodes}
    assert got == expected
    for node, inputs in nodes:
        assert attribute(node, "block_size") == 64
        assert (inputs[1].dtype == np.uint8) == double_quant
        if double_quant:
            assert attribute(node, "nested_block_size") == 256
    assert all(layer.rel_rms_error == 0 for layer in report.layers)  # the float graph held the decoded weights


def test_onnxruntime_matches_bitsandbytes(exported, minilm_inputs):
    model, path, _, _ = exported
    expected = torch_output(model, minilm_inputs)
    (actual,) = ort_session(path).run(None, minilm_inputs)
    assert actual.shape == expected.shape == (24, minilm_inputs["input_ids"].shape[1], 384)
    assert relative_error(actual, expected) <= REL_TOL


def test_reference_runtime_matches_bitsandbytes(exported, minilm_inputs):
    from onnx.reference import ReferenceEvaluator

    model, path, _, _ = exported
    inputs = {name: value[:2] for name, value in minilm_inputs.items()}  # the numpy reference is slow
    (actual,) = ReferenceEvaluator(str(path), new_ops=[MatMulNF4]).run(None, inputs)
    assert relative_error(actual, torch_output(model, inputs)) <= REL_TOL


def test_model_is_left_unchanged(exported):
    model, _, _, _ = exported
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 37
    assert all(m.weight.bnb_quantized for m in layers)


def test_blocks_straddling_rows_are_reblocked_exactly(minilm, minilm_inputs, tmp_path):
    """Blocksize 256 with K = 384: bnb's blocks cross rows; re-blocked by 128, codes and nested stats unchanged."""
    model = bnb_minilm(minilm, 256, True)
    path = tmp_path / "minilm_bs256.onnx"
    export(model, example_inputs(minilm), path, dynamo=False, output_names=["last_hidden_state"])
    layers = {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    by_codes = {m.weight.data.numpy().tobytes(): m for name, m in layers.items() if "pooler" not in name}
    nodes = nf4_nodes(path)
    assert len(nodes) == 36
    reblocked = 0
    decoded_layers = {}
    for node, (packed, absmax, nested_absmax, code, offset) in nodes:
        module = by_codes.pop(packed.tobytes())
        state = module.weight.quant_state
        K = module.in_features
        block = attribute(node, "block_size")
        assert block == (256 if K % 256 == 0 else 128)
        reblocked += block == 128
        repeat = 256 // block
        assert attribute(node, "nested_block_size") == 256 * repeat
        assert nested_absmax.tobytes() == state.state2.absmax.numpy().tobytes()
        assert code.tobytes() == state.state2.code.numpy().tobytes()
        assert offset.tobytes() == np.float32(state.offset.item()).tobytes()
        assert np.array_equal(absmax.reshape(-1), np.repeat(state.absmax.numpy(), repeat)[: absmax.size])
        # The flat (bitsandbytes) decoding, with bitsandbytes' own decoding of the nested absmax.
        scales = (bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset).numpy()
        flat = dequantize_blockwise(module.weight.data.numpy(), scales, (module.out_features, K), 256)
        decoded_layers[module] = flat
    assert not by_codes and reblocked == 30  # the 5 layers with K = 384 (q, k, v, attn out, up) of 6 blocks
    # The graph computes with exactly those weights: compare with a float model holding them.
    float_model = minilm.load_torch_model()
    float_linears = [m for m in float_model.modules() if type(m) is torch.nn.Linear]
    for module, float_layer in zip(layers.values(), float_linears, strict=True):
        if module in decoded_layers:
            float_layer.weight.data = torch.from_numpy(decoded_layers[module])
    expected = torch_output(LastHiddenState(float_model).eval(), minilm_inputs)
    (actual,) = ort_session(path).run(None, minilm_inputs)
    assert relative_error(actual, expected) <= REL_TOL


# ---------------------------------------------------------------------------------------------------- small models


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("blocksize", [32, 64, 128])
def test_small_layers_any_block_size_and_compute_dtype(tmp_path, compute_dtype, blocksize):
    """`down` (16 x 128) is below the pass's min_elements yet NF4; a 2-D input exports Gemm, a 3-D one MatMul."""
    _, quantized = small_model(blocksize=blocksize, double_quant=blocksize == 64, compute_dtype=compute_dtype)
    reference = decoded_float_model(quantized)
    for shape in ((5, 128), (2, 3, 128)):
        x = torch.randn(*shape)
        path = tmp_path / f"small_{len(shape)}.onnx"
        report = export(quantized, (x,), path, dynamo=False, input_names=["x"])
        assert len(report.layers) == 2 and not report.skipped
        op_types = {layer.op_type for layer in report.layers}  # a 2-D Linear with bias exports as Gemm
        assert op_types == ({"Gemm", "MatMul"} if len(shape) == 2 else {"MatMul"})
        assert {graph_tensors(inputs) for _, inputs in nf4_nodes(path)} == {
            bnb_tensors(quantized.up),
            bnb_tensors(quantized.down),
        }
        with torch.no_grad():
            expected = reference(x).numpy()
        (actual,) = ort_session(path).run(None, {"x": x.numpy()})
        assert relative_error(actual, expected) <= REL_TOL


def test_dynamo_default_and_dynamic_batch(tmp_path):
    _, quantized = small_model(blocksize=64, double_quant=True)
    path = tmp_path / "small.onnx"
    export(quantized, (torch.randn(2, 7, 128),), path, input_names=["x"], dynamic_axes={"x": {0: "batch", 1: "seq"}})
    reference = decoded_float_model(quantized)
    session = ort_session(path)
    for shape in ((1, 3, 128), (4, 11, 128)):
        x = torch.randn(*shape)
        with torch.no_grad():
            expected = reference(x).numpy()
        assert relative_error(session.run(None, {"x": x.numpy()})[0], expected) <= REL_TOL


def test_quantize_float_quantizes_the_other_layers(tmp_path):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 128)).eval()
    model[0] = to_linear4bit(model[0], 64, False)
    path = tmp_path / "mixed.onnx"
    assert len(export(model, (torch.randn(2, 3, 128),), path, dynamo=False).layers) == 1
    report = export(model, (torch.randn(2, 3, 128),), path, dynamo=False, quantize_float=True, block_size=32)
    assert len(report.layers) == 2
    assert sorted(layer.rel_rms_error > 0 for layer in report.layers) == [False, True]


def test_fp4_layer_is_refused_naming_it(tmp_path):
    _, quantized = small_model(blocksize=64, double_quant=False, quant_type="fp4")
    with pytest.raises(BnbFormatError, match=r"layer 'up'.*'fp4'"):
        export(quantized, (torch.randn(2, 128),), tmp_path / "fp4.onnx", dynamo=False)
    assert not (tmp_path / "fp4.onnx").exists()


def test_unquantized_layer_is_refused(tmp_path):
    layer = bnb.nn.Linear4bit(128, 64, quant_type="nf4")  # never moved to a device: not quantized yet
    model = torch.nn.Sequential(layer)
    with pytest.raises(BnbFormatError, match=r"layer '0'.*not quantized yet"):
        export(model, (torch.randn(2, 128),), tmp_path / "raw.onnx", dynamo=False)


def test_layer_repacked_by_the_cpu_kernel_path():
    """After bitsandbytes' CPU (AVX512-BF16) path repacked a layer, the codes read back unchanged."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    torch.manual_seed(2)
    layer = to_linear4bit(torch.nn.Linear(128, 64), 64, True)
    before = bnb_weight("layer", layer)
    data, state = _convert_weight_packed_for_cpu(layer.weight.data.clone(), layer.weight.quant_state)
    layer.weight.data, layer.weight.quant_state = data, state
    after = bnb_weight("layer", layer)
    assert after.packed.tobytes() == before.packed.tobytes()
    assert after.nested is None and after.absmax.dtype == np.float32
    scales = to_quantized_weight(before).float_absmax().reshape(-1)  # the decoded double-quantized absmax
    assert np.array_equal(after.absmax, torch.from_numpy(scales).to(torch.bfloat16).float().numpy())


def test_half_precision_model(tmp_path):
    """A float16 model (quant_state.dtype float16) exports float16 activations; MatMulNF4 takes float16 A."""
    torch.manual_seed(4)
    quantized = TwoLayers().half().eval()
    quantize_linears(quantized, 64, True)
    assert quantized.up.weight.quant_state.dtype == torch.float16
    x = torch.randn(2, 3, 128)
    path = tmp_path / "half.onnx"
    export(quantized, (x.half(),), path, dynamo=False, input_names=["x"])
    assert {graph_tensors(inputs) for _, inputs in nf4_nodes(path)} == {
        bnb_tensors(quantized.up),
        bnb_tensors(quantized.down),
    }
    reference = decoded_float_model(quantized)
    with torch.no_grad():
        expected = reference(x).numpy()
    (actual,) = ort_session(path).run(None, {"x": x.half().numpy()})
    assert actual.dtype == np.float16
    assert relative_error(actual, expected) <= 1e-2  # float16 activations


def test_weight_not_folded_into_a_matmul_constant_is_an_error(tmp_path, monkeypatch):
    """An exporter that leaves ``Transpose(weight)`` in the graph: the layer's NF4 weight cannot be attached."""
    from onnx_nf4.torch import exporter

    def unfolded_export(model, args, path, **_):
        with torch.no_grad():
            torch.onnx.export(model, args, str(path), dynamo=False, do_constant_folding=False)

    monkeypatch.setattr(exporter, "_torch_export", unfolded_export)
    _, quantized = small_model(blocksize=64, double_quant=False)
    with pytest.raises(ValueError, match=r"Linear4bit layer\(s\) 'down', 'up' is in the exported graph, but not"):
        export(quantized, (torch.randn(2, 3, 128),), tmp_path / "unfolded.onnx")
