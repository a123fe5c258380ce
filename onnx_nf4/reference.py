"""The documented import path of the numpy reference runtime; it lives in :mod:`onnx_nf4.op.reference`."""

from .op.reference import REFERENCE_OPS, MatMulNF4, matmul_nf4

__all__ = ["REFERENCE_OPS", "MatMulNF4", "matmul_nf4"]
