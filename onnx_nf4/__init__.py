"""onnx_nf4: NF4 (4-bit NormalFloat, QLoRA / bitsandbytes) weights for ONNX models.

Importing the package registers the ``onnx_nf4::MatMulNF4`` schema with ``onnx.defs``.
"""

from __future__ import annotations

from . import schema
from .api import dequantize_model, quantize_model
from .codebook import NF4_CODE, NF4_THRESHOLDS
from .codec import dequantize_blockwise, quantize_blockwise
from .genai import quantize_genai_folder
from .genai_export import export_genai
from .layout import QuantizedWeight, dequantize_weight, quantize_weight
from .options import QuantizeOptions
from .passes import DequantizeNF4Pass, QuantizeNF4Pass
from .reference import REFERENCE_OPS, MatMulNF4
from .report import QuantizationReport
from .runtime import custom_op_library, session_options
from .sysinfo import SystemInfo, info

schema.register()

__version__ = "0.1.0"

__all__ = [
    "NF4_CODE",
    "NF4_THRESHOLDS",
    "REFERENCE_OPS",
    "DequantizeNF4Pass",
    "MatMulNF4",
    "QuantizationReport",
    "QuantizeNF4Pass",
    "QuantizeOptions",
    "QuantizedWeight",
    "SystemInfo",
    "__version__",
    "custom_op_library",
    "dequantize_blockwise",
    "dequantize_model",
    "dequantize_weight",
    "export_genai",
    "info",
    "quantize_blockwise",
    "quantize_genai_folder",
    "quantize_model",
    "quantize_weight",
    "session_options",
]
