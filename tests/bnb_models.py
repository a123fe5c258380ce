"""bitsandbytes ``Linear4bit`` models and the checks of their ONNX exports, shared by the bitsandbytes tests.

Import it after ``pytest.importorskip("torch")`` and ``pytest.importorskip("bitsandbytes")``.
"""

from __future__ import annotations

import bitsandbytes as bnb
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

REL_TOL = 1e-4


class LastHiddenState(torch.nn.Module):
    """``(input_ids, attention_mask) -> last_hidden_state`` with explicit zero ``token_type_ids``.

    Passing the token types (their default value) keeps a broadcast ``GatherElements`` out of the graph, which
    ``onnx.reference`` cannot evaluate; onnxruntime runs either form.
    """

    def __init__(self, bert: torch.nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        token_type_ids = torch.zeros_like(input_ids)
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return out.last_hidden_state


def to_linear4bit(linear: torch.nn.Linear, blocksize: int, double_quant: bool, **kwargs) -> torch.nn.Module:
    """``linear`` as a bitsandbytes ``Linear4bit`` (NF4 unless ``quant_type`` is given), quantized by bitsandbytes."""
    quant_type = kwargs.pop("quant_type", "nf4")
    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compress_statistics=double_quant,
        quant_type=quant_type,
        **kwargs,
    )
    layer.weight = bnb.nn.Params4bit(
        linear.weight.data.clone(),
        requires_grad=False,
        blocksize=blocksize,
        compress_statistics=double_quant,
        quant_type=quant_type,
    )
    layer.bias = linear.bias
    layer = layer.to("cpu")
    layer.support_avx512bf16_for_cpu = False
    return layer


def quantize_linears(model: torch.nn.Module, blocksize: int, double_quant: bool, **kwargs) -> torch.nn.Module:
    """Replace every ``nn.Linear`` of ``model`` by a bitsandbytes ``Linear4bit`` (in place); return ``model``."""
    for name, module in list(model.named_modules()):
        if type(module) is torch.nn.Linear:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, to_linear4bit(module, blocksize, double_quant, **kwargs))
    return model.eval()


def bnb_minilm(minilm, blocksize: int = 64, double_quant: bool = False) -> torch.nn.Module:
    """all-MiniLM-L6-v2 with NF4 ``Linear4bit`` layers, wrapped as ``(input_ids, attention_mask) -> states``."""
    return LastHiddenState(quantize_linears(minilm.load_torch_model(), blocksize, double_quant)).eval()


def example_inputs(minilm) -> tuple[torch.Tensor, torch.Tensor]:
    enc = minilm.encode(minilm.SENTENCES[:2])
    return torch.from_numpy(enc["input_ids"]), torch.from_numpy(enc["attention_mask"])


def torch_output(model: torch.nn.Module, inputs: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(inputs["input_ids"]), torch.from_numpy(inputs["attention_mask"])).numpy()


def ort_session(path):
    """An onnxruntime session with the ``MatMulNF4`` library; skips when the library is not built."""
    from onnx_nf4.runtime import CustomOpLibraryNotFoundError, session_options

    try:
        options = session_options()
    except CustomOpLibraryNotFoundError as err:
        pytest.skip(f"the onnx_nf4 custom-op library is not built: {err}")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """``max |actual - expected| / max |expected|``."""
    return float(np.abs(actual.astype(np.float64) - expected).max() / np.abs(expected).max())


def nf4_nodes(path) -> list[tuple[onnx.NodeProto, list[np.ndarray | None]]]:
    """Each ``MatMulNF4`` node with its constant inputs 1..5 (``None`` for an omitted one)."""
    model = onnx.load(str(path))
    inits = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}
    return [
        (node, [inits.get(name) if name else None for name in list(node.input[1:6]) + [""] * (6 - len(node.input))])
        for node in model.graph.node
        if node.op_type == "MatMulNF4"
    ]


def attribute(node: onnx.NodeProto, name: str) -> int | None:
    for attr in node.attribute:
        if attr.name == name:
            return attr.i
    return None


def bnb_tensors(module) -> tuple[bytes, ...]:
    """bitsandbytes' own tensors of a ``Linear4bit`` layer, as bytes: codes, absmax [, nested absmax, code, offset]."""
    state = module.weight.quant_state
    out = [module.weight.data.numpy().tobytes(), state.absmax.numpy().tobytes()]
    if state.nested:
        out += [state.state2.absmax.numpy().tobytes(), state.state2.code.numpy().tobytes()]
        out.append(np.float32(state.offset.item()).tobytes())
    return tuple(out)


def graph_tensors(inputs: list[np.ndarray | None]) -> tuple[bytes, ...]:
    return tuple(np.ascontiguousarray(x).reshape(-1).tobytes() for x in inputs if x is not None)


class TwoLayers(torch.nn.Module):
    def __init__(self, k: int = 128, hidden: int = 128, n: int = 16) -> None:
        super().__init__()
        self.up = torch.nn.Linear(k, hidden)
        self.norm = torch.nn.LayerNorm(hidden)
        self.down = torch.nn.Linear(hidden, n, bias=False)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.norm(self.up(x))))


def small_model(seed: int = 0, **kwargs) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(float model, its bnb-quantized copy)."""
    torch.manual_seed(seed)
    float_model = TwoLayers().eval()
    quantized = TwoLayers().eval()
    quantized.load_state_dict(float_model.state_dict())
    return float_model, quantize_linears(quantized, **kwargs)


def decoded_float_model(quantized: torch.nn.Module) -> torch.nn.Module:
    """A float ``TwoLayers`` whose weights are bitsandbytes' decoded weights of ``quantized``."""
    model = TwoLayers().eval()
    for name in ("up", "down"):
        module = getattr(quantized, name)
        decoded = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
        getattr(model, name).weight.data = decoded
        if module.bias is not None:
            getattr(model, name).bias.data = module.bias.data.float()
    model.norm.load_state_dict(quantized.norm.state_dict())
    return model
