"""Layer 2, the ``onnx_nf4::MatMulNF4`` op: its contract and every implementation that is not a graph rewrite.

Owns the op's contract (:mod:`.contract`: names, input positions, attribute and shape rules, mirrored by
``custom_ops/src/matmul_nf4_args.cc``), its ``onnx.defs`` schema (:mod:`.schema`), the numpy reference runtime
(:mod:`.reference`, the oracle of every kernel), the CuPy path over the CUDA source (:mod:`.cupy_backend`) and the
report of what an installation runs (:mod:`.sysinfo`). May import :mod:`onnx_nf4.codec` and
:mod:`onnx_nf4.runtime`.
"""
