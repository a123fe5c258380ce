"""The NF4 code table and its decision thresholds: the single source of truth.

Every other copy (the C/C++/CUDA header ``custom_ops/include/onnx_nf4/nf4_codebook.h``) is generated from
this module by ``tools/gen_codebook_header.py`` and checked against it by the test suite.

* ``NF4_CODE``: float32[16], the 4-bit NormalFloat values of QLoRA, ascending, ``NF4_CODE[7] == 0.0``.
  Identical in bitsandbytes (``get_4bit_type("nf4")``) and onnxruntime.
* ``NF4_THRESHOLDS``: float32[15], onnxruntime's decision bounds (the C float literals of
  ``QuantizeOneNF4``, identical to bitsandbytes' CUDA ``dQuantizeNF4``). The code of a scaled value ``s`` is
  ``#{t in NF4_THRESHOLDS : s > t}``: a tie goes to the lower code. This is the default rounding.
* ``NF4_MIDPOINTS_BNB``: float32[15], ``(NF4_CODE[i] + NF4_CODE[i+1]) / 2`` computed in float32, the bounds of
  bitsandbytes' CPU kernel. They differ from ``NF4_THRESHOLDS`` by one ulp at four places.
* ``NF4_CODE_I8``: int8[16], ``round(NF4_CODE * NF4_I8_LEVELS)`` (``NF4_I8_LEVELS = 127``), the 8-bit image
  of the table used by the CPU kernels at ``accuracy_level = 4``: ``NF4_CODE[c] ~= NF4_CODE_I8[c] / 127``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["NF4_CODE", "NF4_CODE_I8", "NF4_I8_LEVELS", "NF4_MIDPOINTS_BNB", "NF4_THRESHOLDS", "NF4_ZERO_CODE"]

NF4_CODE: np.ndarray = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=np.float32,
)  # fmt: skip

# The exact float32 values of onnxruntime's C float literals (each literal correctly rounded to float32),
# written as the float64 expansions of those float32 values so that no double rounding can occur.
NF4_THRESHOLDS: np.ndarray = np.array(
    [
        -0.8480964303016663, -0.6106328964233398, -0.4599952697753906, -0.33967941999435425,
        -0.23460739850997925, -0.13791173696517944, -0.045525018125772476, 0.03979014977812767,
        0.1202552542090416, 0.2035212516784668, 0.2920137643814087, 0.3893125355243683,
        0.5016633868217468, 0.6427869200706482, 0.8614783883094788,
    ],
    dtype=np.float32,
)  # fmt: skip

NF4_MIDPOINTS_BNB: np.ndarray = ((NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)).astype(np.float32)

#: The code of 0.0 (and of padding elements).
NF4_ZERO_CODE: int = 7

#: Levels of the 8-bit image of the table: the largest magnitude of ``NF4_CODE_I8``.
NF4_I8_LEVELS: int = 127

#: ``round(NF4_CODE * NF4_I8_LEVELS)`` (no value is a tie), the int8 table of ``accuracy_level = 4``.
NF4_CODE_I8: np.ndarray = np.rint(NF4_CODE.astype(np.float64) * NF4_I8_LEVELS).astype(np.int8)

for _table in (NF4_CODE, NF4_THRESHOLDS, NF4_MIDPOINTS_BNB, NF4_CODE_I8):
    _table.setflags(write=False)
