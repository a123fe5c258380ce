"""Numpy reference of ``onnx_nf4::MatMulNF4`` v1: the oracle every kernel is tested against.

:func:`matmul_nf4` implements ``docs/MatMulNF4.md`` exactly: it validates every shape and dtype first, by the
rules of :mod:`onnx_nf4.op.contract` (raising ``ValueError`` / ``TypeError`` whose message starts with
``MatMulNF4:``), decodes the weight with
:func:`onnx_nf4.codec.layout.dequantize_weight` (and :func:`onnx_nf4.codec.double_quant.dequantize_absmax` for a
uint8 absmax), multiplies in float32 (also for float16 / bfloat16 ``A``), adds the bias in float32 and rounds once to
``A``'s dtype. :class:`MatMulNF4` wraps it for ``onnx.reference.ReferenceEvaluator(model, new_ops=[MatMulNF4])``.
:data:`REFERENCE_OPS` adds a ``GatherElements`` that works on any axis length (onnx's own fails beyond 64, which
breaks transformer models such as BERT): ``ReferenceEvaluator(model, new_ops=REFERENCE_OPS)`` runs any rewritten model.
"""

from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun

from ..codec.double_quant import NestedAbsmax
from ..codec.layout import QuantizedWeight, dequantize_weight
from .contract import DOMAIN, OP_TYPE, Attributes, TensorInfo, check_inputs

__all__ = ["REFERENCE_OPS", "GatherElements", "MatMulNF4", "matmul_nf4", "tensor_info"]


def tensor_info(array: np.ndarray | None) -> TensorInfo | None:
    """The dtype name and shape of ``array`` for :func:`onnx_nf4.op.contract.check_inputs` (``None`` stays)."""
    return None if array is None else TensorInfo(array.dtype.name, tuple(array.shape))


def matmul_nf4(
    A: np.ndarray,
    B: np.ndarray,
    absmax: np.ndarray,
    nested_absmax: np.ndarray | None = None,
    nested_code: np.ndarray | None = None,
    absmax_offset: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    *,
    K: int,
    N: int,
    block_size: int,
    nested_block_size: int = 256,
) -> np.ndarray:
    """``Y = A @ W (+ bias)`` for an NF4 weight in the ``MatMulNF4`` layout (see ``docs/MatMulNF4.md``).

    Args:
        A: float32 / float16 / bfloat16 ``[..., K]`` (rank >= 1).
        B: uint8 ``[N, k_blocks, block_size // 2]``, two codes per byte, high nibble first.
        absmax: float32 ``[N, k_blocks]``, or uint8 ``[N, k_blocks]`` with the three nested inputs.
        nested_absmax: float32 ``[ceil(N * k_blocks / nested_block_size)]`` (double quantization only).
        nested_code: float32 ``[256]`` (double quantization only).
        absmax_offset: float32 ``[]`` or ``[1]`` (double quantization only).
        bias: ``[N]`` of ``A``'s dtype, or ``None``.
        K, N, block_size, nested_block_size: the node's attributes.

    Returns:
        ``[..., N]`` of ``A``'s dtype: the float32 product (plus float32 bias) rounded once.

    Raises:
        onnx_nf4.op.contract.ContractError: a shape or attribute does not match the spec (a ``ValueError``; checked
            before any data is read).
        onnx_nf4.op.contract.InputTypeError: an input has a dtype the spec does not allow (a ``TypeError`` too).
    """
    attrs = Attributes.create(K, N, block_size, nested_block_size)
    given = (A, B, absmax, nested_absmax, nested_code, absmax_offset, bias)
    arrays = [None if x is None else np.asarray(x) for x in given]
    shapes = check_inputs(attrs, [tensor_info(x) for x in arrays])
    A, B, absmax, nested_absmax, nested_code, absmax_offset, bias = arrays
    nested = None
    if shapes.double_quant:
        offset = np.float32(absmax_offset.reshape(()))
        nested = NestedAbsmax(nested_absmax, nested_code, offset, attrs.nested_block_size)
    weight = dequantize_weight(QuantizedWeight(attrs.K, attrs.N, attrs.block_size, B, absmax, nested))
    y = np.matmul(A.astype(np.float32), weight)
    if bias is not None:
        y += bias.astype(np.float32)
    return y.astype(A.dtype)


class MatMulNF4(OpRun):
    """``onnx_nf4::MatMulNF4`` for ``onnx.reference.ReferenceEvaluator(model, new_ops=[MatMulNF4])``.

    Omitted optional inputs arrive as ``None``. ``accuracy_level`` is validated and otherwise ignored: the
    reference is the float32 computation that every level must approximate.
    """

    op_domain = DOMAIN

    def _run(
        self,
        A,
        B,
        absmax,
        nested_absmax=None,
        nested_code=None,
        absmax_offset=None,
        bias=None,
        K=None,
        N=None,
        block_size=None,
        nested_block_size=None,
        accuracy_level=None,
    ):
        missing = [name for name, value in (("K", K), ("N", N), ("block_size", block_size)) if value is None]
        if missing:
            raise ValueError(f"{OP_TYPE}: required attribute(s) {', '.join(missing)} missing")
        weights = (B, absmax, nested_absmax, nested_code, absmax_offset, bias)
        attrs = Attributes.create(K, N, block_size, nested_block_size, accuracy_level)
        nested_block_size = attrs.nested_block_size
        return (self._compute(A, weights, K=K, N=N, block_size=block_size, nested_block_size=nested_block_size),)

    def _compute(self, A, weights: tuple, **attributes: int) -> np.ndarray:
        """The output ``Y`` for ``weights`` = inputs 1..6 (``None`` where omitted) and the attributes ``K``, ``N``,
        ``block_size``, ``nested_block_size`` (all set); a backend's subclass overrides this."""
        return matmul_nf4(A, *weights, **attributes)


class GatherElements(OpRun):
    """``GatherElements`` (opset 11+) via ``numpy.take_along_axis``, for any length of the gathered axis."""

    def _run(self, data, indices, axis=0):
        return (np.take_along_axis(data, indices.astype(np.int64), axis=axis),)


#: The ``new_ops`` that let ``onnx.reference.ReferenceEvaluator`` run any model this package writes.
REFERENCE_OPS: tuple[type[OpRun], ...] = (MatMulNF4, GatherElements)
