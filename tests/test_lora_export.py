"""A peft LoRA adapter on a bitsandbytes 4-bit base (QLoRA) exported with ``onnx_nf4.torch.export``.

The base ``Linear4bit`` layers become ``MatMulNF4`` with bitsandbytes' bytes; the adapter's ``lora_A`` / ``lora_B``
layers stay float ``MatMul`` nodes (unless asked otherwise), and onnxruntime reproduces the PyTorch output.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

from bnb_models import (  # noqa: E402
    REL_TOL,
    bnb_minilm,
    bnb_tensors,
    example_inputs,
    graph_tensors,
    nf4_nodes,
    ort_session,
    relative_error,
    torch_output,
)

from onnx_nf4.torch import export  # noqa: E402

RANK = 8


@pytest.fixture(scope="module")
def qlora_model(minilm):
    """MiniLM with NF4 double-quantized base layers and a LoRA adapter (rank 8, random non-zero B) on q and v."""
    model = bnb_minilm(minilm, 64, True)
    config = peft.LoraConfig(r=RANK, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"])
    peft.inject_adapter_in_model(config, model.bert)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def exported(qlora_model, minilm, tmp_path_factory):
    path = tmp_path_factory.mktemp("lora") / "qlora.onnx"
    report = export(qlora_model, example_inputs(minilm), path, dynamo=False, output_names=["last_hidden_state"])
    return path, report


def lora_float_weights(path) -> list[np.ndarray]:
    """The float MatMul weights of rank ``RANK`` (the adapter's A ``[384, 8]`` and B ``[8, 384]``)."""
    model = onnx.load(str(path))
    inits = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}
    return [
        inits[node.input[1]]
        for node in model.graph.node
        if node.op_type == "MatMul" and node.input[1] in inits and RANK in inits[node.input[1]].shape
    ]


def test_base_is_bitsandbytes_bytes_and_adapter_stays_float(qlora_model, exported):
    path, report = exported
    base = [m for name, m in qlora_model.named_modules() if isinstance(m, bnb.nn.Linear4bit) and "pooler" not in name]
    assert len(base) == 36 and len(report.layers) == 36
    assert {graph_tensors(inputs) for _, inputs in nf4_nodes(path)} == {bnb_tensors(m) for m in base}
    adapters = lora_float_weights(path)
    assert len(adapters) == 2 * 2 * 6  # A and B, on query and value, in 6 layers
    expected = {
        np.ascontiguousarray(p.detach().numpy().T).tobytes()
        for name, p in qlora_model.named_parameters()
        if "lora_" in name
    }
    assert {w.tobytes() for w in adapters} == expected


def test_onnxruntime_matches_peft(qlora_model, exported, minilm, minilm_inputs):
    path, _ = exported
    expected = torch_output(qlora_model, minilm_inputs)
    (actual,) = ort_session(path).run(None, minilm_inputs)
    assert relative_error(actual, expected) <= REL_TOL
    base_only = bnb_minilm(minilm, 64, True)
    assert relative_error(torch_output(base_only, minilm_inputs), expected) > 1e-2  # the adapter matters


def test_quantize_lora_on_request(qlora_model, minilm, tmp_path):
    path = tmp_path / "all.onnx"
    inputs = example_inputs(minilm)
    report = export(qlora_model, inputs, path, dynamo=False, quantize_float=True, min_elements=0)
    matmuls = [layer for layer in report.layers if layer.op_type != "Gather"]  # + the word embedding's lookup
    assert len(matmuls) == 36 and len(report.layers) == 37  # the adapter stays float even then
    report = export(qlora_model, inputs, path, dynamo=False, quantize_float=True, quantize_lora=True, min_elements=0)
    assert len([layer for layer in report.layers if layer.op_type != "Gather"]) == 36 + 24
    assert not lora_float_weights(path)
