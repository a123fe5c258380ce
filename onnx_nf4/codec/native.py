"""The compiled NF4 encoder of the custom-op library, through ctypes.

The library (see :func:`onnx_nf4.runtime.custom_op_library`) exports a multithreaded SIMD encoder
(``custom_ops/src/nf4_encoder.cc``, C API in ``custom_ops/include/onnx_nf4/nf4_encoder_api.h``) that gives the
same bytes as the numpy codec (:mod:`onnx_nf4.codec.blockwise`, the reference) in both rounding modes. It also
returns, in the same pass over the data, the float64 sums of squared errors and of squared weights, from which the
relative RMS error of a weight follows without a dequantized copy.

:func:`onnx_nf4.quantize_blockwise` and :func:`onnx_nf4.codec.layout.quantize_weight` use it when
``backend="auto"`` (their default) and the library is found; ``backend="numpy"`` forces the reference,
``backend="native"`` requires the library. The calls release the GIL.
"""

from __future__ import annotations

import ctypes
import functools
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = [
    "BACKENDS",
    "Backend",
    "ErrorSums",
    "NativeCodecUnavailableError",
    "available",
    "encode_flat",
    "encode_weight",
    "isa",
    "use_native",
]

Backend = Literal["auto", "native", "numpy"]
BACKENDS: tuple[str, ...] = ("auto", "native", "numpy")

_OK, _NOT_FINITE, _OUT_OF_MEMORY = 0, 2, 3
_MAX_THREADS = 1024  # kMaxThreads of the C API
_ROUNDING_CODES = {"onnxruntime": 0, "bitsandbytes": 1}
# ONNX TensorProto element types, the dtype codes of the C API.
_DTYPE_CODES = {"float32": 1, "float16": 10, "float64": 11, "bfloat16": 16}


class NativeCodecUnavailableError(RuntimeError):
    """``backend="native"`` was asked for, but the library (with the encoder's entry points) is not found."""


@dataclass(frozen=True)
class ErrorSums:
    """Sums over a weight's elements ``x`` (as float32) with their decoded values ``d = fl32(NF4[code] * absmax)``.

    Attributes:
        squared_error: ``sum((x - d)**2)`` in float64 (the metric of :mod:`onnx_nf4.codec.metrics`).
        squared_weight: ``sum(x**2)`` in float64.
    """

    squared_error: float
    squared_weight: float

    @property
    def rel_rms_error(self) -> float:
        """``rms(x - d) / rms(x)``; 0 when both sums are 0, inf when only the weight's is."""
        if not self.squared_weight:
            return math.inf if self.squared_error else 0.0
        return math.sqrt(self.squared_error / self.squared_weight)


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    from ..runtime.library import CustomOpLibraryNotFoundError, custom_op_library

    try:
        lib = ctypes.CDLL(custom_op_library())
        flat, weight = lib.onnx_nf4_encode_flat, lib.onnx_nf4_encode_weight
        status_string, isa_name = lib.onnx_nf4_encoder_status_string, lib.onnx_nf4_encoder_isa
    except (CustomOpLibraryNotFoundError, OSError, AttributeError):
        return None  # no library, or one built before the encoder existed
    i32, i64, ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p
    flat.argtypes = [ptr, i32, i64, i64, i32, i32, ptr, ptr, ptr]
    weight.argtypes = [ptr, i32, i64, i64, i64, i64, i64, i32, i32, ptr, ptr, ptr]
    flat.restype = weight.restype = ctypes.c_int
    status_string.argtypes = [ctypes.c_int]
    status_string.restype = isa_name.restype = ctypes.c_char_p
    isa_name.argtypes = []
    return lib


def available() -> bool:
    """Whether the custom-op library with the encoder's entry points is found."""
    return _library() is not None


def isa() -> str:
    """The instruction set the encoder runs (``"avx512"``, ``"avx2"`` or ``"portable"``).

    Raises:
        NativeCodecUnavailableError: the library is not found.
    """
    return _require().onnx_nf4_encoder_isa().decode()


def use_native(backend: str) -> bool:
    """Whether a codec call with ``backend`` runs the compiled encoder.

    Raises:
        ValueError: ``backend`` is not one of :data:`BACKENDS`.
        NativeCodecUnavailableError: ``backend == "native"`` and the library is not found.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "numpy":
        return False
    if backend == "native":
        _require()
        return True
    return available()


def _require() -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        from ..runtime.library import CustomOpLibraryNotFoundError, custom_op_library

        try:
            where = custom_op_library()
        except CustomOpLibraryNotFoundError as err:
            raise NativeCodecUnavailableError(f"the compiled NF4 encoder is not available: {err}") from None
        raise NativeCodecUnavailableError(f"{where} has no NF4 encoder (built from an older source); rebuild it")
    return lib


def _dtype_code(w: np.ndarray) -> int:
    code = _DTYPE_CODES.get(w.dtype.name)
    if code is None:
        raise TypeError(f"the compiled encoder takes float32/float16/bfloat16/float64, not {w.dtype}")
    return code


def _native_byte_order(w: np.ndarray) -> np.ndarray:
    """``w`` in the machine's byte order and aligned to its element size (as the C code reads it)."""
    if not w.dtype.isnative:
        return w.astype(w.dtype.newbyteorder("="))
    return w if w.flags.aligned else w.copy()


def _check(status: int, w: np.ndarray, name: str) -> None:
    if status == _OK:
        return
    if status == _NOT_FINITE:
        from .validation import NonFiniteWeightError, check_finite

        check_finite(w, name)  # raises the codec's message, naming the tensor and the index
        raise NonFiniteWeightError(f"tensor {name!r} holds a value that is not finite in float32")
    if status == _OUT_OF_MEMORY:
        raise MemoryError(f"the NF4 encoder ran out of memory on tensor {name!r}")
    message = _require().onnx_nf4_encoder_status_string(status).decode()
    raise RuntimeError(f"the NF4 encoder failed on tensor {name!r}: {message} (status {status})")


def _check_threads(threads: int) -> int:
    if int(threads) != threads or not 0 <= threads <= _MAX_THREADS:
        raise ValueError(f"threads must be an integer in [0, {_MAX_THREADS}] (0: all hardware threads): {threads!r}")
    return int(threads)


def _sums_out(sums: bool) -> tuple[np.ndarray | None, int | None]:
    if not sums:
        return None, None
    out = np.zeros(2, np.float64)
    return out, out.ctypes.data


def encode_flat(
    w: np.ndarray,
    block_size: int,
    rounding: str = "onnxruntime",
    *,
    threads: int = 0,
    sums: bool = False,
    name: str = "weight",
) -> tuple[np.ndarray, np.ndarray, ErrorSums | None]:
    """The flat layout of ``w.reshape(-1)``, as :func:`onnx_nf4.quantize_blockwise` (arguments checked there).

    Args:
        w: float32, float16, bfloat16 or float64 array of any shape. A non-contiguous one is copied once, unless
            it is 2-D with rows of whole blocks (e.g. the transpose of a row-major ``[K, N]`` weight).
        block_size: a power of two in [16, 4096].
        rounding: ``"onnxruntime"`` or ``"bitsandbytes"``.
        threads: worker threads; 0 uses every hardware thread.
        sums: also return the :class:`ErrorSums`.
        name: the tensor's name for error messages.

    Returns:
        ``(packed uint8[(n + 1) // 2], absmax float32[ceil(n / block_size)], ErrorSums or None)``.

    Raises:
        ValueError: ``w`` holds NaN/Inf (the codec's message), or an argument is invalid.
    """
    lib = _require()
    threads = _check_threads(threads)
    w = _native_byte_order(np.asarray(w))
    if w.ndim == 2 and not w.flags.c_contiguous and w.shape[1] % block_size == 0 and w.size:
        # Rows of whole blocks: the flat layout of w is the MatMulNF4 layout of w.T, which is read in place.
        packed, absmax, error = encode_weight(w.T, block_size, rounding, threads=threads, sums=sums, name=name)
        return packed.reshape(-1), absmax.reshape(-1), error
    flat = np.ascontiguousarray(w).reshape(-1)
    n = flat.size
    packed = np.empty((n + 1) // 2, np.uint8)
    absmax = np.empty(-(-n // block_size), np.float32)
    out, out_ptr = _sums_out(sums)
    status = lib.onnx_nf4_encode_flat(
        flat.ctypes.data, _dtype_code(flat), n, block_size, _ROUNDING_CODES[rounding], threads,
        packed.ctypes.data, absmax.ctypes.data, out_ptr,
    )  # fmt: skip
    _check(status, w, name)
    return packed, absmax, None if out is None else ErrorSums(float(out[0]), float(out[1]))


def encode_weight(
    w: np.ndarray,
    block_size: int,
    rounding: str = "onnxruntime",
    *,
    threads: int = 0,
    sums: bool = False,
    name: str = "weight",
) -> tuple[np.ndarray, np.ndarray, ErrorSums | None]:
    """The MatMulNF4 layout of ``w[K, N]``, as :func:`onnx_nf4.codec.layout.quantize_weight` (arguments checked there).

    ``w`` is read in place whatever its strides (a row-major ``W`` or the transpose of an ``nn.Linear`` weight);
    only the outputs are allocated.

    Returns:
        ``(packed uint8[N, k_blocks, block_size // 2], absmax float32[N, k_blocks], ErrorSums or None)``.

    Raises:
        ValueError: ``w`` holds NaN/Inf (the codec's message), or an argument is invalid.
    """
    lib = _require()
    threads = _check_threads(threads)
    w = _native_byte_order(np.asarray(w))
    if w.ndim != 2:
        raise ValueError(f"tensor {name!r}: a MatMul weight must be 2-D, got shape {w.shape}")
    if any(stride % w.itemsize for stride in w.strides):
        w = np.ascontiguousarray(w)
    K, N = (int(d) for d in w.shape)
    k_blocks = -(-K // block_size)
    packed = np.empty((N, k_blocks, block_size // 2), np.uint8)
    absmax = np.empty((N, k_blocks), np.float32)
    stride_k, stride_n = (s // w.itemsize for s in w.strides)
    out, out_ptr = _sums_out(sums)
    status = lib.onnx_nf4_encode_weight(
        w.ctypes.data, _dtype_code(w), K, N, stride_k, stride_n, block_size, _ROUNDING_CODES[rounding], threads,
        packed.ctypes.data, absmax.ctypes.data, out_ptr,
    )  # fmt: skip
    _check(status, w, name)
    return packed, absmax, None if out is None else ErrorSums(float(out[0]), float(out[1]))
