"""onnx_nf4: NF4 (4-bit NormalFloat, QLoRA / bitsandbytes) weights for ONNX models."""

from __future__ import annotations

from .codebook import NF4_CODE, NF4_THRESHOLDS
from .codec import dequantize_blockwise, quantize_blockwise
from .layout import QuantizedWeight, dequantize_weight, quantize_weight

__version__ = "0.1.0"

__all__ = [
    "NF4_CODE",
    "NF4_THRESHOLDS",
    "QuantizedWeight",
    "__version__",
    "dequantize_blockwise",
    "dequantize_weight",
    "quantize_blockwise",
    "quantize_weight",
]
