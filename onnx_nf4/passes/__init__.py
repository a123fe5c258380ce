"""The ``onnx_ir`` passes of onnx_nf4.

* :class:`QuantizeNF4Pass` (:mod:`.quantize`): float ``MatMul`` / ``Gemm`` weights to NF4; it plans
  (:mod:`.plan`), encodes each distinct weight once (:func:`.encoding.encode_weight`), writes the format's tensors
  and node (:mod:`.writers`) and rewrites the graph (:mod:`.rewrite`).
* :class:`DequantizeNF4Pass` (:mod:`.dequantize`): the inverse, for debugging.

Both return what they did in their ``PassResult`` (:class:`QuantizeResult` with the report,
:class:`DequantizeResult` with the replaced nodes) and keep no state between calls. :mod:`.graph` holds the graph
helpers they share.
"""

from ..options import DEFAULT_MIN_ELEMENTS, FORMATS, QuantizeOptions
from .dequantize import DequantizeNF4Pass, DequantizeResult
from .graph import UniqueNames, constant_tensor, remove_unused_initializers
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
    "UniqueNames",
    "constant_tensor",
    "remove_unused_initializers",
]
