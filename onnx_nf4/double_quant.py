"""Double quantization of NF4 absmax (bitsandbytes' ``compress_statistics=True``).

CONTRACT (to be implemented bit-exact with bitsandbytes 0.50 on CPU):
``offset = mean(absmax)`` (float32), then ``absmax - offset`` is quantized blockwise to 8 bits in blocks of
``nested_block_size`` (256) consecutive entries with bitsandbytes' signed dynamic 8-bit map.
Decoding: ``fl32(fl32(code[q] * nested_absmax[i // nested_block_size]) + offset)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["NestedAbsmax", "dequantize_absmax", "quantize_absmax"]


@dataclass(frozen=True)
class NestedAbsmax:
    """Statistics of double-quantized absmax.

    Attributes:
        nested_absmax: float32 ``[ceil(n / block_size)]``, the scale of each nested block.
        code: float32 ``[256]``, the 8-bit code table.
        offset: float32 scalar added back after decoding.
        block_size: absmax entries per nested block (256 in bitsandbytes).
    """

    nested_absmax: np.ndarray
    code: np.ndarray
    offset: np.float32
    block_size: int = 256

    @property
    def nbytes(self) -> int:
        return int(self.nested_absmax.nbytes + self.code.nbytes + 4)


def quantize_absmax(absmax: np.ndarray, block_size: int = 256) -> tuple[np.ndarray, NestedAbsmax]:
    raise NotImplementedError


def dequantize_absmax(codes: np.ndarray, nested: NestedAbsmax) -> np.ndarray:
    raise NotImplementedError
