"""Layer 1, the NF4 format: values, codes, blocks and scales, independent of any graph or runtime.

Owns the codebook (:mod:`.codebook`, the single source of truth of the 16 values and thresholds), the input rules
(:mod:`.validation`), the bit-exact blockwise codec (:mod:`.blockwise`, numpy reference) and the binding of the
compiled encoder (:mod:`.native`), bitsandbytes' double quantization of the scales (:mod:`.double_quant`), the
``MatMulNF4`` weight layout (:mod:`.layout`) and the relative-RMS error metric (:mod:`.metrics`). May import only
:mod:`onnx_nf4.runtime` (to find the compiled encoder). Inside the layer the order is codebook, validation, native,
blockwise, double_quant, metrics, layout: each module imports only those before it.
"""

from .blockwise import dequantize_blockwise, pack_nibbles, quantize_blockwise, unpack_nibbles
from .codebook import NF4_CODE, NF4_THRESHOLDS
from .layout import QuantizedWeight, dequantize_weight, quantize_weight
from .validation import NonFiniteWeightError, check_block_size

__all__ = [
    "NF4_CODE",
    "NF4_THRESHOLDS",
    "NonFiniteWeightError",
    "QuantizedWeight",
    "check_block_size",
    "dequantize_blockwise",
    "dequantize_weight",
    "pack_nibbles",
    "quantize_blockwise",
    "quantize_weight",
    "unpack_nibbles",
]
