"""peft LoRA adapters as onnxruntime adapter files (``.onnx_adapter``) over one exported base model.

One exported model serves every adapter: for each targeted layer (a ``MatMul`` / ``Gemm`` ``y = x @ W``, float or
``MatMulNF4``) the graph computes ``y + (x @ A) @ B`` where ``A`` and ``B`` are **graph inputs** named

* ``<module>.lora_A.weight``: ``[K, r]``, peft's ``lora_A.weight`` ``[r, K]`` transposed;
* ``<module>.lora_B.weight``: ``[r, N]``, peft's ``lora_B.weight`` ``[N, r]`` transposed and multiplied by the
  adapter's scaling (``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``; ``alpha_pattern`` /
  ``rank_pattern`` as peft applies them), as onnxruntime-genai's model builder folds it;

``<module>`` is the layer's path in the model peft wrapped (``model.layers.0.self_attn.q_proj``), ``r`` a symbolic
dimension of its own per layer. Each input also has an initializer of rank 0 (``[K, 0]`` and ``[0, N]``), the
value onnxruntime uses when the input is not fed: with no adapter active the LoRA term is an empty product, exactly
zero, and the model computes the base. An adapter file (:func:`write_adapter_file`, onnxruntime's
``AdapterFormat``) holds one value for **every** LoRA input of the model (rank 0 for the layers that adapter does
not target), so activating it (``RunOptions.add_active_adapter`` in onnxruntime, ``Generator.set_active_adapter``
in onnxruntime-genai) sets them all.

Folding the scaling into ``B`` rounds ``B * scaling`` once; peft multiplies the product ``(x A^T) B^T`` by the
scaling instead. Both are exact when the scaling is a power of two (``lora_alpha = 2 r``, say).

Supported: peft's ``LORA`` type on ``Linear`` layers (and on bitsandbytes ``Linear4bit`` layers, QLoRA), saved as
``adapter_config.json`` + ``adapter_model.safetensors``. Refused, with the reason: other peft types (LoHa, LoKr,
AdaLoRA, IA3, ...), DoRA (``use_dora``), LoRA on embeddings or convolutions, ``lora_bias``, ``fan_in_fan_out``,
``modules_to_save`` / ``trainable_token_indices`` (whole trained modules, not low-rank terms), trained base biases
(``bias`` other than ``"none"``), initializations that change the base (PiSSA, OLoRA, CorDA, LoftQ; convert them
with peft first), rank 0.
Reading adapters needs numpy only; writing adapter files needs onnxruntime >= 1.20.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from .safetensors_io import SafetensorsError, read_safetensors

__all__ = [
    "ADAPTER_SUFFIX",
    "AdapterError",
    "LoraAdapter",
    "LoraLayer",
    "adapter_parameters",
    "add_lora_inputs",
    "check_base_shapes",
    "lora_input_names",
    "read_adapters",
    "read_peft_adapter",
    "target_modules",
    "write_adapter_file",
]

#: The file name suffix onnxruntime and onnxruntime-genai give adapter files.
ADAPTER_SUFFIX = ".onnx_adapter"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: What is supported, as error messages say it.
SUPPORTED = "peft LoRA adapters (peft_type LORA) on Linear / bitsandbytes Linear4bit layers"
#: peft's prefix of the saved tensor names (``PeftModel.base_model.model``).
_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
#: Config options with a non-default value that the graph cannot express: (key, default, what it is).
_REFUSED_OPTIONS = (
    ("use_dora", False, "DoRA (weight-decomposed LoRA, use_dora=True)"),
    ("lora_bias", False, "lora_bias=True (a bias on lora_B)"),
    ("fan_in_fan_out", False, "fan_in_fan_out=True (Conv1D layers of GPT-2 style models)"),
    ("modules_to_save", None, "modules_to_save (whole trained copies of modules, not low-rank terms)"),
    ("trainable_token_indices", None, "trainable_token_indices (trained embedding rows)"),
    ("target_parameters", None, "target_parameters (LoRA on nn.Parameter, e.g. MoE experts)"),
    ("layer_replication", None, "layer_replication"),
    ("use_qalora", False, "QA-LoRA (use_qalora=True)"),
    ("alora_invocation_tokens", None, "activated LoRA (alora_invocation_tokens)"),
    ("bias", "none", "bias='all' / 'lora_only' (trained biases of the base layers)"),
)
#: ``init_lora_weights`` methods that also change the base weights: the adapter fits only that changed base
#: (peft's ``save_pretrained(path_initial_model_for_weight_conversion=...)`` converts it to a plain LoRA adapter).
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


class AdapterError(ValueError):
    """An adapter that cannot be exported (missing files, unsupported peft type or option, rank 0, or a base model
    it does not fit); the message names the adapter and says what is supported."""


@dataclass(frozen=True)
class LoraLayer:
    """One layer's LoRA weights, as peft stores them (float32).

    Attributes:
        a: ``lora_A.weight``, ``[r, K]``.
        b: ``lora_B.weight``, ``[N, r]``.
        scaling: the factor peft multiplies ``x @ a.T @ b.T`` by.
    """

    a: np.ndarray
    b: np.ndarray
    scaling: float

    @property
    def shape(self) -> tuple[int, int]:
        """``(K, N)`` of the base layer the adapter was trained for."""
        return int(self.a.shape[1]), int(self.b.shape[0])


@dataclass(frozen=True)
class LoraAdapter:
    """A peft LoRA adapter: its name (the name it is activated by), folder, and layers by module path."""

    name: str
    path: Path
    layers: dict[str, LoraLayer]


def _as_float32(array: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    return np.asarray(array, dtype=np.float32)


def _safetensors_dtypes(path: Path) -> dict[str, str]:
    with open(path, "rb") as file:
        (length,) = np.frombuffer(file.read(8), "<u8")
        header = json.loads(file.read(int(length)))
    return {name: info["dtype"] for name, info in header.items() if name != "__metadata__"}


def _pattern_value(patterns: Mapping[str, object], module: str, default: object) -> object:
    """peft's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key matching the end of ``module``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _check_config(name: str, folder: Path, config: dict) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(
            f"adapter {name!r} ({folder}): peft type {peft_type!r} is not supported; supported: {SUPPORTED}"
        )
    for key, default, what in _REFUSED_OPTIONS:
        value = config.get(key, default)
        if value not in (default, None, False, [], {}):
            raise AdapterError(f"adapter {name!r} ({folder}): {what} is not supported; supported: {SUPPORTED}")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise AdapterError(
            f"adapter {name!r} ({folder}): init_lora_weights={init!r} also changed the base weights, so the adapter "
            "does not fit the original base; save it with peft's path_initial_model_for_weight_conversion to "
            "convert it to a plain LoRA adapter"
        )
    rank = config.get("r")
    if not isinstance(rank, int) or rank <= 0:
        raise AdapterError(f"adapter {name!r} ({folder}): rank r={rank!r}; a LoRA adapter needs r >= 1")


def read_peft_adapter(path: str | os.PathLike[str], name: str) -> LoraAdapter:
    """Read and check a peft LoRA adapter folder (``save_pretrained``) to be activated as ``name``.

    Raises:
        AdapterError: a missing or unreadable file, an unsupported peft type or option (see the module
            docstring), a layer of rank 0, or ``lora_A`` / ``lora_B`` tensors that do not pair up.
    """
    folder = Path(path)
    if not _NAME.match(name):
        raise AdapterError(f"adapter name {name!r}: use letters, digits, '.', '_' and '-' only")
    if not folder.is_dir():
        raise AdapterError(f"adapter {name!r}: {folder} is not a directory (expected a peft adapter folder)")
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not config_path.is_file():
        raise AdapterError(f"adapter {name!r}: {folder} has no {ADAPTER_CONFIG} (not a peft adapter folder)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterError(f"adapter {name!r}: {config_path} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"adapter {name!r}: {config_path} is not a JSON object")
    _check_config(name, folder, config)
    if not weights_path.is_file():
        other = (
            " (adapter_model.bin found: save with safe_serialization=True)" * (folder / "adapter_model.bin").is_file()
        )
        raise AdapterError(f"adapter {name!r}: {folder} has no {ADAPTER_WEIGHTS}{other}")
    try:
        tensors = read_safetensors(weights_path)
        dtypes = _safetensors_dtypes(weights_path)
    except (SafetensorsError, OSError, ValueError) as err:
        raise AdapterError(f"adapter {name!r}: {weights_path}: {err}") from None

    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, tensor in tensors.items():
        module_key = key.removeprefix(_PEFT_PREFIX)
        match = _LORA_KEY.match(module_key)
        if match is None:
            kind = "embedding LoRA" if "lora_embedding_" in key else "a tensor that is not a LoRA A/B weight"
            raise AdapterError(f"adapter {name!r}: {key!r} is {kind} ({list(tensor.shape)}); supported: {SUPPORTED}")
        if dtypes[key] not in ("F32", "F16", "BF16", "F64") or tensor.ndim != 2:
            raise AdapterError(
                f"adapter {name!r}: {key!r} is a {tensor.ndim}-D {dtypes[key]} tensor; LoRA on Linear layers has 2-D "
                f"float weights (convolution LoRA is not supported); supported: {SUPPORTED}"
            )
        pairs.setdefault(match["module"], {})[match["which"]] = _as_float32(tensor, dtypes[key])
    if not pairs:
        raise AdapterError(f"adapter {name!r}: {weights_path} holds no LoRA weights")
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    layers: dict[str, LoraLayer] = {}
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"adapter {name!r}: layer {module!r} has lora_{''.join(pair)} but not both A and B")
        a, b = pair["A"], pair["B"]
        if a.shape[0] != b.shape[1]:
            raise AdapterError(
                f"adapter {name!r}: layer {module!r}: lora_A {list(a.shape)} and lora_B {list(b.shape)} disagree on "
                "the rank"
            )
        rank = int(a.shape[0])
        if rank == 0:
            raise AdapterError(f"adapter {name!r}: layer {module!r} has rank 0; a LoRA adapter needs r >= 1")
        configured = _pattern_value(rank_pattern, module, config["r"])
        if configured != rank:
            raise AdapterError(f"adapter {name!r}: layer {module!r} has rank {rank} but the config says r={configured}")
        alpha = float(_pattern_value(alpha_pattern, module, config.get("lora_alpha", 8)))  # type: ignore[arg-type]
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        layers[module] = LoraLayer(np.ascontiguousarray(a), np.ascontiguousarray(b), scaling)
    return LoraAdapter(name, folder, layers)


def read_adapters(adapters: Mapping[str, str | os.PathLike[str]] | None) -> list[LoraAdapter]:
    """:func:`read_peft_adapter` for each ``name -> folder`` of ``adapters`` (in order); ``[]`` for ``None``."""
    return [read_peft_adapter(path, name) for name, path in (adapters or {}).items()]


def target_modules(adapters: Iterable[LoraAdapter]) -> list[str]:
    """Every module path some adapter targets, sorted: the layers that get LoRA inputs."""
    return sorted({module for adapter in adapters for module in adapter.layers})


def lora_input_names(module: str) -> tuple[str, str]:
    """The graph input names of ``module``'s LoRA ``A`` ``[K, r]`` and ``B`` ``[r, N]``."""
    return f"{module}.lora_A.weight", f"{module}.lora_B.weight"


def check_base_shapes(adapters: Iterable[LoraAdapter], shapes: Mapping[str, tuple[int, int]]) -> None:
    """Check that every adapter fits the base: each targeted module exists with the ``(K, N)`` of its LoRA weights.

    Args:
        shapes: ``(K, N)`` (in features, out features) of the base model's layers, by module path.

    Raises:
        AdapterError: a module the base does not have, or of another shape (an adapter trained for another base).
    """
    for adapter in adapters:
        for module, layer in adapter.layers.items():
            if module not in shapes:
                raise AdapterError(
                    f"adapter {adapter.name!r}: layer {module!r} is not a Linear layer of the base model (an adapter "
                    "for another model?)"
                )
            if tuple(shapes[module]) != layer.shape:
                (k, n), (bk, bn) = layer.shape, shapes[module]
                raise AdapterError(
                    f"adapter {adapter.name!r}: layer {module!r} was trained for in_features={k}, out_features={n}, "
                    f"but the base layer has in_features={bk}, out_features={bn} (an adapter for another base model)"
                )


def adapter_parameters(
    adapter: LoraAdapter, shapes: Mapping[str, tuple[int, int]], dtype: np.dtype | type = np.float32
) -> dict[str, np.ndarray]:
    """The value of every LoRA graph input for ``adapter``.

    Args:
        shapes: ``(K, N)`` of every module with LoRA inputs in the graph (the union of the adapters' targets).
        dtype: the graph's float type (float32, or float16 for a float16 model).

    ``A`` is ``lora_A.weight.T``; ``B`` is ``(lora_B.weight * scaling).T``, the product rounded once in float32.
    Modules the adapter does not target get rank-0 tensors (``[K, 0]`` and ``[0, N]``).
    """
    params: dict[str, np.ndarray] = {}
    for module, (k, n) in shapes.items():
        name_a, name_b = lora_input_names(module)
        layer = adapter.layers.get(module)
        if layer is None:
            params[name_a], params[name_b] = np.zeros((k, 0), dtype), np.zeros((0, n), dtype)
            continue
        params[name_a] = np.ascontiguousarray(layer.a.T).astype(dtype)
        scaled = layer.b * np.float32(layer.scaling)
        params[name_b] = np.ascontiguousarray(scaled.T).astype(dtype)
    return params


def write_adapter_file(path: str | os.PathLike[str], parameters: Mapping[str, np.ndarray]) -> Path:
    """Write ``parameters`` as an onnxruntime adapter file (``onnxruntime.AdapterFormat``), atomically.

    Raises:
        AdapterError: onnxruntime is missing or older than 1.20 (no ``AdapterFormat``).
    """
    try:
        import onnxruntime as ort

        adapter_format = ort.AdapterFormat
    except (ImportError, AttributeError):
        raise AdapterError(
            "writing .onnx_adapter files needs onnxruntime >= 1.20 (onnxruntime.AdapterFormat)"
        ) from None
    target = Path(path)
    writer = adapter_format()
    writer.set_adapter_version(1)
    writer.set_model_version(1)
    writer.set_parameters(
        {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value)) for name, value in parameters.items()}
    )
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.absolute().parent)
    os.close(handle)
    try:
        writer.export_adapter(temporary)
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def add_lora_inputs(model: ir.Model, nodes: Mapping[str, ir.Node], dtype: ir.DataType) -> dict[str, tuple[int, int]]:
    """Add the LoRA inputs of each ``module -> node`` to ``model`` (in place); return ``(K, N)`` by module.

    ``node`` is the base layer's ``MatMul`` (weight ``[K, N]``) or ``Gemm``; its output ``y`` is replaced, for
    all its consumers and as a graph output, by ``y + MatMul(MatMul(x, A), B)`` with ``A`` / ``B`` the graph
    inputs :func:`lora_input_names` (dtype ``dtype``, shapes ``[K, <module>.rank]`` and ``[<module>.rank, N]``,
    defaults of rank 0). ``x`` is the node's first input.
    """
    from ..model.graph import constant_tensor

    shapes: dict[str, tuple[int, int]] = {}
    graph = model.graph
    for module, node in nodes.items():
        weight = constant_tensor(node.inputs[1])
        assert weight is not None, f"{node.name}: the base weight of {module!r} is not a constant"
        rows, cols = (int(d) for d in weight.shape)
        transposed = node.op_type == "Gemm" and any(
            attr.name == "transB" and attr.as_int() == 1 for attr in node.attributes.values()
        )
        k, n = (cols, rows) if transposed else (rows, cols)
        shapes[module] = (k, n)
        rank = f"{module}.rank"
        name_a, name_b = lora_input_names(module)
        inputs = []
        for name, shape, empty in ((name_a, [k, rank], (k, 0)), (name_b, [rank, n], (0, n))):
            default = ir.tensor(np.zeros(empty, dtype.numpy()), name=name)
            value = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype), const_value=default)
            graph.inputs.append(value)
            graph.register_initializer(value)
            inputs.append(value)
        y = node.outputs[0]
        base = node.name or module
        xa = ir.Value(name=f"{base}/lora_A/output_0")
        delta = ir.Value(name=f"{base}/lora_B/output_0")
        summed = ir.Value(name=f"{base}/lora/output_0", type=y.type, shape=y.shape)
        for use in list(y.uses()):
            use.node.replace_input_with(use.idx, summed)
        for index, output in enumerate(graph.outputs):
            if output is y:  # the graph output keeps its name
                graph.outputs[index] = summed
                y.name, summed.name = f"{base}/base/output_0", y.name
        graph.insert_after(
            node,
            [
                ir.node("MatMul", [node.inputs[0], inputs[0]], outputs=[xa], name=f"{base}/lora_A/MatMul"),
                ir.node("MatMul", [xa, inputs[1]], outputs=[delta], name=f"{base}/lora_B/MatMul"),
                ir.node("Add", [y, delta], outputs=[summed], name=f"{base}/lora/Add"),
            ],
        )
    return shapes
