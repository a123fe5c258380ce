"""bitsandbytes 4-bit tensors -> the ``MatMulNF4`` layout, without re-quantizing (numpy only).

A ``bitsandbytes.nn.Linear4bit`` layer with weight ``Wt[N, K]`` (``[out, in]``, the ``nn.Linear`` layout) stores:

* ``packed``: uint8, the 4-bit codes of ``Wt.reshape(-1)`` two per byte, high nibble first;
* ``absmax``: one scale per block of ``blocksize`` consecutive elements of that flat array, float32, or uint8
  codes when double-quantized (``compress_statistics=True``), in which case ``nested_absmax`` (float32, one per
  ``nested_blocksize`` absmax), ``nested_quant_map`` (float32[256]) and ``offset`` (float32) decode them.

``MatMulNF4`` blocks run along K inside one row of ``Wt``. When ``K % blocksize == 0`` the two layouts coincide and
:func:`to_quantized_weight` only reshapes: every tensor keeps its bytes. Otherwise bitsandbytes' blocks straddle
rows; the weight is then re-blocked with ``g = gcd(K, blocksize)`` elements per block. Each ``g``-block lies inside
one bitsandbytes block (``g`` divides both ``K`` and ``blocksize``), so the codes and their bytes are unchanged and
each absmax entry is repeated ``r = blocksize // g`` times. With double quantization the repeated uint8 absmax codes
keep decoding to the same scales when the nested block size becomes ``r * nested_blocksize``: entry ``f`` of the
new absmax stands for entry ``f // r`` of the old one, whose nested block is ``f // (r * nested_blocksize)``.
So ``packed``, ``nested_absmax``, ``nested_quant_map`` and ``offset`` stay byte-identical in every case, and the
effective weight is bit-identical. ``g`` must be at least 16 (the op's smallest block size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..codec.codebook import NF4_CODE
from ..codec.double_quant import NestedAbsmax
from ..codec.layout import QuantizedWeight
from ..codec.validation import is_valid_nested_block_size

__all__ = ["BnbFormatError", "BnbWeight", "to_quantized_weight"]

#: Block sizes ``bitsandbytes.functional.quantize_4bit`` accepts.
BNB_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_MIN_OP_BLOCK_SIZE = 16


class BnbFormatError(ValueError):
    """bitsandbytes tensors that cannot become a ``MatMulNF4`` weight exactly (the message names the layer)."""


@dataclass(frozen=True)
class BnbWeight:
    """The 4-bit tensors of one bitsandbytes ``Linear4bit`` weight, as numpy arrays.

    Attributes:
        name: the layer (module path), used in error messages.
        quant_type: ``"nf4"`` or ``"fp4"``.
        shape: ``(N, K)``: output and input features (bitsandbytes' ``QuantState.shape``).
        blocksize: elements per absmax block of the flat ``[N, K]`` array.
        packed: uint8, ``ceil(N * K / 2)`` bytes (any shape; read in C order).
        absmax: float32 ``[ceil(N * K / blocksize)]``, or uint8 codes when ``nested`` is set.
        quant_map: float32[16], the 4-bit code table, or ``None`` when not stored (then NF4 is assumed only if
            ``quant_type == "nf4"``).
        nested: the double-quantization statistics (``block_size`` = bitsandbytes' ``nested_blocksize``).
    """

    name: str
    quant_type: str
    shape: tuple[int, int]
    blocksize: int
    packed: np.ndarray
    absmax: np.ndarray
    quant_map: np.ndarray | None = None
    nested: NestedAbsmax | None = None


def _fail(weight: BnbWeight, message: str) -> BnbFormatError:
    return BnbFormatError(f"layer {weight.name!r}: {message}")


def _validate(weight: BnbWeight) -> None:
    if weight.quant_type != "nf4":
        raise _fail(
            weight,
            f"bitsandbytes quant_type {weight.quant_type!r} is not supported; MatMulNF4 stores NF4 only "
            "(quantize the layer with quant_type='nf4')",
        )
    if weight.quant_map is not None:
        quant_map = np.asarray(weight.quant_map)
        if quant_map.shape != (16,) or not np.array_equal(
            quant_map.astype(np.float32).view(np.uint32), NF4_CODE.view(np.uint32)
        ):
            raise _fail(weight, "its quant_map is not the NF4 code table")
    if len(weight.shape) != 2 or min(weight.shape) < 1:
        raise _fail(weight, f"expected a 2-D weight shape (out, in), got {tuple(weight.shape)}")
    if weight.blocksize not in BNB_BLOCK_SIZES:
        raise _fail(weight, f"blocksize {weight.blocksize} is not one of bitsandbytes' {BNB_BLOCK_SIZES}")
    N, K = weight.shape
    n_absmax = -(-N * K // weight.blocksize)
    if weight.packed.dtype != np.uint8 or weight.packed.size != -(-N * K // 2):
        raise _fail(
            weight,
            f"packed weight must be uint8 with {-(-N * K // 2)} bytes for shape {(N, K)}, "
            f"got {weight.packed.dtype} with {weight.packed.size} elements",
        )
    expected_dtype = np.uint8 if weight.nested is not None else np.float32
    if weight.absmax.dtype != expected_dtype or weight.absmax.size != n_absmax:
        raise _fail(
            weight,
            f"absmax must be {np.dtype(expected_dtype)} with {n_absmax} entries, "
            f"got {weight.absmax.dtype} with {weight.absmax.size}",
        )
    nested = weight.nested
    if nested is not None:
        nbs = int(nested.block_size)
        if not is_valid_nested_block_size(nbs):
            raise _fail(weight, f"nested blocksize must be a power of two >= 16, got {nbs}")
        if nested.nested_absmax.dtype != np.float32 or nested.nested_absmax.size != -(-n_absmax // nbs):
            raise _fail(weight, f"nested_absmax must be float32 with {-(-n_absmax // nbs)} entries")
        if nested.code.dtype != np.float32 or nested.code.size != 256:
            raise _fail(weight, "nested_quant_map must be float32 with 256 entries")


def to_quantized_weight(weight: BnbWeight) -> QuantizedWeight:
    """The ``MatMulNF4`` weight ``W[K, N] = Wt.T`` holding exactly bitsandbytes' codes and statistics.

    Raises:
        BnbFormatError: FP4 (or any non-NF4 code table), inconsistent tensor sizes, or ``K % blocksize != 0``
            with ``gcd(K, blocksize) < 16``.
    """
    _validate(weight)
    N, K = (int(d) for d in weight.shape)
    bs = int(weight.blocksize)
    g = math.gcd(K, bs)
    if g < _MIN_OP_BLOCK_SIZE:
        raise _fail(
            weight,
            f"in_features {K} is not a multiple of blocksize {bs}, so bitsandbytes' blocks straddle rows; exact "
            f"re-blocking needs gcd({K}, {bs}) = {g} >= {_MIN_OP_BLOCK_SIZE}",
        )
    repeat = bs // g
    k_blocks = K // g
    packed = np.ascontiguousarray(weight.packed).reshape(N, k_blocks, g // 2)
    absmax = np.ascontiguousarray(weight.absmax).reshape(-1)
    if repeat > 1:
        absmax = np.repeat(absmax, repeat)[: N * k_blocks]
    absmax = absmax.reshape(N, k_blocks)
    nested = weight.nested
    if nested is not None:
        nested = NestedAbsmax(
            nested_absmax=np.ascontiguousarray(nested.nested_absmax, dtype=np.float32).reshape(-1),
            code=np.ascontiguousarray(nested.code, dtype=np.float32).reshape(-1),
            offset=np.float32(nested.offset),
            block_size=int(nested.block_size) * repeat,
        )
    return QuantizedWeight(K=K, N=N, block_size=g, packed=packed, absmax=absmax, nested=nested)
