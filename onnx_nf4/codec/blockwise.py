"""Blockwise NF4 quantization of a flat array: the bit-exact codec.

Layout (shared by bitsandbytes ``quantize_4bit`` and onnxruntime ``MatMulBnb4Quantizer``):

* Element ``i`` is ``w.reshape(-1)[i]`` (row-major). Block ``b`` holds elements ``[b*bs, (b+1)*bs)``; the last
  block may be partial. ``absmax[b] = max |w|`` over the block (float32).
* Packing: byte ``j`` holds element ``2j`` in the **high** nibble and ``2j+1`` in the **low** nibble. When the
  element count is odd the last low nibble is code 7 (value 0.0).
* Encoding: ``s = x * (1/absmax)`` (float32), ``code = #{t : s > t}`` over the 15 thresholds, so a tie goes to the
  lower code. An all-zero block has absmax 0 and codes 7; 0.0 and -0.0 give code 7.
* Decoding: ``NF4_CODE[code] * absmax[block]`` in float32.

Two roundings are offered. ``"onnxruntime"`` (the default) reproduces ``MatMulBnb4Quantizer`` bit for bit.
``"bitsandbytes"`` reproduces bitsandbytes' CPU ``quantize_4bit``: float32 midpoints as bounds, the partial last
block divided by its absmax instead of multiplied by the reciprocal, and a scale clamped at 1e-38.

Memory: the work is done in chunks of blocks, so the peak extra memory is a few MB beyond the packed output
(the input itself is only read).

Backends: ``backend="auto"`` (the default) runs the compiled, multithreaded encoder of the custom-op library
(:mod:`onnx_nf4.codec.native`) when the library is found, else this module's numpy code, the reference; both give
the same bytes. ``"numpy"`` and ``"native"`` choose one explicitly.
"""

from __future__ import annotations

import numpy as np

from . import native as native_codec
from .codebook import NF4_CODE, NF4_MIDPOINTS_BNB, NF4_THRESHOLDS, NF4_ZERO_CODE
from .native import Backend
from .validation import Rounding, as_float_array, check_block_size, check_finite, check_rounding

__all__ = ["dequantize_blockwise", "pack_nibbles", "quantize_blockwise", "unpack_nibbles"]

_CHUNK_ELEMENTS = 1 << 20  # elements per work chunk (a multiple of every valid block size)
_BNB_TINY = np.float32(1e-38)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Pack 4-bit codes (uint8, values 0..15, flat) two per byte, first code in the high nibble.

    An odd count is padded with code 7 (0.0). Returns uint8 ``[(n + 1) // 2]``.
    """
    codes = np.asarray(codes, dtype=np.uint8).reshape(-1)
    if codes.size % 2:
        codes = np.concatenate([codes, np.array([NF4_ZERO_CODE], np.uint8)])
    return (codes[0::2] << 4) | codes[1::2]


def unpack_nibbles(packed: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`pack_nibbles`: the first ``n`` codes (uint8) of ``packed``."""
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if packed.size < (n + 1) // 2:
        raise ValueError(f"packed holds {packed.size} bytes, {(n + 1) // 2} needed for {n} codes")
    return np.stack([packed >> 4, packed & 0xF], axis=-1).reshape(-1)[:n]


def _encode(scaled: np.ndarray, rounding: Rounding) -> np.ndarray:
    """4-bit codes of scaled values; ties go to the lower code.

    A NaN scaled value (only from ``0 * (1/absmax)`` with a float32-subnormal absmax, whose reciprocal is inf)
    gets code 0 under onnxruntime rounding, where every ``s > t`` comparison is false; numpy's sort order puts
    it last (code 15), which is what bitsandbytes' bucketize gives.
    """
    bounds = NF4_THRESHOLDS if rounding == "onnxruntime" else NF4_MIDPOINTS_BNB
    codes = np.searchsorted(bounds, scaled, side="left").astype(np.uint8)
    if rounding == "onnxruntime":
        codes[np.isnan(scaled)] = 0
    return codes


def _quantize_full_blocks(blocks: np.ndarray, rounding: Rounding) -> tuple[np.ndarray, np.ndarray]:
    """Codes and absmax of a ``[nb, bs]`` float32 array of complete blocks."""
    absmax = np.abs(blocks).max(axis=1)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        if rounding == "onnxruntime":
            inv = np.where(absmax != 0, np.float32(1) / absmax, np.float32(0)).astype(np.float32)
            scaled = blocks * inv[:, None]
        else:
            inv = (np.float32(1) / np.maximum(absmax, _BNB_TINY)).astype(np.float32)
            scaled = np.clip(blocks * inv[:, None], -1, 1)
    return _encode(scaled, rounding), absmax.astype(np.float32)


def _quantize_partial_block(tail: np.ndarray, rounding: Rounding) -> tuple[np.ndarray, np.float32]:
    absmax = np.float32(np.abs(tail).max())
    if rounding == "onnxruntime":
        with np.errstate(over="ignore", invalid="ignore"):
            inv = np.float32(1) / absmax if absmax != 0 else np.float32(0)
            scaled = tail * inv
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            scaled = np.clip(tail / np.maximum(absmax, _BNB_TINY), -1, 1)
    return _encode(scaled, rounding), absmax


def quantize_blockwise(
    w: np.ndarray,
    block_size: int = 64,
    *,
    rounding: Rounding = "onnxruntime",
    name: str = "weight",
    backend: Backend = "auto",
    threads: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Quantize ``w.reshape(-1)`` to NF4 in blocks of ``block_size`` consecutive elements.

    Args:
        w: float16, bfloat16, float32 or float64 array of any shape; it is read in row-major order. float64 is
            rounded to float32 first.
        block_size: elements per block, a power of two in [16, 4096].
        rounding: ``"onnxruntime"`` (default) or ``"bitsandbytes"``, see the module docstring.
        name: the tensor's name, used in error messages.
        backend: ``"auto"`` (compiled encoder when the library is found), ``"native"`` or ``"numpy"``.
        threads: threads of the compiled encoder, 0 for all hardware threads (the numpy code uses one).

    Returns:
        ``(packed, absmax)``: uint8 ``[(n + 1) // 2]`` and float32 ``[ceil(n / block_size)]``.

    Raises:
        ValueError: the block size, rounding or backend is invalid, or ``w`` holds NaN/Inf (the message names
            ``name``).
        TypeError: ``w`` is not a float array.
        onnx_nf4.codec.native.NativeCodecUnavailableError: ``backend="native"`` without the library.
    """
    bs = check_block_size(block_size)
    check_rounding(rounding)
    w = as_float_array(w, name)
    if native_codec.use_native(backend):
        packed, absmax, _ = native_codec.encode_flat(w, bs, rounding, threads=threads, name=name)
        return packed, absmax
    check_finite(w, name)
    flat = w.reshape(-1)
    n = flat.size
    n_blocks = -(-n // bs)
    packed = np.empty((n + 1) // 2, dtype=np.uint8)
    absmax = np.empty(n_blocks, dtype=np.float32)
    full = n - n % bs
    for start in range(0, full, _CHUNK_ELEMENTS):
        stop = min(start + _CHUNK_ELEMENTS, full)
        blocks = flat[start:stop].astype(np.float32, copy=False).reshape(-1, bs)
        codes, am = _quantize_full_blocks(blocks, rounding)
        packed[start // 2 : stop // 2] = pack_nibbles(codes)  # start, stop are even
        absmax[start // bs : stop // bs] = am
    if full < n:
        codes, am = _quantize_partial_block(flat[full:].astype(np.float32), rounding)
        packed[full // 2 :] = pack_nibbles(codes)
        absmax[-1] = am
    return packed, absmax


def dequantize_blockwise(
    packed: np.ndarray,
    absmax: np.ndarray,
    shape: tuple[int, ...] | int,
    block_size: int = 64,
) -> np.ndarray:
    """Decode :func:`quantize_blockwise`'s output to a float32 array of ``shape``.

    ``value[i] = NF4_CODE[code[i]] * absmax[i // block_size]`` in float32.
    """
    bs = check_block_size(block_size)
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(int(d) for d in shape)
    n = int(np.prod(shape, dtype=np.int64))
    absmax = np.asarray(absmax).reshape(-1).astype(np.float32, copy=False)
    if absmax.size != -(-n // bs):
        raise ValueError(f"absmax holds {absmax.size} scales, {-(-n // bs)} expected for {n} elements")
    out = np.empty(n, dtype=np.float32)
    for start in range(0, n, _CHUNK_ELEMENTS):
        stop = min(start + _CHUNK_ELEMENTS, n)
        codes = unpack_nibbles(np.asarray(packed).reshape(-1)[start // 2 : (stop + 1) // 2], stop - start)
        scales = np.repeat(absmax[start // bs : -(-stop // bs)], bs)[: stop - start]
        out[start:stop] = NF4_CODE[codes] * scales
    return out.reshape(shape)
