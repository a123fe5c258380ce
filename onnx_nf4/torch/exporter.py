"""``export``: a PyTorch model to an NF4 ONNX model, bitsandbytes ``Linear4bit`` and ``EmbeddingNF4`` layers kept
bit for bit.

How a ``Linear4bit`` layer becomes a ``MatMulNF4`` with bitsandbytes' own tensors:

1. Its codes and statistics are read (:func:`~onnx_nf4.torch.bnb_modules.bnb_weight`) and converted to the op's
   layout without re-quantizing (:func:`~onnx_nf4.torch.bnb_layout.to_quantized_weight`); FP4 and other
   unsupported layers fail here, before any export work, with an error naming the layer.
2. For the export only, the layer is swapped for a float ``Linear`` holding its decoded weight (exactly
   ``NF4[code] * absmax``, in the dtype bitsandbytes dequantizes to), so the exporter emits an ordinary
   ``MatMul`` / ``Gemm`` with a constant weight. The model is restored afterwards, even on error.
3. Each exported weight initializer is matched to its layer **by value**: the SHA-256 of the initializer's bytes
   against that of the decoded weight in both orientations (``[K, N]`` for ``MatMul``, ``[N, K]`` for ``Gemm`` with
   ``transB=1``). This does not depend on how an exporter names initializers (the TorchScript exporter calls a
   constant-folded transpose ``onnx::MatMul_123``, the dynamo exporter ``val_95``), and it proves the
   initializer holds exactly that layer's weight. A layer whose weight is in the graph other than as such a
   weight is an error; a layer the exporter pruned (its output unused) is simply absent.
4. :func:`onnx_nf4.quantize_model` inserts the NF4 weights as given (``prequantized``).

A bitsandbytes ``Embedding4bit`` / ``EmbeddingNF4`` table ``[V, H]`` goes the same way: read from the module
(bitsandbytes cannot ``state_dict()`` it), swapped for a float ``nn.Embedding`` holding the decoded table, matched
by value to the exported ``Gather``'s table, and written as an NF4 lookup (``onnx_nf4.lookup::GatherNF4``) holding
bitsandbytes' own codes and absmax.

LoRA adapters (the ``lora_A`` / ``lora_B`` ``nn.Linear`` layers of peft) are found the same way and stay float
unless ``quantize_lora=True``: the graph computes ``base(x) + scale * lora_B(lora_A(x))`` as peft does.

Adapters switched at run time (``adapters={name: peft_dir}``, :mod:`onnx_nf4.torch.adapters`): the base model is
exported as above, each targeted layer's node is found by value the same way and gets LoRA graph inputs, and each
adapter is written beside the model as ``<stem>.<name>.onnx_adapter`` (:func:`adapter_file`).
"""

from __future__ import annotations

import hashlib
import inspect
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from ..codec.layout import dequantize_weight
from ..model.io import load_model
from ..passes.options import QuantizeOptions
from ..passes.report import QuantizationReport
from .adapters import (
    ADAPTER_SUFFIX,
    AdapterError,
    LoraAdapter,
    adapter_parameters,
    add_lora_inputs,
    check_base_shapes,
    read_adapters,
    target_modules,
    write_adapter_file,
)
from .bnb_layout import to_quantized_weight
from .bnb_modules import bnb_weight, find_embedding4bit, find_linear4bit
from .graph_weights import graph_weights, quantize_with_prequantized, table_weights

if TYPE_CHECKING:
    import torch

__all__ = ["adapter_file", "export"]

_LORA_CONTAINERS = frozenset({"lora_A", "lora_B"})


Digest = tuple[tuple[int, ...], str, str]


def _digest(array: np.ndarray, dtype: str) -> Digest:
    """``(shape, dtype, sha256 of the C-order bytes)`` of ``array``."""
    array = np.ascontiguousarray(array)
    return tuple(int(d) for d in array.shape), dtype, hashlib.sha256(array.data).hexdigest()


def _torch_digests(weight: torch.Tensor) -> list[Digest]:
    """Digests of a torch-layout weight ``[N, K]`` as a MatMul weight ``[K, N]`` and as itself (Gemm ``transB=1``)."""
    import torch

    weight = weight.detach().to("cpu")
    dtype = str(weight.dtype).removeprefix("torch.")
    if weight.dtype == torch.bfloat16:
        weight = weight.view(torch.int16)  # the same bytes; numpy has no bfloat16
    array = weight.numpy()
    return [_digest(array.T, dtype), _digest(array, dtype)]


def _initializer_digest(tensor: ir.TensorProtocol) -> Digest:
    dtype = tensor.dtype.name.lower()
    array = tensor.numpy()
    if tensor.dtype == ir.DataType.BFLOAT16:
        array = np.asarray(array).view(np.int16)
    return _digest(array, {"float": "float32", "double": "float64"}.get(dtype, dtype))


def _dequantized_linear_class():
    import torch

    class DequantizedLinear(torch.nn.Module):
        """Stand-in for a ``Linear4bit`` during export: ``x @ W.T + b`` with the decoded weight ``W [N, K]``."""

        def __init__(self, weight: torch.Tensor, bias: torch.nn.Parameter | None) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(weight, requires_grad=False)
            self.bias = bias

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            dtype = self.weight.dtype
            y = x if x.dtype == dtype else x.to(dtype)
            bias = self.bias
            if bias is not None and bias.dtype != dtype:
                bias = bias.to(dtype)
            y = torch.nn.functional.linear(y, self.weight, bias)
            return y if y.dtype == x.dtype else y.to(x.dtype)

    return DequantizedLinear


@contextmanager
def _swapped(model: torch.nn.Module, replacements: Mapping[str, torch.nn.Module]) -> Iterator[torch.nn.Module]:
    """``model`` with the submodules at ``replacements``' paths swapped in; restored on exit.

    Yields the module to export (the replacement itself when ``model`` is the replaced layer, path ``""``).
    """
    originals: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []
    try:
        for path, new in replacements.items():
            if not path:
                continue
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path)
            originals.append((parent, child, getattr(parent, child)))
            setattr(parent, child, new)
        yield replacements.get("", model)
    finally:
        for parent, child, old in reversed(originals):
            setattr(parent, child, old)


#: ``forward`` parameters that transformers models take as ``[batch, sequence]`` token tensors: the inputs whose
#: axes 0 and 1 are known to vary.
SEQUENCE_INPUTS = frozenset({"input_ids", "attention_mask", "token_type_ids", "position_ids"})


def _positional_parameter_names(model: torch.nn.Module, count: int) -> list[str] | None:
    """The names of ``forward``'s first ``count`` positional parameters (``None`` when it has fewer, e.g. ``*args``)."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return positional[:count] if len(positional) >= count else None


def _known_dynamic_axes(
    model: torch.nn.Module, names: Sequence[str], args: tuple[Any, ...], *, batch_everywhere: bool
) -> dict[str, dict[int, str]]:
    """``dynamic_axes`` for the axes known to vary: ``batch`` (axis 0) and ``sequence`` (axis 1) of every rank-2
    positional argument whose ``forward`` parameter is in :data:`SEQUENCE_INPUTS`; with ``batch_everywhere``, also
    axis 0 of every other tensor argument of rank >= 1. ``names`` are the graph input names of ``args``."""
    parameters = _positional_parameter_names(model, len(args)) or [None] * len(args)
    axes: dict[str, dict[int, str]] = {}
    for name, parameter, arg in zip(names, parameters, args, strict=False):
        rank = getattr(arg, "ndim", 0)
        if parameter in SEQUENCE_INPUTS and rank == 2:
            axes[name] = {0: "batch", 1: "sequence"}
        elif batch_everywhere and rank >= 1:
            axes[name] = {0: "batch"}
    return axes


def _torch_export(
    model: torch.nn.Module,
    args: tuple[Any, ...],
    path: Path,
    *,
    kwargs: Mapping[str, Any] | None,
    dynamo: bool,
    opset_version: int | None,
    input_names: Sequence[str] | None,
    output_names: Sequence[str] | None,
    dynamic_axes: Mapping[str, Any] | bool | None,
    dynamic_shapes: Any,
) -> None:
    """``torch.onnx.export`` to ``path`` with the dynamic dimensions that :func:`export` documents.

    With the default ``dynamic_axes=None``, a dynamo export that fails because the model fixes a dimension marked
    dynamic (say a sequence length) is repeated with static shapes, with a warning: the default never fails where
    ``torch.onnx.export``'s own default (static shapes) succeeds.
    """
    import torch

    names = list(input_names) if input_names is not None else _positional_parameter_names(model, len(args))
    names = names or [f"input_{i}" for i in range(len(args))]
    if dynamic_shapes is not None and not dynamo:
        raise ValueError("dynamic_shapes needs the dynamo exporter (dynamo=True); use dynamic_axes with dynamo=False")
    if dynamic_shapes is not None and dynamic_axes not in (None, False):
        raise ValueError("give dynamic_axes or dynamic_shapes, not both")
    if dynamic_shapes is not None or dynamic_axes is False:
        axes: Mapping[str, Any] = {}
    elif dynamic_axes is None or dynamic_axes is True:
        axes = _known_dynamic_axes(model, names, args, batch_everywhere=dynamic_axes is True)
    else:
        axes = dict(dynamic_axes)
    options: dict[str, Any] = {
        "kwargs": dict(kwargs) if kwargs else None,
        "input_names": names,
        "output_names": list(output_names) if output_names is not None else None,
        "dynamo": dynamo,
    }
    if dynamic_shapes is not None:
        options["dynamic_shapes"] = dynamic_shapes
    if opset_version is not None:
        options["opset_version"] = opset_version
    if dynamo:
        options.update(verbose=False, external_data=True)

    def run(dynamic: Mapping[str, Any]) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            # dynamic_axes is the documented way to name dynamic dims for both exporters; the dynamo exporter
            # converts it to dynamic_shapes and warns about that conversion.
            warnings.filterwarnings("ignore", message=".*dynamic_axes.*", category=UserWarning)
            warnings.filterwarnings(
                "ignore", message=".*from_dynamic_axes_to_dynamic_shapes.*", category=DeprecationWarning
            )
            warnings.filterwarnings("ignore", message="# The axis name: .* will not be used", category=UserWarning)
            torch.onnx.export(model, args, str(path), dynamic_axes=dict(dynamic) or None, **options)

    try:
        run(axes)
    except torch.onnx.errors.OnnxExporterError as err:
        if not (dynamo and dynamic_axes is None and axes):
            raise
        dims = "; ".join(f"{name}: {', '.join(map(str, marked.values()))}" for name, marked in axes.items())
        # torch.export's own error (the cause) ends with the dimension it found fixed
        lines = [line.strip(" -") for line in str(err.__cause__ or err).splitlines() if line.strip(" -")]
        reason = lines[-1] if lines else type(err).__name__
        warnings.warn(
            f"the model does not export with dynamic {dims} ({reason}); exported with static shapes instead. "
            "Pass dynamic_axes=False for static shapes without this attempt, or dynamic_axes / dynamic_shapes to "
            "choose the dynamic dimensions.",
            UserWarning,
            stacklevel=3,
        )
        run({})


def _lora_linears(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """peft's LoRA adapter layers: the ``nn.Linear`` modules inside a ``lora_A`` / ``lora_B`` container."""
    import torch

    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and _LORA_CONTAINERS & set(name.split("."))
    }


def adapter_file(path: str | os.PathLike[str], name: str) -> Path:
    """The adapter file :func:`export` writes for adapter ``name`` beside ``path``: ``<stem>.<name>.onnx_adapter``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.{name}{ADAPTER_SUFFIX}")


def _adapter_modules(model: torch.nn.Module, adapters: list[LoraAdapter]) -> dict[str, str]:
    """The path in ``model`` of each module the adapters target (peft's path, or one ending in ``.<peft path>``).

    Raises:
        AdapterError: a module ``model`` does not have (or has twice), one that is not a ``Linear`` /
            ``Linear4bit`` layer, or one of another shape than the adapter's.
    """
    import torch

    names = dict(model.named_modules())
    paths: dict[str, str] = {}
    shapes: dict[str, tuple[int, int]] = {}
    for module in target_modules(adapters):
        found = [name for name in names if name == module or name.endswith(f".{module}")]
        if len(found) > 1:
            raise AdapterError(f"LoRA layer {module!r} matches several modules of the model: {found}")
        if not found:
            continue  # check_base_shapes names it
        layer = names[found[0]]
        if not isinstance(layer, torch.nn.Linear):  # bitsandbytes' Linear4bit is one too
            raise AdapterError(f"LoRA layer {module!r} is a {type(layer).__name__}; supported: LoRA on Linear layers")
        paths[module] = found[0]
        shapes[module] = (int(layer.in_features), int(layer.out_features))
    check_base_shapes(adapters, shapes)
    return paths


def _add_adapters(
    ir_model: ir.Model, module_keys: Mapping[str, set[Digest]], adapters: list[LoraAdapter], path: Path
) -> None:
    """Give the nodes of the targeted layers LoRA inputs; write each adapter's file beside ``path``."""
    nodes: dict[str, list[ir.Node]] = {module: [] for module in module_keys}
    for node in ir_model.graph:
        if node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        value = node.inputs[1]
        if not value.is_initializer() or value.is_graph_input() or value.const_value is None:
            continue
        key = _initializer_digest(value.const_value)
        for module, keys in module_keys.items():
            if key in keys:
                nodes[module].append(node)
    for module, found in nodes.items():
        if len(found) != 1:
            where = "no MatMul/Gemm node" if not found else f"{len(found)} nodes"
            raise AdapterError(f"LoRA layer {module!r}: {where} of the exported graph has its weight as a constant")
    chosen = {module: found[0] for module, found in nodes.items()}
    dtypes = {node.inputs[1].const_value.dtype for node in chosen.values()}  # type: ignore[union-attr]
    if len(dtypes) != 1:
        raise AdapterError(f"the LoRA layers have weights of several dtypes ({sorted(d.name for d in dtypes)})")
    (dtype,) = dtypes
    shapes = add_lora_inputs(ir_model, chosen, dtype)
    for adapter in adapters:
        write_adapter_file(adapter_file(path, adapter.name), adapter_parameters(adapter, shapes, dtype.numpy()))


def export(
    model: torch.nn.Module,
    args: Any,
    path: str | os.PathLike[str],
    *,
    options: QuantizeOptions | None = None,
    block_size: int | None = None,
    double_quant: bool | None = None,
    format: str | None = None,
    kwargs: Mapping[str, Any] | None = None,
    dynamo: bool = True,
    opset_version: int | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: Mapping[str, Any] | bool | None = None,
    dynamic_shapes: Any = None,
    quantize_float: bool | None = None,
    quantize_lora: bool = False,
    exclude: Iterable[str] | None = None,
    min_elements: int | None = None,
    external_data: bool | None = None,
    adapters: Mapping[str, str | os.PathLike[str]] | None = None,
) -> QuantizationReport:
    """Export ``model`` with ``torch.onnx.export`` and write it to ``path`` with NF4 weights.

    A float model is exported and then quantized by :func:`onnx_nf4.quantize_model` exactly as
    ``onnx-nf4 quantize`` would quantize the exported file. A model with bitsandbytes ``Linear4bit`` layers (NF4,
    any block size, with or without double quantization) gets a ``MatMulNF4`` for each of them holding
    bitsandbytes' codes and statistics, without re-quantizing (see the module docstring and
    ``docs/torch_export.md``); so does each bitsandbytes ``EmbeddingNF4`` (an NF4 lookup with its own bytes); its
    other layers stay float unless ``quantize_float=True``.

    Args:
        model: the module to export (put it in ``eval()`` mode first); it is left as it was.
        args: the example positional inputs (a tensor or a tuple), as for ``torch.onnx.export``.
        path: the ``.onnx`` file to write.
        options, block_size, double_quant, format, exclude, min_elements, external_data: as for
            :func:`onnx_nf4.quantize_model`, for the float weights that are quantized (``external_data=None``
            writes ``<file name>.data`` only above 2 GB). ``exclude`` also applies to ``Linear4bit`` layers (an
            excluded one stays a float ``MatMul`` holding its decoded weight).
        kwargs: example keyword inputs.
        dynamo: ``True`` (default): the ``torch.export``-based exporter (the one PyTorch develops and defaults to);
            ``False``: the TorchScript exporter (faster to run, deprecated by PyTorch).
        opset_version: ONNX opset of the export (the exporter's default when ``None``).
        input_names: names of the graph inputs (default: the names of ``forward``'s positional parameters).
        output_names: names of the graph outputs (default: the exporter's).
        dynamic_axes: which input dimensions stay dynamic in the graph.
            ``None`` (default): only those known to vary: ``batch`` (axis 0) and ``sequence`` (axis 1) of the rank-2
            positional inputs whose ``forward`` parameter is a transformers token input (:data:`SEQUENCE_INPUTS`:
            ``input_ids``, ``attention_mask``, ``token_type_ids``, ``position_ids``); every other dimension is
            static, as with ``torch.onnx.export``'s defaults. Should the model fix one of those dimensions, the
            dynamo export is repeated with static shapes, with a ``UserWarning``.
            ``True``: the same, plus axis 0 (``batch``) of every other tensor input of rank >= 1.
            ``False``: static shapes. A mapping: ``torch.onnx.export``'s ``dynamic_axes``, passed as given.
        dynamic_shapes: ``torch.onnx.export``'s ``dynamic_shapes`` (``torch.export.Dim`` specs; dynamo exporter
            only), passed as given, instead of ``dynamic_axes``.
        quantize_float: quantize the float ``MatMul`` / ``Gemm`` weights; default: ``True`` for a model without
            ``Linear4bit`` layers, ``False`` for a model with them.
        quantize_lora: also quantize peft's LoRA adapter weights when float weights are quantized (default: they
            stay float).
        adapters: peft LoRA adapter folders by name, switched at run time: ``model`` is the base (without peft
            layers); each targeted layer gets LoRA graph inputs (rank 0 by default: the base) and adapter ``name``
            is written to :func:`adapter_file` ``(path, name)`` for ``onnxruntime.LoraAdapter`` /
            ``RunOptions.add_active_adapter`` (see :mod:`onnx_nf4.torch.adapters`).

    Returns:
        The :class:`~onnx_nf4.passes.report.QuantizationReport` (bitsandbytes layers show ``rel_rms_error`` 0: their
        float weight in the exported graph is their own decoded weight).

    Raises:
        BnbFormatError: a ``Linear4bit`` layer that cannot be stored exactly (FP4, not quantized yet, a block
            structure ``MatMulNF4`` cannot represent); the message names the layer.
        ValueError: a ``Linear4bit`` layer whose weight is in the exported graph but not as the constant weight of a
            ``MatMul`` / ``Gemm``, or invalid quantization settings.
        AdapterError: an adapter that is missing, unsupported, or for another base model.
    """
    import torch

    settings = {"block_size": block_size, "double_quant": double_quant, "format": format, "exclude": exclude}
    options = QuantizeOptions.build(options, **settings, min_elements=min_elements, external_data=external_data)
    args = args if isinstance(args, tuple) else (args,)
    bnb_layers = find_linear4bit(model)
    bnb_tables = find_embedding4bit(model)
    quantized = {
        name: to_quantized_weight(bnb_weight(name, module)) for name, module in {**bnb_layers, **bnb_tables}.items()
    }
    lora = _lora_linears(model)
    lora_adapters = read_adapters(adapters)
    if lora_adapters and lora:
        raise AdapterError(
            "with adapters=..., pass the base model without peft LoRA layers (e.g. peft_model.unload()); the model "
            f"holds LoRA layers such as {next(iter(lora))!r}"
        )
    adapter_modules = _adapter_modules(model, lora_adapters)
    if quantize_float is None:
        quantize_float = not bnb_layers

    substitute = _dequantized_linear_class()
    replacements: dict[str, torch.nn.Module] = {}
    layer_keys: dict[Digest, str] = {}
    for name, module in bnb_layers.items():
        dtype = module.weight.quant_state.dtype
        decoded = torch.from_numpy(np.ascontiguousarray(dequantize_weight(quantized[name]).T)).to(dtype)
        replacements[name] = substitute(decoded, module.bias)
        for key in _torch_digests(decoded):
            layer_keys.setdefault(key, name)
    table_keys: dict[Digest, str] = {}
    for name, module in bnb_tables.items():
        decoded = torch.from_numpy(np.ascontiguousarray(dequantize_weight(quantized[name]).T)).to(module.dtype)
        replacements[name] = torch.nn.Embedding.from_pretrained(decoded, freeze=True)
        for key in _torch_digests(decoded)[1:]:  # the table [V, H] as the Gather reads it
            table_keys.setdefault(key, name)
    lora_keys = {key for module in lora.values() for key in _torch_digests(module.weight)}
    adapter_keys = {
        module: set(
            _torch_digests(replacements[path].weight if path in replacements else model.get_submodule(path).weight)
        )
        for module, path in adapter_modules.items()
    }

    target = Path(path)
    if not target.absolute().parent.is_dir():
        raise FileNotFoundError(f"cannot write {target}: directory {target.absolute().parent} does not exist")
    with tempfile.TemporaryDirectory(prefix=".onnx_nf4_export_", dir=target.absolute().parent) as tmp:
        float_path = Path(tmp) / "float.onnx"
        with _swapped(model, replacements) as to_export:
            _torch_export(
                to_export,
                args,
                float_path,
                kwargs=kwargs,
                dynamo=dynamo,
                opset_version=opset_version,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                dynamic_shapes=dynamic_shapes,
            )
        if not bnb_layers and not bnb_tables and not lora and not lora_adapters:
            from ..api import quantize_model

            _, report = quantize_model(float_path, target, options)
            return report
        ir_model = load_model(float_path)
        prequantized = {}
        lora_weights = set()
        found: set[str] = set()
        for weight in graph_weights(ir_model):
            key = _initializer_digest(weight.tensor)
            if key in layer_keys:
                layer = layer_keys[key]
                prequantized[weight.name] = quantized[layer]
                found.add(layer)
            elif key in lora_keys:
                lora_weights.add(weight.name)
        for name, tensor in table_weights(ir_model).items():
            table = table_keys.get(_initializer_digest(tensor))
            if table is not None:
                prequantized[name] = quantized[table]
        shapes = {key[0] for key, layer in layer_keys.items() if layer not in found}
        stray = sorted(
            {
                layer_keys[key]
                for value in ir_model.graph.initializers.values()
                if value.const_value is not None
                and value.name not in prequantized
                and tuple(value.const_value.shape) in shapes
                for key in [_initializer_digest(value.const_value)]
                if key in layer_keys and layer_keys[key] not in found
            }
        )
        if stray:
            raise ValueError(
                f"the weight of Linear4bit layer(s) {', '.join(map(repr, stray))} is in the exported graph, but not "
                "as the constant weight of a MatMul/Gemm, so their NF4 weights cannot be attached"
            )
        if lora_adapters:
            _add_adapters(ir_model, adapter_keys, lora_adapters, target)
        return quantize_with_prequantized(
            ir_model,
            target,
            prequantized,
            keep_float=() if quantize_lora else lora_weights,
            quantize_float=quantize_float,
            options=options,
        )
