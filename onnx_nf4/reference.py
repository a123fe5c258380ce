"""Numpy reference of ``onnx_nf4::MatMulNF4`` v1: the oracle every kernel is tested against.

:func:`matmul_nf4` implements ``docs/MatMulNF4.md`` exactly: it validates every shape and dtype first (raising
``ValueError`` / ``TypeError`` whose message starts with ``MatMulNF4:``), decodes the weight with
:func:`onnx_nf4.layout.dequantize_weight` (and :func:`onnx_nf4.double_quant.dequantize_absmax` for a uint8 absmax),
multiplies in float32 (also for float16 / bfloat16 ``A``), adds the bias in float32 and rounds once to ``A``'s
dtype. :class:`MatMulNF4` wraps it for ``onnx.reference.ReferenceEvaluator(model, new_ops=[MatMulNF4])``.
:data:`REFERENCE_OPS` adds a ``GatherElements`` that works on any axis length (onnx's own fails beyond 64, which
breaks transformer models such as BERT): ``ReferenceEvaluator(model, new_ops=REFERENCE_OPS)`` runs any rewritten model.
"""

from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun

from .codec import check_block_size, is_valid_nested_block_size
from .double_quant import NestedAbsmax
from .layout import QuantizedWeight, dequantize_weight
from .schema import DOMAIN, OP_TYPE

__all__ = ["REFERENCE_OPS", "GatherElements", "MatMulNF4", "matmul_nf4"]

_NAME = OP_TYPE


def _activation_dtypes() -> tuple[np.dtype, ...]:
    dtypes = [np.dtype(np.float32), np.dtype(np.float16)]
    try:
        import ml_dtypes
    except ImportError:  # bfloat16 arrays cannot exist without ml_dtypes
        return tuple(dtypes)
    return (*dtypes, np.dtype(ml_dtypes.bfloat16))


_T_DTYPES = _activation_dtypes()


def _check_shape(name: str, array: np.ndarray, expected: tuple[int, ...]) -> None:
    if array.shape != expected:
        raise ValueError(f"{_NAME}: input {name!r} has shape {list(array.shape)}, expected {list(expected)}")


def _check_dtype(name: str, array: np.ndarray, expected: tuple[np.dtype, ...]) -> None:
    if array.dtype not in expected:
        allowed = ", ".join(str(d) for d in expected)
        raise TypeError(f"{_NAME}: input {name!r} has dtype {array.dtype}, expected one of {allowed}")


def _nested_statistics(
    N: int,
    k_blocks: int,
    absmax: np.ndarray,
    nested: tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None],
    nested_block_size: int,
) -> NestedAbsmax | None:
    """Validate the double-quantization inputs against ``absmax``'s dtype and bundle them."""
    names = ("nested_absmax", "nested_code", "absmax_offset")
    given = [name for name, value in zip(names, nested, strict=True) if value is not None]
    if absmax.dtype == np.float32:
        if given:
            raise ValueError(f"{_NAME}: absmax is float32, so {', '.join(given)} must be omitted")
        return None
    if len(given) != 3:
        missing = [name for name, value in zip(names, nested, strict=True) if value is None]
        raise ValueError(f"{_NAME}: absmax is uint8 (double quantization) but {', '.join(missing)} missing")
    nbs = int(nested_block_size)
    if not is_valid_nested_block_size(nbs):
        raise ValueError(f"{_NAME}: nested_block_size must be a power of two >= 16, got {nested_block_size}")
    nested_absmax, nested_code, offset = (np.asarray(v) for v in nested)
    for name, value in zip(names, (nested_absmax, nested_code, offset), strict=True):
        _check_dtype(name, value, (np.dtype(np.float32),))
    _check_shape("nested_absmax", nested_absmax, (-(-N * k_blocks // nbs),))
    _check_shape("nested_code", nested_code, (256,))
    if offset.shape not in ((), (1,)):
        raise ValueError(f"{_NAME}: input 'absmax_offset' has shape {list(offset.shape)}, expected [] or [1]")
    return NestedAbsmax(nested_absmax, nested_code, np.float32(offset.reshape(())), nbs)


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
        ValueError: a shape or attribute does not match the spec (checked before any data is read).
        TypeError: an input has a dtype the spec does not allow.
    """
    K, N = int(K), int(N)
    if K < 1 or N < 1:
        raise ValueError(f"{_NAME}: K and N must be >= 1, got K={K}, N={N}")
    try:
        bs = check_block_size(block_size)
    except ValueError as err:
        raise ValueError(f"{_NAME}: {err}") from None
    k_blocks = -(-K // bs)
    A, B, absmax = np.asarray(A), np.asarray(B), np.asarray(absmax)
    _check_dtype("A", A, _T_DTYPES)
    if A.ndim < 1:
        raise ValueError(f"{_NAME}: input 'A' must have rank >= 1, got a scalar")
    if A.shape[-1] != K:
        raise ValueError(f"{_NAME}: the last dimension of 'A' is {A.shape[-1]}, but K={K} (A shape {list(A.shape)})")
    _check_dtype("B", B, (np.dtype(np.uint8),))
    _check_shape("B", B, (N, k_blocks, bs // 2))
    _check_dtype("absmax", absmax, (np.dtype(np.float32), np.dtype(np.uint8)))
    _check_shape("absmax", absmax, (N, k_blocks))
    nested = _nested_statistics(N, k_blocks, absmax, (nested_absmax, nested_code, absmax_offset), nested_block_size)
    if bias is not None:
        bias = np.asarray(bias)
        if bias.dtype != A.dtype:
            raise TypeError(f"{_NAME}: input 'bias' has dtype {bias.dtype}, expected {A.dtype} (the dtype of A)")
        _check_shape("bias", bias, (N,))

    weight = dequantize_weight(QuantizedWeight(K, N, bs, B, absmax, nested))
    y = np.matmul(A.astype(np.float32), weight)
    if bias is not None:
        y += bias.astype(np.float32)
    return y.astype(A.dtype)


class MatMulNF4(OpRun):
    """``onnx_nf4::MatMulNF4`` for ``onnx.reference.ReferenceEvaluator(model, new_ops=[MatMulNF4])``.

    Omitted optional inputs arrive as ``None``. ``accuracy_level`` is accepted and ignored: the reference is the
    float32 computation that every level must approximate.
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
            raise ValueError(f"{_NAME}: required attribute(s) {', '.join(missing)} missing")
        weights = (B, absmax, nested_absmax, nested_code, absmax_offset, bias)
        nested_block_size = 256 if nested_block_size is None else nested_block_size
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
