"""onnx_nf4: NF4 (4-bit NormalFloat, QLoRA / bitsandbytes) weights for ONNX models.

Importing the package registers the ``onnx_nf4::MatMulNF4`` schema with ``onnx.defs``.

The package is layered; each layer imports only the layers below it (``tests/test_layers.py`` checks it):

========  ==========================  =========================================================================
layer     package                     owns
========  ==========================  =========================================================================
0         :mod:`onnx_nf4.runtime`     the compiled custom-op library: finding it, ``SessionOptions``
1         :mod:`onnx_nf4.codec`       the NF4 format: codebook, codec, compiled encoder, double quant, layout
2         :mod:`onnx_nf4.op`          the ``MatMulNF4`` op: contract, schema, numpy reference, CuPy path
3         :mod:`onnx_nf4.model`       model files and graphs: load/save, streaming writer, graph helpers
4         :mod:`onnx_nf4.methods`     how codes and scales are chosen (rtn, mse, gptq) and calibration data
5         :mod:`onnx_nf4.passes`      the ``onnx_ir`` passes, their options and report
6         :mod:`onnx_nf4.api`         ``quantize_model`` / ``dequantize_model``: load, pass, save
7         integrations                :mod:`onnx_nf4.torch`, :mod:`onnx_nf4.genai`
8         :mod:`onnx_nf4.cli`         the ``onnx-nf4`` command line
========  ==========================  =========================================================================
"""

from __future__ import annotations

from .api import dequantize_model, quantize_model
from .codec.blockwise import dequantize_blockwise, quantize_blockwise
from .codec.codebook import NF4_CODE, NF4_THRESHOLDS
from .codec.layout import QuantizedWeight, dequantize_weight, quantize_weight
from .genai.export import export_genai
from .genai.folder import quantize_genai_folder
from .genai.perplexity import PerplexityResult, perplexity
from .op import schema
from .op.reference import REFERENCE_OPS, MatMulNF4
from .op.sysinfo import SystemInfo, info
from .passes import DequantizeNF4Pass, QuantizeNF4Pass
from .passes.options import QuantizeOptions
from .passes.report import QuantizationReport
from .runtime import custom_op_library, session_options
from .version import __version__

schema.register()

__all__ = [
    "NF4_CODE",
    "NF4_THRESHOLDS",
    "REFERENCE_OPS",
    "DequantizeNF4Pass",
    "MatMulNF4",
    "PerplexityResult",
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
    "perplexity",
    "quantize_blockwise",
    "quantize_genai_folder",
    "quantize_model",
    "quantize_weight",
    "session_options",
]
