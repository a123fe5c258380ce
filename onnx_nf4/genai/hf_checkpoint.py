"""transformers checkpoint folders: what they hold, and a float copy of a bitsandbytes NF4 checkpoint.

A checkpoint folder (``save_pretrained``) holds ``config.json``, the weights as ``model.safetensors`` or as shards
listed by ``model.safetensors.index.json``, and tokenizer / generation files. :func:`checkpoint_kind` reads the
config's ``quantization_config`` and refuses what the NF4 export cannot represent (8-bit, FP4, other methods).

:func:`write_float_checkpoint` turns a bitsandbytes NF4 checkpoint into a float32 one for onnxruntime-genai's model
builder: each 4-bit weight is decoded exactly from bitsandbytes' bytes (``NF4[code] * absmax`` in float32, the
double-quantized absmax decoded first, see :func:`onnx_nf4.dequantize_weight`), every other tensor is kept as it is,
and ``quantization_config`` is dropped. It returns the :class:`~onnx_nf4.QuantizedWeight` of each layer, holding
bitsandbytes' own bytes (:mod:`onnx_nf4.torch.bnb_layout`). Needs torch and safetensors (the builder needs them too).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..codec.layout import QuantizedWeight, dequantize_weight

__all__ = [
    "CheckpointError",
    "CheckpointKind",
    "checkpoint_kind",
    "read_config",
    "write_float_checkpoint",
]

CONFIG = "config.json"
_INDEX = "model.safetensors.index.json"
#: The tensors bitsandbytes saves beside a 4-bit ``L.weight`` (codes): statistics and the packed quant state.
_BNB_AUX = re.compile(r"\.weight\.(?:absmax|quant_map|nested_absmax|nested_quant_map|quant_state\..+)$")


class CheckpointError(ValueError):
    """A checkpoint folder the export cannot use (the message says why and what to do)."""


@dataclass(frozen=True)
class CheckpointKind:
    """What a checkpoint's ``config.json`` says.

    Attributes:
        architecture: ``architectures[0]`` (e.g. ``LlamaForCausalLM``).
        bnb_nf4: quantized by bitsandbytes to 4-bit NF4.
        double_quant: ``bnb_4bit_use_double_quant`` (only with ``bnb_nf4``).
    """

    architecture: str
    bnb_nf4: bool
    double_quant: bool


def read_config(hf_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``config.json`` of a transformers checkpoint folder."""
    folder = Path(hf_dir)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory (expected a transformers checkpoint folder)")
    path = folder / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {CONFIG} (not a transformers checkpoint folder)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return config


def checkpoint_kind(config: dict[str, Any]) -> CheckpointKind:
    """Classify a checkpoint config; raise :class:`CheckpointError` for quantizations the export cannot keep."""
    architectures = config.get("architectures") or []
    if not architectures or not isinstance(architectures[0], str):
        raise CheckpointError(f"{CONFIG} names no architecture ('architectures' is missing or empty)")
    quant = config.get("quantization_config")
    if not quant:
        return CheckpointKind(architectures[0], bnb_nf4=False, double_quant=False)
    method = quant.get("quant_method")
    if method != "bitsandbytes":
        raise CheckpointError(
            f"quantization method {method!r} is not supported: export-genai takes float checkpoints and "
            "bitsandbytes NF4 checkpoints (load_in_4bit, bnb_4bit_quant_type 'nf4')"
        )
    if quant.get("load_in_8bit") or quant.get("_load_in_8bit"):
        raise CheckpointError(
            "8-bit bitsandbytes checkpoints (load_in_8bit) are not supported: MatMulNF4 stores 4-bit NF4 weights; "
            "export the float checkpoint, or quantize it with load_in_4bit and bnb_4bit_quant_type='nf4'"
        )
    if not (quant.get("load_in_4bit") or quant.get("_load_in_4bit")):
        raise CheckpointError("the bitsandbytes quantization_config sets neither load_in_4bit nor load_in_8bit")
    quant_type = quant.get("bnb_4bit_quant_type", "fp4")  # bitsandbytes' and transformers' default is fp4
    if quant_type != "nf4":
        raise CheckpointError(
            f"bitsandbytes 4-bit type {quant_type!r} is not supported: MatMulNF4 stores NF4 only "
            "(quantize with bnb_4bit_quant_type='nf4')"
        )
    return CheckpointKind(architectures[0], bnb_nf4=True, double_quant=bool(quant.get("bnb_4bit_use_double_quant")))


def _weight_files(folder: Path) -> list[Path]:
    index = folder / _INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: not a valid safetensors index ({err})") from None
        return [folder / name for name in dict.fromkeys(weight_map.values())]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(
        f"{folder}: no model.safetensors or {_INDEX}; save the checkpoint with save_pretrained(safe_serialization=True)"
    )


def write_float_checkpoint(
    hf_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]
) -> dict[str, QuantizedWeight]:
    """Write the float32 copy of the bitsandbytes NF4 checkpoint ``hf_dir`` to the new folder ``out_dir``.

    Returns the ``MatMulNF4`` weight of every 4-bit layer (bitsandbytes' bytes), keyed by module path
    (``model.layers.0.self_attn.q_proj``). The float weight of layer ``L`` is exactly ``dequantize_weight(q).T``.

    Raises:
        CheckpointError: no safetensors weights, or no 4-bit layer in them.
        onnx_nf4.torch.bnb_layout.BnbFormatError: a layer that is not NF4 or is inconsistent (naming it).
    """
    import torch
    from safetensors.torch import load_file, save_file

    from ..torch.state_dict import bnb_quantized_weights

    source, target = Path(hf_dir), Path(out_dir)
    tensors: dict[str, torch.Tensor] = {}
    for file in _weight_files(source):
        tensors.update(load_file(str(file)))
    quantized = bnb_quantized_weights(tensors)
    if not quantized:
        raise CheckpointError(f"{source}: the config says bitsandbytes 4-bit, but the weights hold no 4-bit layer")
    float_tensors = {name: tensor for name, tensor in tensors.items() if not _BNB_AUX.search(name)}
    for layer, weight in quantized.items():
        key = f"{layer}.weight" if layer else "weight"
        float_tensors[key] = torch.from_numpy(dequantize_weight(weight).T.copy())
    target.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in float_tensors.items()}, str(target / "model.safetensors"), {"format": "pt"}
    )
    config = read_config(source)
    config.pop("quantization_config", None)
    config["torch_dtype"] = "float32"
    if "dtype" in config:
        config["dtype"] = "float32"
    (target / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    weight_files = {file.name for file in _weight_files(source)} | {_INDEX, CONFIG}
    for path in source.iterdir():
        if path.is_file() and path.name not in weight_files:
            shutil.copy2(path, target / path.name)
    return quantized
