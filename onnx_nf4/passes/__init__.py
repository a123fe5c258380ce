"""Layer 5, the ``onnx_ir`` passes of onnx_nf4, with the settings they take and the report they give.

Owns :class:`QuantizeOptions` (:mod:`.options`), the quantization report (:mod:`.report`) and the passes below. May
import :mod:`onnx_nf4.methods`, :mod:`onnx_nf4.model`, :mod:`onnx_nf4.op`, :mod:`onnx_nf4.codec` and
:mod:`onnx_nf4.runtime`; reading and writing files is the job of the layer above (:mod:`onnx_nf4.api`).

* :class:`QuantizeNF4Pass` (:mod:`.quantize`): float ``MatMul`` / ``Gemm`` weights to NF4; it plans
  (:mod:`.plan`), encodes each distinct weight once (:func:`.encoding.encode_weight`), writes the format's tensors
  and node (:mod:`.writers`) and rewrites the graph (:mod:`.rewrite`).
* :class:`DequantizeNF4Pass` (:mod:`.dequantize`): the inverse, for debugging.

Both return what they did in their ``PassResult`` (:class:`QuantizeResult` with the report,
:class:`DequantizeResult` with the replaced nodes) and keep no state between calls. The graph helpers they
share are in :mod:`onnx_nf4.model.graph`.
"""

from .dequantize import DequantizeNF4Pass, DequantizeResult
from .options import DEFAULT_MIN_ELEMENTS, FORMATS, QuantizeOptions
from .quantize import ProgressCallback, QuantizeNF4Pass, QuantizeResult

__all__ = [
    "DEFAULT_MIN_ELEMENTS",
    "FORMATS",
    "DequantizeNF4Pass",
    "DequantizeResult",
    "ProgressCallback",
    "QuantizeNF4Pass",
    "QuantizeOptions",
    "QuantizeResult",
]
