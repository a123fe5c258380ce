"""Double quantization of NF4 absmax, bit-exact with bitsandbytes' ``compress_statistics=True`` on CPU.

bitsandbytes 0.50 ``quantize_4bit(..., compress_statistics=True)`` (x86-64 CPU kernel) stores the float32 block
scales ``absmax`` (``n`` entries) as:

1. ``offset = absmax.mean()``: a float32 torch mean, reproduced by :func:`torch_mean_f32`.
2. ``centered = fl32(absmax - offset)``, split into nested blocks of ``block_size`` (256) consecutive entries;
   the last one may be partial.
3. ``nested_absmax[j] = max |centered|`` over nested block ``j``.
4. Each entry of block ``j`` is scaled, ``s = min(max(fl32(centered * fl32(1 / nested_absmax[j])), -1), 1)``
   (a multiply by the float32 reciprocal), and looked up in a 65536-bin table:
   ``bin = trunc(fl32(fl32(fl32(s + 1) * 0.5) * 65535) + 0.5)``, ``code = LUT[bin]`` where ``LUT[i]`` is the
   number of midpoints ``fl32(0.5 * fl32(DYNAMIC_CODE[k] + DYNAMIC_CODE[k + 1]))`` strictly below
   ``fl32(-1 + fl32(2i / 65535))``. This is *not* always the nearest code: within about one bin (3e-5) of a
   midpoint the bin centre decides. A nested block whose ``nested_absmax`` is 0 (every entry equal to
   ``offset``) gets code 0.

Decoding is ``fl32(fl32(DYNAMIC_CODE[code[i]] * nested_absmax[i // block_size]) + offset)``: a float32
multiply, rounded, then a float32 add, rounded, as ``bitsandbytes.functional.dequantize_4bit`` does.

``DYNAMIC_CODE`` is bitsandbytes' signed dynamic 8-bit map (``create_dynamic_map()``), rebuilt here by
:func:`create_dynamic_map` with torch's float32 ``linspace`` arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .validation import is_valid_nested_block_size

__all__ = [
    "DYNAMIC_CODE",
    "NestedAbsmax",
    "create_dynamic_map",
    "dequantize_absmax",
    "quantize_absmax",
    "torch_mean_f32",
]

_TORCH_GRAIN_SIZE = 32768  # at::internal::GRAIN_SIZE: below it torch reduces on one thread


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` on CPU, bit for bit.

    torch computes ``step = fl32(fl32(end - start) / (steps - 1))`` and then, with one fused multiply-add
    (one rounding), ``start + step * i`` for the first half and ``end - step * (steps - 1 - i)`` for the rest.
    The float64 expression below is exact before its single rounding to float32, so it equals that fma.
    """
    s, e = np.float32(start), np.float32(end)
    step = np.float64((e - s) / np.float32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    first = np.float64(s) + step * i
    second = np.float64(e) - step * (steps - 1 - i)
    return np.where(i < steps // 2, first, second).astype(np.float32)


def create_dynamic_map() -> np.ndarray:
    """bitsandbytes' signed dynamic 8-bit map (``create_dynamic_map(signed=True)``): float32 ``[256]``, ascending.

    For ``e = 0..6`` the ``2**e`` midpoints of ``linspace(0.1, 1, 2**e + 1)`` are scaled by ``10**(e - 6)``
    (each product rounded to float32) and taken with both signs; ``0`` and ``1`` complete the 256 entries.
    """
    values = [np.float32(0.0), np.float32(1.0)]
    for e in range(7):
        bounds = _linspace_f32(0.1, 1.0, 2**e + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2)
        scaled = means * np.float32(10.0 ** (e - 6))
        values.extend(scaled)
        values.extend(-scaled)
    table = np.sort(np.array(values, dtype=np.float32))
    assert table.size == 256 and np.unique(table).size == 256
    return table


#: bitsandbytes' signed dynamic 8-bit map, the ``nested_code`` of every double-quantized weight.
DYNAMIC_CODE: np.ndarray = create_dynamic_map()
DYNAMIC_CODE.setflags(write=False)


# ---------------------------------------------------------------------------------------------------------
# torch's float32 sum on CPU (aten/src/ATen/native/cpu/SumKernel.cpp, "cascade_sum"), reproduced in numpy.
# Every helper adds in float32 with one rounding per addition, in exactly torch's order.


def _fold(a: np.ndarray) -> np.ndarray:
    """Left-to-right float32 sum over axis 0 (``acc = 0; for x in a: acc += x``), elementwise over the rest."""
    acc = np.zeros(a.shape[1:], dtype=np.float32)
    for row in a:  # the number of rows is bounded by a cascade chunk length, never by the data size
        acc += row
    return acc


def _fold_groups(a: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Split axis 0 into complete groups of ``size`` rows: (left-fold of each group, left-fold of the rest)."""
    full = a.shape[0] // size * size
    groups = a[:full].reshape(full // size, size, *a.shape[1:]).swapaxes(0, 1)
    return _fold(groups), _fold(a[full:])


def _ceil_log2(x: int) -> int:
    return 1 if x <= 2 else (x - 1).bit_length()


def _multi_row_sum(rows: np.ndarray) -> np.ndarray:
    """torch's ``multi_row_sum``: a 4-level cascade over axis 0 of ``rows[m, c]``, one sum per column."""
    level = 1 << max(4, _ceil_log2(rows.shape[0]) // 4)
    chunks, acc0 = _fold_groups(rows, level)
    level1, acc1 = _fold_groups(chunks, level)
    level2, acc2 = _fold_groups(level1, level)
    acc3 = _fold(level2)
    return ((acc0 + acc1) + acc2) + acc3


def _row_sum(rows: np.ndarray) -> np.ndarray:
    """torch's ``row_sum`` over axis 0 of ``rows[m, lanes]``: 4 interleaved cascades, then the leftovers."""
    m, lanes = rows.shape
    quads = m // 4
    partial = _multi_row_sum(rows[: quads * 4].reshape(quads, 4 * lanes)).reshape(4, lanes)
    acc = partial[0]
    for row in rows[quads * 4 :]:
        acc = acc + row
    for k in range(1, 4):
        acc = acc + partial[k]
    return acc


def _inner_sum(x: np.ndarray, lanes: int) -> np.float32:
    """One call of torch's reduction loop on a contiguous 1-D float32 range: its float32 sum."""
    if x.size < lanes:  # scalar_inner_sum
        return np.float32(_row_sum(x.reshape(-1, 1))[0])
    nvec = x.size // lanes  # vectorized_inner_sum
    vec_acc = _row_sum(x[: nvec * lanes].reshape(nvec, lanes))
    total = np.float32(0)
    for v in x[nvec * lanes :]:
        total = np.float32(total + v)
    for v in vec_acc:
        total = np.float32(total + v)
    return total


def torch_mean_f32(x: np.ndarray, *, lanes: int = 8, threads: int = 1) -> np.float32:
    """``torch.mean`` of a 1-D float32 tensor on CPU, bit for bit: ``fl32(sum / fl32(n))``.

    torch sums float32 with a cascade (chunks of at least 16, four levels) over ``lanes``-wide SIMD vectors
    with four interleaved accumulators, then adds the leftover elements and the lanes in order. Its sum
    kernel is not built for AVX-512, so on x86-64 it runs 8-lane ``Vectorized<float>`` code whatever
    ``torch.backends.cpu.get_cpu_capability()`` says (checked with torch 2.13 on an AVX-512 machine). From
    ``32768`` elements on, the result also depends on ``torch.get_num_threads()``: the range is split into
    ``min(threads, ceil(n / 32768))`` equal chunks, each summed as above, and the chunk sums are summed last.

    Args:
        x: array of any shape, read as float32 in row-major order; at least one element.
        lanes: float32 lanes of the ``Vectorized<float>`` torch's sum kernel runs with (8 on x86-64).
        threads: torch's intra-op thread count (``torch.get_num_threads()``).

    Where torch's float32 sum overflows (values near the float32 limit; torch then returns ``inf`` or NaN), the
    float64 mean rounded to float32 is returned instead: the mean of finite values is never lost to an overflow.

    Raises:
        ValueError: ``x`` is empty, or ``lanes`` or ``threads`` is not positive.
    """
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    n = flat.size
    if n == 0:
        raise ValueError("the mean of an empty array is undefined")
    if lanes < 1 or threads < 1:
        raise ValueError(f"lanes and threads must be positive, got lanes={lanes}, threads={threads}")
    with np.errstate(over="ignore", invalid="ignore"):  # an overflowing float32 sum is detected below
        mean = _torch_mean(flat, lanes, threads)
    if np.isfinite(mean) or not np.isfinite(flat).all():
        return mean  # no partial sum overflowed (an inf never turns finite again), or the input is not finite
    return np.float32(np.mean(flat, dtype=np.float64))  # the mean of finite float32 values fits in float32


def _torch_mean(flat: np.ndarray, lanes: int, threads: int) -> np.float32:
    """torch's float32 mean of a flat float32 array (``inf`` / NaN where a partial sum overflows)."""
    n = flat.size
    if n < _TORCH_GRAIN_SIZE or threads == 1:
        total = _inner_sum(flat, lanes)
    else:  # two-pass reduction: one partial sum per thread in a zero-filled buffer, then a sum of the buffer
        used = min(threads, -(-n // _TORCH_GRAIN_SIZE))
        chunk = -(-n // used)
        buffer = np.zeros(threads, dtype=np.float32)
        for t in range(used):
            if t * chunk < n:
                buffer[t] = _inner_sum(flat[t * chunk : (t + 1) * chunk], lanes)
        total = _inner_sum(buffer, lanes)
    return np.float32(total / np.float32(n))


@dataclass(frozen=True)
class NestedAbsmax:
    """Statistics of double-quantized absmax.

    Attributes:
        nested_absmax: float32 ``[ceil(n / block_size)]``, the scale of each nested block.
        code: float32 ``[256]``, the 8-bit code table (:data:`DYNAMIC_CODE`).
        offset: float32 scalar added back after decoding.
        block_size: absmax entries per nested block (256 in bitsandbytes).
    """

    nested_absmax: np.ndarray
    code: np.ndarray
    offset: np.float32
    block_size: int = 256

    @property
    def nbytes(self) -> int:
        """Bytes stored for these statistics (nested absmax, code table and offset)."""
        return int(self.nested_absmax.nbytes + self.code.nbytes + 4)


def _check_nested_block_size(block_size: int) -> int:
    bs = int(block_size)
    if bs != block_size or not is_valid_nested_block_size(bs):
        raise ValueError(f"nested block_size must be a power of two >= 16, got {block_size!r}")
    return bs


_LUT_BINS = 65536


def _build_lut(code: np.ndarray) -> np.ndarray:
    """uint8 ``[65536]``: for bin ``i`` (value ``fl32(-1 + fl32(2i / 65535))``), the count of code midpoints
    strictly below it, i.e. the code of that value with midpoint ties going to the lower code."""
    f32 = np.float32
    midpoints = f32(0.5) * (code[:-1] + code[1:])
    centres = f32(-1) + (f32(2) * np.arange(_LUT_BINS, dtype=f32)) / f32(_LUT_BINS - 1)
    return np.searchsorted(midpoints, centres, side="left").astype(np.uint8)


_DYNAMIC_LUT = _build_lut(DYNAMIC_CODE)


#: Round to nearest gives ``inf`` for a float32 ``1 / scale`` whose exact value is at least this.
_INF_RECIPROCAL = float(np.finfo(np.float32).max) + 2.0**103


def _float32_reciprocal(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(inv, finite)``: the float32 ``1 / scales`` where it is finite, and where that is (``scales >= 0``).

    Computed in float64 and rounded once to float32, which gives the correctly rounded float32 quotient (float64
    has more than twice float32's precision) without ever overflowing; ``inv`` is 0 where ``finite`` is false
    (float32 would give ``inf``: a zero or subnormal scale).
    """
    s64 = scales.astype(np.float64)
    inv = np.divide(1.0, s64, out=np.full(s64.shape, np.inf), where=s64 > 0)
    finite = inv < _INF_RECIPROCAL
    return np.where(finite, inv, 0.0).astype(np.float32), finite


def _lut_codes(centered: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """8-bit codes of ``centered`` (float32 ``[n]``) with per-element ``scales`` (float32 ``[n]``), see step 4.

    bitsandbytes computes ``clip(centered * fl32(1 / scale), -1, 1)``; where ``1 / scale`` is ``inf`` in float32
    that is ``+1`` for a positive value, ``-1`` for a negative one and NaN (bin 0, as ``-1``) for zero; the same
    codes are computed here without an overflow. A zero scale gives code 0.
    """
    f32 = np.float32
    inv, finite = _float32_reciprocal(scales)
    s = np.where(finite, np.clip(centered * inv, f32(-1), f32(1)), np.where(centered > 0, f32(1), f32(-1)))
    t = (s + f32(1)) * f32(0.5) * f32(_LUT_BINS - 1) + f32(0.5)
    codes = _DYNAMIC_LUT[t.astype(np.int32)]
    codes[scales == 0] = 0
    return codes


def quantize_absmax(
    absmax: np.ndarray, block_size: int = 256, *, offset: float | None = None
) -> tuple[np.ndarray, NestedAbsmax]:
    """Double-quantize NF4 block scales as bitsandbytes' ``quantize_4bit(..., compress_statistics=True)``.

    Args:
        absmax: the float32 (or float16/float64, rounded to float32) block scales, read in row-major order.
        block_size: entries per nested block, a power of two >= 16 (bitsandbytes uses 256).
        offset: the value subtracted before quantizing (rounded to float32). Default:
            ``torch_mean_f32(absmax)``, bitsandbytes' offset for fewer than 32768 entries, or with torch on one
            thread. For more entries bitsandbytes' offset depends on torch's thread count: pass
            ``offset=torch_mean_f32(absmax, threads=torch.get_num_threads())`` to reproduce it exactly.

    Returns:
        ``(codes, nested)``: uint8 ``[n]`` codes into ``nested.code`` and the :class:`NestedAbsmax`.

    Raises:
        ValueError: ``absmax`` is empty or holds NaN/Inf, or ``block_size`` is invalid.
        TypeError: ``absmax`` is not a float array.
    """
    bs = _check_nested_block_size(block_size)
    a = np.asarray(absmax)
    if a.dtype.type not in (np.float16, np.float32, np.float64):
        raise TypeError(f"absmax has dtype {a.dtype}; a float array is required")
    a = a.astype(np.float32, copy=False).reshape(-1)
    if a.size == 0:
        raise ValueError("absmax is empty")
    if not np.isfinite(a).all():
        raise ValueError("absmax holds NaN or Inf")
    off = torch_mean_f32(a) if offset is None else np.float32(offset)
    if not np.isfinite(off):
        raise ValueError(f"offset must be finite, got {offset!r}")
    centered = a - off
    nested_absmax = np.maximum.reduceat(np.abs(centered), np.arange(0, a.size, bs))
    codes = _lut_codes(centered, np.repeat(nested_absmax, bs)[: a.size])
    return codes, NestedAbsmax(nested_absmax.astype(np.float32), DYNAMIC_CODE.copy(), off, bs)


def dequantize_absmax(codes: np.ndarray, nested: NestedAbsmax) -> np.ndarray:
    """Decode :func:`quantize_absmax`: float32 ``[n]``, ``fl32(fl32(code[q] * nested_absmax[i // bs]) + offset)``.

    Raises:
        TypeError: ``codes`` is not uint8.
        ValueError: ``nested.nested_absmax`` does not hold ``ceil(n / nested.block_size)`` scales, or
            ``nested.code`` does not hold 256 entries.
    """
    q = np.asarray(codes)
    if q.dtype != np.uint8:
        raise TypeError(f"double-quantized absmax codes must be uint8, got {q.dtype}")
    q = q.reshape(-1)
    bs = _check_nested_block_size(nested.block_size)
    scales = np.asarray(nested.nested_absmax, dtype=np.float32).reshape(-1)
    table = np.asarray(nested.code, dtype=np.float32).reshape(-1)
    if scales.size != -(-q.size // bs):
        raise ValueError(f"nested_absmax holds {scales.size} scales, {-(-q.size // bs)} expected for {q.size} codes")
    if table.size != 256:
        raise ValueError(f"the nested code table must hold 256 entries, got {table.size}")
    product = table[q] * np.repeat(scales, bs)[: q.size]
    return product + np.float32(nested.offset)
