"""The ``MatMulNF4`` weight layout: a ``MatMul`` weight ``W[K, N]`` as column-aligned NF4 blocks.

See ``docs/MatMulNF4.md`` (normative). In short, with ``Wt = W.T`` (``[N, K]``, the ``nn.Linear`` layout),
each row of ``Wt`` is zero-padded to ``K_pad = k_blocks * block_size`` and quantized with
:func:`onnx_nf4.quantize_blockwise`; so ``packed`` is ``[N, k_blocks, block_size // 2]`` and ``absmax`` is
``[N, k_blocks]``. When ``K % block_size == 0`` the bytes equal bitsandbytes' ``quantize_4bit(Wt)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from . import native as native_codec
from .blockwise import Backend, dequantize_blockwise, quantize_blockwise
from .codebook import NF4_ZERO_CODE
from .double_quant import NestedAbsmax, dequantize_absmax, quantize_absmax
from .metrics import CHUNK_ELEMENTS, ErrorSums, error_sums
from .validation import Rounding, as_float_array, check_block_size, check_finite, check_rounding

__all__ = [
    "ErrorSums",
    "QuantizedWeight",
    "dequantize_weight",
    "nf4_error_sums",
    "nf4_rel_rms_error",
    "quantize_weight",
    "quantize_weight_and_error",
]


@dataclass(frozen=True)
class QuantizedWeight:
    """An NF4 weight in the ``MatMulNF4`` layout.

    Attributes:
        K: rows of ``W`` (the reduction size).
        N: columns of ``W`` (output features).
        block_size: elements per absmax block along K.
        packed: uint8 ``[N, k_blocks, block_size // 2]``, high nibble first.
        absmax: float32 ``[N, k_blocks]``, or uint8 ``[N, k_blocks]`` codes when ``nested`` is set.
        nested: the double-quantization statistics of ``absmax``, or ``None``.
    """

    K: int
    N: int
    block_size: int
    packed: np.ndarray
    absmax: np.ndarray
    nested: NestedAbsmax | None = None

    @property
    def k_blocks(self) -> int:
        """Blocks per column, ``ceil(K / block_size)``."""
        return -(-self.K // self.block_size)

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor that stores this weight."""
        extra = self.nested.nbytes if self.nested is not None else 0
        return int(self.packed.nbytes + self.absmax.nbytes + extra)

    def float_absmax(self) -> np.ndarray:
        """The float32 ``[N, k_blocks]`` scales (decoding the double quantization if present)."""
        if self.nested is None:
            return self.absmax
        return dequantize_absmax(self.absmax.reshape(-1), self.nested).reshape(self.N, self.k_blocks)


_CHUNK_ELEMENTS = 1 << 20  # elements of W.T quantized at a time (bounds the extra memory)


def _pad_codes_to_zero(packed_rows: np.ndarray, K: int) -> None:
    """Set the codes of the padding elements ``k >= K`` of ``packed_rows[n, K_pad // 2]`` to 7 (0.0), in place.

    Padding zeros already get code 7 except in a block whose absmax is so small (below about 2.9e-39) that
    ``1/absmax`` overflows: ``0 * inf`` is NaN, code 0, under onnxruntime rounding.
    """
    if K % 2:
        packed_rows[:, K // 2] = (packed_rows[:, K // 2] & 0xF0) | NF4_ZERO_CODE
    packed_rows[:, -(-K // 2) :] = NF4_ZERO_CODE * 0x11


def quantize_weight(
    w: np.ndarray,
    block_size: int = 64,
    *,
    double_quant: bool = False,
    rounding: Rounding = "onnxruntime",
    name: str = "weight",
    backend: Backend = "auto",
    threads: int = 0,
) -> QuantizedWeight:
    """Quantize a ``MatMul`` weight ``w[K, N]`` (float16/bfloat16/float32/float64) into the ``MatMulNF4`` layout.

    With ``backend="auto"`` (the default) the compiled encoder (:mod:`onnx_nf4.codec.native`) runs when the
    custom-op library is found, on ``threads`` threads (0: all), reading ``w`` in place whatever its strides;
    otherwise, or with ``backend="numpy"``, the numpy reference reads ``w`` column by column in chunks of about
    2**20 elements. Either way no transposed or padded copy of the whole weight is made, and the bytes are the
    same. With ``double_quant`` the absmax is double-quantized by :func:`onnx_nf4.codec.double_quant.quantize_absmax`.

    Raises ``ValueError`` (naming ``name``) for NaN/Inf, a non-2-D weight, a bad block size, rounding or backend,
    and ``TypeError`` for a non-float weight.
    """
    return quantize_weight_and_error(
        w, block_size, double_quant=double_quant, rounding=rounding, name=name, backend=backend, threads=threads,
        error=False,
    )[0]  # fmt: skip


def quantize_weight_and_error(
    w: np.ndarray,
    block_size: int = 64,
    *,
    double_quant: bool = False,
    rounding: Rounding = "onnxruntime",
    name: str = "weight",
    backend: Backend = "auto",
    threads: int = 0,
    error: bool = True,
) -> tuple[QuantizedWeight, ErrorSums | None]:
    """:func:`quantize_weight`, plus the :class:`ErrorSums` of ``w`` and the weight the result stands for.

    The compiled encoder sums the squares in the same pass over ``w`` (no dequantized copy); with double
    quantization (whose decoded scales differ from the encoder's), or with the numpy backend,
    :func:`nf4_error_sums` decodes a few columns at a time instead. The sums are ``None`` when
    ``error`` is false.
    """
    bs = check_block_size(block_size)
    check_rounding(rounding)
    w = as_float_array(w, name)
    if w.ndim != 2:
        raise ValueError(f"tensor {name!r}: a MatMul weight must be 2-D, got shape {w.shape}")
    K, N = (int(d) for d in w.shape)
    if native_codec.use_native(backend):
        native_sums = error and not double_quant
        packed, absmax, sums = native_codec.encode_weight(w, bs, rounding, threads=threads, sums=native_sums, name=name)
    else:
        check_finite(w, name)
        packed, absmax = _quantize_numpy(w, bs, rounding, name)
        sums = None
    if double_quant:
        codes, nested = quantize_absmax(absmax.reshape(-1))
        q = QuantizedWeight(K, N, bs, packed, codes.reshape(N, -1), nested)
    else:
        q = QuantizedWeight(K, N, bs, packed, absmax)
    if error and sums is None:
        sums = nf4_error_sums(w, q)
    return q, sums


def _quantize_numpy(w: np.ndarray, bs: int, rounding: Rounding, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The reference: ``(packed [N, k_blocks, bs // 2], absmax [N, k_blocks])`` of a finite ``w[K, N]``."""
    K, N = (int(d) for d in w.shape)
    k_blocks = -(-K // bs)
    k_pad = k_blocks * bs
    packed = np.empty((N, k_pad // 2), dtype=np.uint8)
    absmax = np.empty((N, k_blocks), dtype=np.float32)
    rows = max(1, _CHUNK_ELEMENTS // k_pad)  # rows of W.T (columns of W) per chunk
    chunk = np.zeros((min(rows, N), k_pad), dtype=np.float32)  # the padding columns stay zero
    for n0 in range(0, N, rows):
        n1 = min(n0 + rows, N)
        part = chunk[: n1 - n0]
        part[:, :K] = w[:, n0:n1].T
        p, a = quantize_blockwise(part, bs, rounding=rounding, name=name, backend="numpy")
        packed[n0:n1] = p.reshape(n1 - n0, k_pad // 2)
        absmax[n0:n1] = a.reshape(n1 - n0, k_blocks)
    if K % bs:
        _pad_codes_to_zero(packed, K)
    return packed.reshape(N, k_blocks, bs // 2), absmax


def dequantize_weight(q: QuantizedWeight) -> np.ndarray:
    """The float32 ``W[K, N]`` that ``q`` stands for (``NF4_CODE[code] * absmax`` per element)."""
    wt = dequantize_blockwise(q.packed, q.float_absmax(), (q.N, q.k_blocks * q.block_size), q.block_size)
    return np.ascontiguousarray(wt[:, : q.K].T)


def nf4_rel_rms_error(w: np.ndarray, q: QuantizedWeight) -> float:
    """:func:`onnx_nf4.codec.metrics.rel_rms_error` of ``w[K, N]`` and the weight ``q`` stands for, decoding ``q`` a
    few columns at a time (never a decoded copy of the whole weight)."""
    return nf4_error_sums(w, q).rel_rms_error


def nf4_error_sums(w: np.ndarray, q: QuantizedWeight) -> ErrorSums:
    """The :class:`ErrorSums` behind :func:`nf4_rel_rms_error` (the compiled encoder returns the same sums from its
    single pass over ``w``, :func:`quantize_weight_and_error`)."""
    absmax = q.float_absmax()
    cols = max(1, CHUNK_ELEMENTS // max(1, q.K))

    def pairs() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for n0 in range(0, q.N, cols):
            n1 = min(n0 + cols, q.N)
            part = QuantizedWeight(q.K, n1 - n0, q.block_size, q.packed[n0:n1], absmax[n0:n1])
            yield w[:, n0:n1], dequantize_weight(part)

    return error_sums(pairs())
