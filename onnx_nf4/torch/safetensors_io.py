"""Reading tensors from a ``.safetensors`` file with numpy only (memory-mapped, every dtype).

The format: an 8-byte little-endian header length ``n``, ``n`` bytes of JSON mapping each tensor name to its
``dtype``, ``shape`` and ``data_offsets`` ``[begin, end)`` (relative to the end of the header), then the data.
``bfloat16`` tensors are returned as their raw 16-bit patterns (``uint16``) since numpy has no bfloat16, and the
8-bit float types as ``uint8``; callers that need the bytes (such as a packed 4-bit weight) view them as ``uint8``.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

__all__ = ["SafetensorsError", "read_safetensors"]

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "F8_E4M3": np.uint8,
    "F8_E5M2": np.uint8,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_MAX_HEADER_BYTES = 100 * 2**20


class SafetensorsError(ValueError):
    """The file is not a valid ``.safetensors`` file (the message names the file and the problem)."""


def read_safetensors(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """All tensors of a ``.safetensors`` file as read-only, memory-mapped numpy arrays (little-endian)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise SafetensorsError(f"{path}: too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(_MAX_HEADER_BYTES, size - 8):
            raise SafetensorsError(f"{path}: invalid header length {header_len} (not a safetensors file?)")
        try:
            header = json.loads(file.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise SafetensorsError(f"{path}: the header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: the header is not a JSON object")
    start = 8 + header_len
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(size - start,)) if size > start else None
    tensors: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = np.dtype(_DTYPES[info["dtype"]]).newbyteorder("<")
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{path}: tensor {name!r} has an invalid or unsupported header entry") from None
        count = int(np.prod(shape, dtype=np.int64))
        if end - begin != count * dtype.itemsize or begin < 0 or end > size - start:
            raise SafetensorsError(f"{path}: tensor {name!r} has data offsets inconsistent with its shape/dtype")
        raw = data[begin:end] if data is not None else np.empty(0, np.uint8)
        tensors[name] = raw.view(dtype).reshape(shape)
    return tensors
