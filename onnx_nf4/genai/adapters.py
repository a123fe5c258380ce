"""LoRA adapters for ``export-genai``: one NF4 base folder, one ``.onnx_adapter`` file per peft adapter.

:func:`onnx_nf4.genai.export.export_genai` with ``adapters={name: peft_dir}`` builds the base as always and then:

1. reads and checks every adapter (:func:`onnx_nf4.torch.adapters.read_peft_adapter`) before any work, and,
   once the float checkpoint the builder reads is known, that each targeted layer exists there with the shape the
   adapter was trained for (:class:`PreparedAdapters`);
2. builds with the builder's q/k/v fusion off (``fuse_qkv=false``, as the builder does for its own LoRA models),
   so that every projection is a ``MatMul`` of its own;
3. finds each targeted layer's ``MatMul`` in the built decoder **by value** (its weight ``[K, N]`` equals the
   checkpoint's ``weight.T`` in the graph's dtype, bit for bit) and gives it LoRA graph inputs
   (:func:`onnx_nf4.torch.adapters.add_lora_inputs`), rewriting the built float model in place
   (:meth:`PreparedAdapters.add_to_folder`); the base weights are then quantized (calibration included) or mapped
   to bitsandbytes' bytes exactly as without adapters: those steps leave a weight that is a graph input alone;
4. writes ``adapters/<name>.onnx_adapter`` into the folder for each adapter (every LoRA input of the model, rank 0
   for the layers that adapter does not target).

onnxruntime-genai loads them with ``og.Adapters(model).load(path, name)`` and activates one per generator with
``generator.set_active_adapter(adapters, name)``; a generator with none active runs the base.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx_ir as ir

from ..model.graph import constant_tensor
from ..model.io import external_tensors, load_model, save_model
from ..op.contract import ONNX_DOMAINS
from ..torch.adapters import (
    ADAPTER_SUFFIX,
    AdapterError,
    LoraAdapter,
    adapter_parameters,
    add_lora_inputs,
    check_base_shapes,
    target_modules,
    write_adapter_file,
)
from ..torch.safetensors_io import read_safetensors
from .config import decoder_section, path_inside

__all__ = ["ADAPTER_FOLDER", "PreparedAdapters", "adapter_path", "builder_options_for_adapters"]

#: The folder, inside a genai folder, that holds the adapter files.
ADAPTER_FOLDER = "adapters"


def adapter_path(genai_dir: str | Path, name: str) -> Path:
    """Where ``export_genai`` writes adapter ``name`` in ``genai_dir``: ``adapters/<name>.onnx_adapter``."""
    return Path(genai_dir) / ADAPTER_FOLDER / f"{name}{ADAPTER_SUFFIX}"


def _checkpoint_weights(float_dir: Path, modules: Iterable[str]) -> dict[str, np.ndarray]:
    """``<module>.weight`` ``[N, K]`` of each module present in the float checkpoint (memory-mapped)."""
    wanted = {f"{module}.weight": module for module in modules}
    found: dict[str, np.ndarray] = {}
    if not wanted:
        return found
    for file in sorted(float_dir.glob("*.safetensors")):
        for key, tensor in read_safetensors(file).items():
            if key in wanted and tensor.ndim == 2:
                found[wanted[key]] = tensor
    return found


def _digest(array: np.ndarray) -> tuple[tuple[int, ...], str, str]:
    array = np.ascontiguousarray(array)
    return tuple(array.shape), array.dtype.str, hashlib.sha256(array.data).hexdigest()


class PreparedAdapters:
    """The adapters of one export, checked against the float checkpoint ``float_dir`` the builder reads.

    Raises (on construction):
        AdapterError: an adapter targets a layer the checkpoint does not have, or one of another shape.

    Attributes:
        adapters: the adapters, in the order given.
        shapes: ``(K, N)`` of every targeted layer, by module path (the model's LoRA inputs).
        dtype: the graph's float type.
    """

    def __init__(self, adapters: list[LoraAdapter], float_dir: Path, dtype: np.dtype) -> None:
        self.adapters = adapters
        self.dtype = np.dtype(dtype)
        self._float_dir = float_dir
        modules = target_modules(adapters)
        weights = _checkpoint_weights(float_dir, modules)
        check_base_shapes(adapters, {module: (int(w.shape[1]), int(w.shape[0])) for module, w in weights.items()})
        self.shapes = {module: (int(weights[module].shape[1]), int(weights[module].shape[0])) for module in modules}
        self._expected = {
            module: _digest(_to_graph_dtype(weights[module], self.dtype).T) for module in modules
        }  # the MatMul weight [K, N] each layer becomes

    def write_files(self, genai_dir: Path) -> list[Path]:
        """Write ``adapters/<name>.onnx_adapter`` of every adapter into ``genai_dir``; return the paths."""
        (genai_dir / ADAPTER_FOLDER).mkdir(exist_ok=True)
        return [
            write_adapter_file(
                adapter_path(genai_dir, adapter.name), adapter_parameters(adapter, self.shapes, self.dtype)
            )
            for adapter in self.adapters
        ]

    def add_to_folder(self, genai_dir: Path) -> None:
        """Give the decoder of the built float folder ``genai_dir`` its LoRA inputs (the model file is rewritten in
        place, keeping external data when it had it) and write the adapter files into the folder."""
        path = path_inside(genai_dir, decoder_section(genai_dir)["filename"])
        model = load_model(path)
        old_data = {Path(tensor.path).resolve() for tensor in external_tensors(model)}
        self.add_inputs(model)
        with tempfile.TemporaryDirectory(prefix=".lora_", dir=path.parent) as stage:
            save_model(model, Path(stage) / path.name, external_data=bool(old_data))
            written = sorted(Path(stage).iterdir())
            for file in written:
                os.replace(file, path.parent / file.name)
        for stale in old_data - {(path.parent / file.name).resolve() for file in written}:
            stale.unlink()
        self.write_files(genai_dir)

    def add_inputs(self, model: ir.Model) -> None:
        """Give each targeted layer's ``MatMul`` of the built ``model`` its LoRA graph inputs (in place).

        Raises:
            AdapterError: a targeted layer that is not one ``MatMul`` of its own in the graph (fused with another
                projection by a builder option such as ``fuse_mlp_gate_up``), or whose weight appears twice.
        """
        by_digest: dict[tuple, list[ir.Node]] = {}
        for node in model.graph:
            if node.op_type != "MatMul" or node.domain not in ONNX_DOMAINS or len(node.inputs) < 2:
                continue
            tensor = constant_tensor(node.inputs[1])
            if tensor is None or len(tensor.shape) != 2 or tensor.dtype.numpy() != self.dtype:
                continue
            by_digest.setdefault(_digest(tensor.numpy()), []).append(node)
        nodes: dict[str, ir.Node] = {}
        for module, digest in self._expected.items():
            matches = by_digest.get(digest, [])
            if len(matches) != 1:
                reason = (
                    "no MatMul of the built model has its weight (fused with another projection? build without "
                    "fuse_qkv / fuse_mlp_gate_up)"
                    if not matches
                    else f"{len(matches)} MatMul nodes have its weight ({', '.join(n.name for n in matches)})"
                )
                raise AdapterError(f"LoRA layer {module!r}: {reason}")
            nodes[module] = matches[0]
        shapes = add_lora_inputs(model, nodes, ir.DataType.from_numpy(self.dtype))
        assert shapes == self.shapes, (shapes, self.shapes)


def _to_graph_dtype(weight: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``weight`` as the builder stores it: float32 read exactly (bfloat16 widened), then cast to ``dtype``."""
    if weight.dtype == np.uint16:  # bfloat16 bit patterns (read_safetensors)
        weight = (weight.astype(np.uint32) << 16).view(np.float32)
    return np.asarray(weight, dtype=np.float32).astype(dtype)


def builder_options_for_adapters(options: Mapping[str, object]) -> dict[str, object]:
    """The builder's ``extra_options`` for a model with LoRA inputs: q/k/v fusion off unless set explicitly."""
    return {"fuse_qkv": False, **options}
