"""The documented import path of the CuPy path (``matmul_nf4``, ``MatMulNF4``); it lives in
:mod:`onnx_nf4.op.cupy_backend`."""

from .op.cupy_backend import KernelSourceNotFoundError, MatMulNF4, matmul_nf4

__all__ = ["KernelSourceNotFoundError", "MatMulNF4", "matmul_nf4"]
