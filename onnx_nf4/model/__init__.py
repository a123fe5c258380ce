"""Layer 3, ONNX model files and graphs: safe load and save, the streaming writer, graph helpers, summaries.

Owns loading and atomic saving of models with external data (:mod:`.io`), the one-protobuf writer that streams
large tensors (:mod:`.proto_writer`), the ``onnx_ir`` helpers every rewrite shares (:mod:`.graph`: constants,
unique names, initializers, cleanup) and what a model holds (:mod:`.summary`, behind ``onnx-nf4 inspect``). May
import :mod:`onnx_nf4.op`, :mod:`onnx_nf4.codec` and :mod:`onnx_nf4.runtime`.
"""
