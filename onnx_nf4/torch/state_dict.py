"""A bitsandbytes-quantized state dict mapped into an exported float ONNX model, without bitsandbytes.

bitsandbytes saves each ``Linear4bit`` layer ``L`` of a state dict (``model.state_dict()``, ``save_pretrained``'s
``.safetensors``) as the tensors ``L.weight`` (packed uint8 codes), ``L.weight.absmax``, ``L.weight.quant_map`` and,
with double quantization, ``L.weight.nested_absmax`` and ``L.weight.nested_quant_map``, plus
``L.weight.quant_state.bitsandbytes__nf4``: the UTF-8 JSON of the rest (``quant_type``, ``blocksize``, ``dtype``,
``shape``, ``nested_blocksize``, ``nested_dtype``, ``nested_offset``). :func:`bnb_quantized_weights` turns them into
``MatMulNF4`` weights (:mod:`onnx_nf4.torch.bnb_layout`: no re-quantization; FP4 is refused naming the layer).

:func:`export_bnb_state_dict` finds, for each such layer, the ``MatMul`` / ``Gemm`` of the float graph exported from
the same architecture (:func:`onnx_nf4.torch.graph_weights.graph_weights` reads the module path from the
exporter's node metadata or node names), checks the shapes and that the float weight is close to the quantized
one, and writes the graph with those NF4 weights.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..codec.double_quant import NestedAbsmax
from ..codec.layout import QuantizedWeight, nf4_rel_rms_error
from ..model.io import ModelLike, load_model
from ..passes.options import QuantizeOptions
from ..passes.report import QuantizationReport
from .bnb_layout import BnbFormatError, BnbWeight, to_quantized_weight
from .graph_weights import GraphWeight, graph_weights, quantize_with_prequantized
from .safetensors_io import read_safetensors

__all__ = ["bnb_quantized_weights", "bnb_weights", "export_bnb_state_dict", "load_state_dict"]

_QUANT_STATE_KEY = re.compile(r"^(?:(?P<layer>.*)\.)?weight\.quant_state\.bitsandbytes__(?P<type>\w+)$")
#: The default largest ``rms(W_float - W_nf4) / rms(W_float)`` accepted when mapping a layer onto a float weight.
#: NF4 gives about 0.1; a weight of another layer (or transposed) gives about 1.4.
DEFAULT_MAX_REL_ERROR = 0.5

StateDict = Mapping[str, Any]


def _as_numpy(value: Any) -> np.ndarray:
    """A numpy view or copy of a numpy array or a torch tensor (bfloat16 as raw ``uint16`` patterns)."""
    if hasattr(value, "detach"):  # a torch tensor
        import torch

        value = value.detach().to("cpu").contiguous()
        if value.dtype == torch.bfloat16:
            return value.view(torch.int16).numpy().view(np.uint16)
        return value.numpy()
    return np.asarray(value)


def load_state_dict(source: str | os.PathLike[str] | StateDict) -> StateDict:
    """Tensors by name from a mapping, a ``.safetensors`` file (numpy only) or a ``torch.save`` file (needs torch)."""
    if isinstance(source, Mapping):
        return source
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    import torch

    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(loaded).__name__}")
    return loaded


def _quant_state(layer: str, key: str, value: Any) -> dict[str, Any]:
    try:
        state = json.loads(bytes(_as_numpy(value).astype(np.uint8).reshape(-1)).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as err:
        raise BnbFormatError(f"layer {layer!r}: {key!r} is not bitsandbytes' packed quant state ({err})") from None
    if not isinstance(state, dict):
        raise BnbFormatError(f"layer {layer!r}: {key!r} is not bitsandbytes' packed quant state")
    return state


def _tensor(tensors: StateDict, layer: str, key: str) -> np.ndarray:
    if key not in tensors:
        raise BnbFormatError(f"layer {layer!r}: the state dict has no {key!r}")
    return _as_numpy(tensors[key])


def _bnb_weight(tensors: StateDict, layer: str, key: str, quant_type: str) -> BnbWeight:
    prefix = f"{layer}.weight" if layer else "weight"
    state = _quant_state(layer, key, tensors[key])
    try:
        shape = tuple(int(d) for d in state["shape"])
        blocksize = int(state["blocksize"])
        quant_type = str(state.get("quant_type", quant_type))
    except (KeyError, TypeError, ValueError):
        raise BnbFormatError(f"layer {layer!r}: {key!r} lacks a valid shape or blocksize") from None
    packed = np.ascontiguousarray(_tensor(tensors, layer, prefix)).view(np.uint8).reshape(-1)
    absmax = _tensor(tensors, layer, f"{prefix}.absmax").reshape(-1)
    quant_map = _as_numpy(tensors[f"{prefix}.quant_map"]) if f"{prefix}.quant_map" in tensors else None
    nested = None
    if f"{prefix}.nested_absmax" in tensors or "nested_offset" in state:
        if str(state.get("nested_dtype", "float32")) != "float32":
            raise BnbFormatError(f"layer {layer!r}: nested statistics of dtype {state['nested_dtype']} are unsupported")
        try:
            offset = np.float32(float(state["nested_offset"]))  # the JSON double of a float32: exact
            nested_block = int(state["nested_blocksize"])
        except (KeyError, TypeError, ValueError):
            raise BnbFormatError(f"layer {layer!r}: {key!r} lacks valid nested_offset / nested_blocksize") from None
        nested = NestedAbsmax(
            nested_absmax=_tensor(tensors, layer, f"{prefix}.nested_absmax").reshape(-1),
            code=_tensor(tensors, layer, f"{prefix}.nested_quant_map").reshape(-1),
            offset=offset,
            block_size=nested_block,
        )
    return BnbWeight(layer, quant_type, shape, blocksize, packed, absmax, quant_map, nested)  # type: ignore[arg-type]


def bnb_weights(state_dict: str | os.PathLike[str] | StateDict) -> dict[str, BnbWeight]:
    """The bitsandbytes 4-bit layers of a state dict (or file), by layer name (the key prefix before ``.weight``)."""
    tensors = load_state_dict(state_dict)
    layers = {}
    for key in tensors:
        match = _QUANT_STATE_KEY.match(key)
        if match:
            layer = match.group("layer") or ""
            layers[layer] = _bnb_weight(tensors, layer, key, match.group("type"))
    return layers


def bnb_quantized_weights(state_dict: str | os.PathLike[str] | StateDict) -> dict[str, QuantizedWeight]:
    """The ``MatMulNF4`` weights (bitsandbytes' own codes and statistics) of every 4-bit layer, by layer name.

    Raises:
        BnbFormatError: an FP4 layer, missing or inconsistent tensors (the message names the layer).
    """
    return {layer: to_quantized_weight(weight) for layer, weight in bnb_weights(state_dict).items()}


def _matches(layer: str, module: str) -> bool:
    return module == layer or module.endswith(f".{layer}") or layer.endswith(f".{module}") or not layer


def _map_layers(layers: Iterable[str], weights: list[GraphWeight]) -> tuple[dict[str, list[GraphWeight]], list[str]]:
    """Each layer's graph weights (the module path equal, or equal up to a leading prefix); and unmatched layers."""
    by_module: dict[str, list[GraphWeight]] = {}
    for weight in weights:
        if weight.module is not None:
            by_module.setdefault(weight.module, []).append(weight)
    mapped, unmatched = {}, []
    for layer in layers:
        modules = [layer] if layer in by_module else [m for m in by_module if _matches(layer, m)]
        if len(modules) > 1:
            raise ValueError(f"layer {layer!r} of the state dict matches several graph layers: {sorted(modules)}")
        if modules:
            mapped[layer] = by_module[modules[0]]
        else:
            unmatched.append(layer)
    return mapped, unmatched


def _check_weight(layer: str, q: QuantizedWeight, weight: GraphWeight, max_rel_error: float | None) -> None:
    shape = (q.N, q.K) if weight.transposed else (q.K, q.N)
    if tuple(weight.tensor.shape) != shape:
        raise ValueError(
            f"layer {layer!r}: the state dict's weight is [out={q.N}, in={q.K}] but graph weight {weight.name!r} "
            f"(node {weight.node!r}) has shape {list(weight.tensor.shape)}"
        )
    if max_rel_error is None:
        return
    w = weight.tensor.numpy()
    error = nf4_rel_rms_error(w.T if weight.transposed else w, q)
    if error > max_rel_error:
        raise ValueError(
            f"layer {layer!r}: graph weight {weight.name!r} (node {weight.node!r}) is not close to the state "
            f"dict's NF4 weight (relative RMS difference {error:.3f} > {max_rel_error});"
            " is the graph exported from the same model?"
        )


def export_bnb_state_dict(
    model: ModelLike,
    state_dict: str | os.PathLike[str] | StateDict,
    output_path: str | os.PathLike[str],
    *,
    quantize_float: bool = False,
    options: QuantizeOptions | None = None,
    block_size: int | None = None,
    double_quant: bool | None = None,
    format: str | None = None,
    exclude: Iterable[str] | None = None,
    min_elements: int | None = None,
    max_rel_error: float | None = DEFAULT_MAX_REL_ERROR,
    external_data: bool | None = None,
) -> QuantizationReport:
    """Write the float ONNX ``model`` to ``output_path`` with the 4-bit layers of a bitsandbytes state dict.

    Each bitsandbytes layer ``L`` (e.g. ``encoder.layer.0.attention.self.query``) replaces the weight of the
    ``MatMul`` / ``Gemm`` exported from module ``L``, or from a module whose path ends with ``.L`` (a wrapper's
    prefix) or is a suffix of ``L``; it must match one module only. Layers with no such node (e.g. pruned by the
    exporter because their output is unused) are named in a ``UserWarning``; if none matches, that is an error.

    Args:
        model: the float ONNX model (path, ``ModelProto`` or ``onnx_ir.Model``) exported from the same architecture
            by ``torch.onnx.export`` (either exporter: node names / metadata give the module paths).
        state_dict: a ``.safetensors`` file, a ``torch.save`` file, or a mapping of names to tensors / arrays.
        output_path: where to write the NF4 model.
        quantize_float: also quantize the other float weights (``block_size``, ``double_quant``, ``min_elements``).
        options, block_size, double_quant, format, exclude, min_elements, external_data: as for
            :func:`onnx_nf4.quantize_model`.
        max_rel_error: refuse a mapping where ``rms(W_float - W_nf4) > max_rel_error * rms(W_float)`` (a wrong
            layer); ``None`` skips this check.

    Returns:
        The :class:`~onnx_nf4.passes.report.QuantizationReport`.

    Raises:
        BnbFormatError: a layer that cannot be stored exactly (FP4, inconsistent tensors), naming it.
        ValueError: no 4-bit layer in the state dict, none found in the graph, an ambiguous name, a shape
            mismatch or a weight too far from the float graph's.
    """
    settings = {"block_size": block_size, "double_quant": double_quant, "format": format, "exclude": exclude}
    options = QuantizeOptions.build(options, **settings, min_elements=min_elements, external_data=external_data)
    quantized = bnb_quantized_weights(state_dict)
    if not quantized:
        raise ValueError("the state dict holds no bitsandbytes 4-bit layer (no '*.weight.quant_state.bitsandbytes__*')")
    ir_model = load_model(model)
    mapped, unmatched = _map_layers(quantized, graph_weights(ir_model))
    if not mapped:
        raise ValueError(
            f"none of the {len(quantized)} bitsandbytes layers (e.g. {next(iter(quantized))!r}) matches a MatMul/Gemm "
            "of the graph by module path; export the float model with torch.onnx.export from the same architecture"
        )
    if unmatched:
        warnings.warn(
            f"{len(unmatched)} bitsandbytes layer(s) have no MatMul/Gemm in the graph and are not used: "
            + ", ".join(map(repr, unmatched)),
            UserWarning,
            stacklevel=2,
        )
    prequantized = {}
    for layer, weights in mapped.items():
        for weight in weights:
            _check_weight(layer, quantized[layer], weight, max_rel_error)
            prequantized[weight.name] = quantized[layer]
    return quantize_with_prequantized(
        ir_model,
        output_path,
        prequantized,
        quantize_float=quantize_float,
        options=options,
    )
