"""From PyTorch to NF4 ONNX: export helpers, and bitsandbytes / QLoRA models without re-quantizing.

* :func:`export`: ``torch.onnx.export`` + :func:`onnx_nf4.quantize_model` in one call; bitsandbytes
  ``Linear4bit`` (NF4) layers keep bitsandbytes' own codes and statistics, peft LoRA adapters stay float; with
  ``adapters={name: peft_dir}`` they become ``.onnx_adapter`` files switched at run time (:mod:`.adapters`).
* :func:`export_bnb_state_dict`: a bitsandbytes-quantized state dict or ``.safetensors`` file mapped into an
  exported float ONNX model by layer name, without bitsandbytes (``onnx-nf4 export-bnb`` on the command line).
* :func:`bnb_quantized_weights`: the ``MatMulNF4`` weights of such a state dict, by layer name.

PyTorch is imported only by :func:`export`; the state-dict path needs neither PyTorch nor bitsandbytes for a
``.safetensors`` file. See ``docs/torch_export.md``.

An integration (layer 7): may import :mod:`onnx_nf4.api` and every layer below it, never :mod:`onnx_nf4.genai` or
the CLI (``onnx-nf4 export-bnb`` lives in :mod:`onnx_nf4.cli.export_bnb`).
"""

from __future__ import annotations

from .adapters import AdapterError
from .bnb_layout import BnbFormatError, BnbWeight, to_quantized_weight
from .exporter import adapter_file, export
from .state_dict import bnb_quantized_weights, export_bnb_state_dict

__all__ = [
    "AdapterError",
    "BnbFormatError",
    "BnbWeight",
    "adapter_file",
    "bnb_quantized_weights",
    "export",
    "export_bnb_state_dict",
    "to_quantized_weight",
]
