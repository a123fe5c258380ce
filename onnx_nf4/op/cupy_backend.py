"""``MatMulNF4`` on an NVIDIA GPU without the compiled library: the CUDA kernels through ``cupy.RawModule``.

The kernels are those of the C++ library (``matmul_nf4.cu``), compiled at run time by NVRTC (CuPy caches the
binaries on disk). The source is found in an installed package (``onnx_nf4/kernels/``) or in a source checkout
(``custom_ops/cuda/``); the NF4 table header is inlined into it. Needs ``cupy-cuda13x`` (the ``cupy`` extra)
and a GPU of compute capability 8.0 or newer; importing this module needs neither.

* :func:`matmul_nf4`: ``Y = A @ W (+ bias)`` on device arrays: CuPy arrays or anything that speaks DLPack
  (PyTorch CUDA tensors come back as PyTorch tensors). Same inputs and attributes as the op
  (``docs/MatMulNF4.md``) and as :func:`onnx_nf4.op.reference.matmul_nf4`.
* :class:`MatMulNF4`: the op for ``onnx.reference.ReferenceEvaluator(model, new_ops=[MatMulNF4])``, computed
  on the GPU (the weight tensors are copied to the device once per node).
* :func:`kernel_source` and :func:`plan_launches`: the preprocessed source and the launch configuration (the
  same choices as the C++ launcher ``LaunchMatMulNF4``); they need no GPU. The launch constants below copy those of
  ``matmul_nf4.cu``; ``tests/test_cupy_constants.py`` reads them from the source and compares.
"""

from __future__ import annotations

import ctypes
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..codec.validation import is_valid_block_size
from . import reference
from .contract import Attributes, TensorInfo, check_inputs

__all__ = [
    "KernelSourceNotFoundError",
    "Launch",
    "MatMulNF4",
    "kernel_names",
    "kernel_source",
    "matmul_nf4",
    "plan_launches",
]

Algo = Literal["auto", "simt", "mma"]
Backend = Literal["nvrtc", "library"]
DType = Literal["float32", "float16", "bfloat16"]

KERNEL_FILE = "matmul_nf4.cu"
CODEBOOK_HEADER = "nf4_codebook.h"
_INCLUDE_RE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"onnx_nf4/nf4_codebook\.h"[^\n]*$', re.MULTILINE)

#: The ``onnx_nf4`` package folder (``pip install .`` puts the CUDA source under its ``kernels/``).
_PACKAGE_DIR = Path(__file__).resolve().parent.parent
_REPO_DIR = _PACKAGE_DIR.parent

#: CTA size of every kernel (kThreads in matmul_nf4.cu) and its warps (kWarps).
THREADS = 256
WARPS = THREADS // 32
#: gridDim.y limit; larger M is split into several launches (kMaxRowTiles).
MAX_ROW_TILES = 65535
#: k_split aims at about this many warps per SM (KSplit's target).
WARPS_PER_SM = 16
#: Minimum compute capability (mma.m16n8k16 with bfloat16, cvt.rn.bf16.f32).
MIN_COMPUTE_CAPABILITY = 80

_FLAG_CODES_VEC16 = 1
_FLAG_ACT_VEC16 = 2
_CPP_TYPES = {"float32": "float", "float16": "onnx_nf4::gpu::f16", "bfloat16": "onnx_nf4::gpu::bf16"}
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
_SIMT_TILES = (1, 2, 4, 8)
_MMA_TILES = (8, 16)
#: Above this M the tensor-core path uses the CTA-tiled kernel (kSkinnyMaxRows), in tiles of
#: TILE_N columns x TILE_M rows (kTileN, kTileM).
SKINNY_MAX_ROWS = 32
TILE_N = 128
TILE_M = 64


class KernelSourceNotFoundError(FileNotFoundError):
    """``matmul_nf4.cu`` or ``nf4_codebook.h`` is neither installed with the package nor in a source checkout."""


def _kernel_files() -> tuple[Path, Path]:
    """The ``.cu`` source and the codebook header: installed copies first, then the source tree."""
    candidates = [
        (_PACKAGE_DIR / "kernels" / KERNEL_FILE, _PACKAGE_DIR / "kernels" / CODEBOOK_HEADER),
        (
            _REPO_DIR / "custom_ops" / "cuda" / KERNEL_FILE,
            _REPO_DIR / "custom_ops" / "include" / "onnx_nf4" / CODEBOOK_HEADER,
        ),
    ]
    for source, header in candidates:
        if source.is_file() and header.is_file():
            return source, header
    searched = ", ".join(f"{s} + {h}" for s, h in candidates)
    raise KernelSourceNotFoundError(f"the onnx_nf4 CUDA kernel source was not found; searched: {searched}")


def kernel_source() -> str:
    """The CUDA source of the kernels, ready for NVRTC: ``matmul_nf4.cu`` with ``nf4_codebook.h`` inlined.

    Inlining (rather than an include path) keeps the program self-contained, so CuPy's cache key covers the table.

    Raises:
        KernelSourceNotFoundError: the files are missing.
        ValueError: the source does not include the header exactly once.
    """
    source_path, header_path = _kernel_files()
    source = source_path.read_text(encoding="utf-8")
    header = header_path.read_text(encoding="utf-8")
    matches = _INCLUDE_RE.findall(source)
    if len(matches) != 1:
        raise ValueError(f"{source_path} must include onnx_nf4/nf4_codebook.h exactly once, found {len(matches)}")
    return _INCLUDE_RE.sub(lambda _: header, source, count=1)


def kernel_names(dtype: DType) -> list[str]:
    """The template-ids of every kernel instantiated for activations of ``dtype`` (NVRTC name expressions)."""
    cpp = _CPP_TYPES[dtype]
    names = [f"onnx_nf4::gpu::nf4_gemv_simt<{cpp}, {mt}>" for mt in _SIMT_TILES]
    if dtype != "float32":
        names += [f"onnx_nf4::gpu::nf4_gemv_mma<{cpp}, {mt}>" for mt in _MMA_TILES]
        names.append(f"onnx_nf4::gpu::nf4_gemm_mma<{cpp}>")
    return names


@dataclass(frozen=True)
class Launch:
    """One kernel launch: rows ``[row_start, row_start + rows)`` of ``A`` and ``Y``.

    Attributes:
        kernel: the template-id (one of :func:`kernel_names`).
        grid: ``(x, y)``: column groups, row tiles. The block is always ``THREADS`` threads.
        row_start, rows: the rows of this launch.
        k_split: warps per output column (CUDA cores) or per 16-column tile (skinny tensor-core kernel), a power of
            two <= 8; 1 for the tiled kernel.
        flags: bit 0: B rows allow 16-byte loads; bit 1: A rows allow 16-byte loads.
    """

    kernel: str
    grid: tuple[int, int]
    row_start: int
    rows: int
    k_split: int
    flags: int


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _k_split(units: int, row_tiles: int, stretches: int, sm_count: int) -> int:
    """Warps per output unit: about WARPS_PER_SM warps per SM, at most WARPS and no more than the unit's stretches."""
    target = WARPS_PER_SM * sm_count
    ks = 1
    while ks < WARPS and units * row_tiles * ks < target and 2 * ks <= stretches:
        ks *= 2
    return ks


def plan_launches(
    dtype: DType,
    M: int,
    K: int,
    N: int,
    block_size: int,
    *,
    algo: Algo = "auto",
    sm_count: int,
    a_ptr: int = 0,
    b_ptr: int = 0,
) -> list[Launch]:
    """The launches of one ``MatMulNF4`` call (what ``LaunchMatMulNF4`` of the C++ library does).

    ``auto`` uses the tensor-core kernels for float16 / bfloat16 (skinny up to M = 32, tiled above) and the CUDA-core
    one for float32. ``a_ptr`` and
    ``b_ptr`` (device addresses) decide whether 16-byte loads are allowed. No launch for ``M == 0``.

    Raises:
        ValueError: an unknown ``dtype`` or ``algo``, ``mma`` with float32, or sizes out of range.
    """
    if dtype not in _CPP_TYPES:
        raise ValueError(f"MatMulNF4: unsupported activation dtype {dtype!r}; expected one of {list(_CPP_TYPES)}")
    if algo not in ("auto", "simt", "mma"):
        raise ValueError(f"MatMulNF4: algo must be 'auto', 'simt' or 'mma', got {algo!r}")
    if algo == "mma" and dtype == "float32":
        raise ValueError("MatMulNF4: the tensor-core kernel takes float16 or bfloat16 A only")
    if not (1 <= K < 2**31 and 1 <= N < 2**31) or M < 0:
        raise ValueError(f"MatMulNF4: sizes out of range (M={M}, K={K}, N={N})")
    if not is_valid_block_size(block_size):
        raise ValueError(f"MatMulNF4: block_size must be a power of two in [16, 4096], got {block_size}")
    mma = algo == "mma" or (algo == "auto" and dtype != "float32")
    row_bytes = _ceil_div(K, block_size) * block_size // 2
    flags = 0
    if row_bytes % 16 == 0 and b_ptr % 16 == 0:
        flags |= _FLAG_CODES_VEC16
    if K % (16 // _ITEMSIZE[dtype]) == 0 and a_ptr % 16 == 0:
        flags |= _FLAG_ACT_VEC16
    if mma and M > SKINNY_MAX_ROWS:
        mt, k_split, grid_x = TILE_M, 1, _ceil_div(N, TILE_N)
        kernel = f"onnx_nf4::gpu::nf4_gemm_mma<{_CPP_TYPES[dtype]}>"
    else:
        if mma:
            mt = 8 if M <= 8 else 16
            units, stretches = _ceil_div(N, 16), _ceil_div(row_bytes, 64)
            kernel = f"onnx_nf4::gpu::nf4_gemv_mma<{_CPP_TYPES[dtype]}, {mt}>"
        else:
            mt = next((t for t in _SIMT_TILES if t >= M), _SIMT_TILES[-1])
            units, stretches = N, _ceil_div(_ceil_div(row_bytes, 16), 32)
            kernel = f"onnx_nf4::gpu::nf4_gemv_simt<{_CPP_TYPES[dtype]}, {mt}>"
        k_split = _k_split(units, _ceil_div(M, mt), stretches, sm_count)
        grid_x = _ceil_div(units, WARPS // k_split)
    launches = []
    row = 0
    while row < M:
        tiles = min(MAX_ROW_TILES, _ceil_div(M - row, mt))
        rows = min(tiles * mt, M - row)
        launches.append(Launch(kernel, (grid_x, tiles), row, rows, k_split, flags))
        row += rows
    return launches


# ---------------------------------------------------------------------------------------------------------
# GPU execution (needs CuPy and a GPU)
# ---------------------------------------------------------------------------------------------------------


def _cupy() -> Any:
    try:
        import cupy
    except ImportError as err:
        raise ImportError(
            "onnx_nf4.op.cupy_backend needs CuPy: pip install 'onnx_nf4[cupy]' (cupy-cuda13x) on a machine with an "
            "NVIDIA GPU"
        ) from err
    return cupy


_modules: dict[tuple[int, str], Any] = {}
_modules_lock = threading.Lock()


_sm_counts: dict[int, int] = {}


def _sm_count(cupy: Any) -> int:
    """Multiprocessors of the current device (queried once per device)."""
    device = cupy.cuda.Device()
    count = _sm_counts.get(int(device.id))
    if count is None:
        count = _sm_counts[int(device.id)] = int(device.attributes["MultiProcessorCount"])
    return count


def _module(cupy: Any, dtype: DType) -> Any:
    """The compiled RawModule of ``dtype``'s kernels on the current device (compiled once per process)."""
    device = cupy.cuda.Device()
    key = (int(device.id), dtype)
    with _modules_lock:
        module = _modules.get(key)
        if module is None:
            cc = int(device.compute_capability)
            if cc < MIN_COMPUTE_CAPABILITY:
                raise RuntimeError(
                    f"MatMulNF4: the CUDA kernels need compute capability >= 8.0, device {device.id} has {cc / 10:.1f}"
                )
            module = cupy.RawModule(code=kernel_source(), options=("-std=c++17",), name_expressions=kernel_names(dtype))
            _modules[key] = module
    return module


def _dtype_name(dtype: Any) -> DType:
    name = str(dtype)
    if name not in _CPP_TYPES:
        raise TypeError(f"MatMulNF4: input 'A' has dtype {name}, expected float32, float16 or bfloat16")
    return name  # type: ignore[return-value]


def _to_cupy(cupy: Any, x: Any, name: str) -> Any:
    """A CuPy view of a device array (CuPy, or any DLPack producer); PyTorch bfloat16 is viewed as int16."""
    if isinstance(x, cupy.ndarray):
        return x
    if type(x).__module__.startswith("torch"):
        import torch

        if not x.is_cuda:
            raise TypeError(f"MatMulNF4: input {name!r} is a CPU tensor; move it to the GPU first")
        if x.dtype == torch.bfloat16:
            return cupy.from_dlpack(x.contiguous().view(torch.int16))
    if hasattr(x, "__dlpack__"):
        return cupy.from_dlpack(x)
    raise TypeError(f"MatMulNF4: input {name!r} is a {type(x).__name__}, not a device array (CuPy or DLPack)")


def _info(x: Any) -> TensorInfo | None:
    return None if x is None else TensorInfo(str(x.dtype), tuple(x.shape))


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(f"MatMulNF4: {message}")


def _aligned_contiguous(cupy: Any, x: Any, alignment: int) -> Any:
    """``x`` as a C-contiguous array whose data pointer is ``alignment``-aligned (copied only when needed)."""
    x = cupy.ascontiguousarray(x)
    if x.data.ptr % alignment:
        x = x.copy()  # a fresh allocation is 256-byte aligned
    return x


def matmul_nf4(
    A: Any,
    B: Any,
    absmax: Any,
    nested_absmax: Any = None,
    nested_code: Any = None,
    absmax_offset: Any = None,
    bias: Any = None,
    *,
    K: int,
    N: int,
    block_size: int,
    nested_block_size: int = 256,
    algo: Algo = "auto",
    stream: Any = None,
    backend: Backend = "nvrtc",
    bfloat16: bool = False,
    out: Any = None,
) -> Any:
    """``Y = A @ W (+ bias)`` on the GPU, for an NF4 weight in the ``MatMulNF4`` layout (``docs/MatMulNF4.md``).

    Args:
        A: float32 / float16 / bfloat16 ``[..., K]`` device array (CuPy, or a DLPack producer such as a PyTorch
            CUDA tensor).
        B, absmax, nested_absmax, nested_code, absmax_offset, bias: the op's other inputs, device arrays of the
            spec's dtypes and shapes (``bias`` of ``A``'s dtype).
        K, N, block_size, nested_block_size: the node's attributes.
        algo: ``"auto"`` (tensor cores for float16 / bfloat16, CUDA cores for float32), ``"simt"`` (CUDA cores)
            or ``"mma"`` (tensor cores; not for float32).
        stream: a ``cupy.cuda.Stream`` (default: CuPy's current stream). Nothing is synchronized.
        backend: ``"nvrtc"`` (compile ``matmul_nf4.cu`` at run time; needs no compiled library) or ``"library"``
            (the same kernels from the compiled custom-op library, through its ``onnx_nf4_cuda_matmul`` entry point).
        bfloat16: ``A`` (and ``bias``) are uint16 / int16 arrays holding bfloat16 bit patterns (CuPy has no
            bfloat16 dtype); ``Y`` is returned the same way.
        out: a C-contiguous CuPy array of ``Y``'s shape and dtype to write into (then returned). With it and
            contiguous, 16-byte aligned inputs a call allocates and copies nothing, so it can be captured in a
            CUDA graph.

    Returns:
        ``Y``, ``[..., N]`` of ``A``'s dtype: a PyTorch tensor when ``A`` is one, else a CuPy array.

    Raises:
        ValueError, TypeError: inputs that do not match the spec (checked before any launch).
        ImportError: CuPy is not installed.
    """
    cupy = _cupy()
    from_torch = type(A).__module__.startswith("torch")
    bf16_torch = from_torch and str(A.dtype) == "torch.bfloat16"
    a = _to_cupy(cupy, A, "A")
    if bfloat16:
        if a.dtype not in (np.uint16, np.int16):
            raise TypeError(f"MatMulNF4: bfloat16=True needs A as uint16 or int16 bit patterns, got {a.dtype}")
        dtype: DType = "bfloat16"
    else:
        dtype = "bfloat16" if bf16_torch else _dtype_name(a.dtype)
    weights = [None if v is None else _to_cupy(cupy, v, name) for v, name in zip(
        (B, absmax, nested_absmax, nested_code, absmax_offset, bias), _WEIGHT_NAMES, strict=True)]  # fmt: skip
    y = _matmul(cupy, a, dtype, *weights, K=K, N=N, block_size=block_size, nested_block_size=nested_block_size,
                algo=algo, stream=stream, backend=backend, out=out)  # fmt: skip
    if not from_torch:
        return y
    import torch

    out = torch.from_dlpack(y)
    return out.view(torch.bfloat16) if bf16_torch else out


_WEIGHT_NAMES = ("B", "absmax", "nested_absmax", "nested_code", "absmax_offset", "bias")


def _matmul(
    cupy: Any,
    a: Any,
    dtype: DType,
    b: Any,
    s: Any,
    nested_absmax: Any,
    nested_code: Any,
    absmax_offset: Any,
    bias: Any,
    *,
    K: int,
    N: int,
    block_size: int,
    nested_block_size: int = 256,
    algo: Algo = "auto",
    stream: Any = None,
    backend: Backend = "nvrtc",
    out: Any = None,
) -> Any:
    """Validates CuPy inputs (``a``'s storage may be 16-bit integers standing for bfloat16) and runs the kernels."""
    attrs = Attributes.create(K, N, block_size, nested_block_size)
    _check(algo in ("auto", "simt", "mma"), f"algo must be 'auto', 'simt' or 'mma', got {algo!r}")
    _check(backend in ("nvrtc", "library"), f"backend must be 'nvrtc' or 'library', got {backend!r}")
    _check(algo != "mma" or dtype != "float32", "the tensor-core kernel ('mma') takes float16 or bfloat16 A only")
    nested = (nested_absmax, nested_code, absmax_offset)
    infos = [_info(v) for v in (b, s, *nested)]
    # A's dtype is given (bfloat16 is held as 16-bit integers); a bias stored like A has A's dtype.
    bias_info = _info(bias)
    if bias_info is not None and bias.dtype == a.dtype:
        bias_info = TensorInfo(dtype, bias_info.shape)
    shapes = check_inputs(attrs, [TensorInfo(dtype, tuple(a.shape)), *infos, bias_info])
    K, N, block_size, nbs = attrs.K, attrs.N, attrs.block_size, attrs.nested_block_size
    lead, M = a.shape[:-1], shapes.M
    if out is None:
        y = cupy.empty((*lead, N), dtype=a.dtype)
    else:
        _check(isinstance(out, cupy.ndarray), "out must be a CuPy array")
        _check(out.shape == (*lead, N) and out.dtype == a.dtype, f"out must be {a.dtype} of shape {[*lead, N]}, got "
               f"{out.dtype} of shape {list(out.shape)}")  # fmt: skip
        _check(out.flags.c_contiguous, "out must be C-contiguous")
        y = out
    if M == 0:
        return y
    a2 = _aligned_contiguous(cupy, a.reshape(M, K), 16)
    b = _aligned_contiguous(cupy, b, 16)
    dq = shapes.double_quant
    s = cupy.ascontiguousarray(s)
    na, code, offset = (cupy.ascontiguousarray(v) for v in nested) if dq else (None, None, None)
    bias = None if bias is None else cupy.ascontiguousarray(bias)
    y2 = y.reshape(M, N)
    stream = stream if stream is not None else cupy.cuda.get_current_stream()
    operands = _Operands(a2, b, s, na, code, offset, bias, y2)
    if backend == "library":
        _launch_library(dtype, operands, K, N, block_size, nbs, algo, stream)
    else:
        _launch_nvrtc(cupy, dtype, operands, K, N, block_size, nbs, algo, stream)
    return y


@dataclass(frozen=True)
class _Operands:
    """Validated, C-contiguous device arrays of one call (``a`` [M, K], ``y`` [M, N]; nested ones or ``None``)."""

    a: Any
    b: Any
    absmax: Any
    nested_absmax: Any
    nested_code: Any
    absmax_offset: Any
    bias: Any
    y: Any


def _launch_nvrtc(
    cupy: Any, dtype: DType, x: _Operands, K: int, N: int, block_size: int, nbs: int, algo: Algo, stream: Any
) -> None:
    M = int(x.a.shape[0])
    launches = plan_launches(dtype, M, K, N, block_size, algo=algo, sm_count=_sm_count(cupy),
                             a_ptr=x.a.data.ptr, b_ptr=x.b.data.ptr)  # fmt: skip
    module = _module(cupy, dtype)
    null = np.uint64(0)
    dq = x.absmax.dtype == np.uint8
    pointers = (x.b, null if dq else x.absmax, x.absmax if dq else null, *(null if v is None else v for v in (
        x.nested_absmax, x.nested_code, x.absmax_offset, x.bias)))  # fmt: skip
    fixed = (np.int32(K), np.int32(N), np.int32(block_size.bit_length() - 1), np.int32(_ceil_div(K, block_size)),
             np.int32(nbs.bit_length() - 1 if dq else 0))  # fmt: skip
    for launch in launches:
        rows = slice(launch.row_start, launch.row_start + launch.rows)
        args = (x.a[rows], *pointers, x.y[rows], np.int32(launch.rows), *fixed, np.int32(launch.k_split),
                np.int32(launch.flags))  # fmt: skip
        module.get_function(launch.kernel)(launch.grid, (THREADS,), args, stream=stream)


_DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}
_ALGO_CODES = {"auto": 0, "simt": 1, "mma": 2}
_library_fn: Any = None


def _library_entry() -> Any:
    """``onnx_nf4_cuda_matmul`` of the compiled library (see custom_ops/src/cuda_op.cc), loaded once."""
    global _library_fn
    if _library_fn is None:
        from ..runtime.library import custom_op_library

        path = custom_op_library()
        try:
            fn = ctypes.CDLL(path).onnx_nf4_cuda_matmul
        except AttributeError as err:
            raise RuntimeError(f"{path} was built without CUDA (no onnx_nf4_cuda_matmul)") from err
        ptr, i64 = ctypes.c_void_p, ctypes.c_int64
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ptr, ptr, ptr, ctypes.c_int, ptr, ptr, ptr, ptr, ptr,
                       i64, i64, i64, i64, i64, ptr, ctypes.c_char_p, ctypes.c_size_t]  # fmt: skip
        fn.restype = ctypes.c_int
        _library_fn = fn
    return _library_fn


def _launch_library(
    dtype: DType, x: _Operands, K: int, N: int, block_size: int, nbs: int, algo: Algo, stream: Any
) -> None:
    fn = _library_entry()
    err = ctypes.create_string_buffer(512)

    def ptr(v: Any) -> int | None:
        return None if v is None else int(v.data.ptr)

    dq = x.absmax.dtype == np.uint8
    rc = fn(_DTYPE_CODES[dtype], _ALGO_CODES[algo], ptr(x.a), ptr(x.b), ptr(x.absmax), int(dq), ptr(x.nested_absmax),
            ptr(x.nested_code), ptr(x.absmax_offset), ptr(x.bias), ptr(x.y), int(x.a.shape[0]), K, N, block_size, nbs,
            int(stream.ptr) or None, err, len(err))  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"MatMulNF4: {err.value.decode(errors='replace')}")


class MatMulNF4(reference.MatMulNF4):
    """``onnx_nf4::MatMulNF4`` for ``onnx.reference.ReferenceEvaluator(model, new_ops=[MatMulNF4])``, on the GPU.

    Inputs and outputs are numpy arrays (as everywhere in the reference evaluator; bfloat16 as ``ml_dtypes``). The
    weight inputs (all but ``A``) are copied to the device on first use and kept for later runs of the same node,
    keyed by the identity of the numpy array (initializers are constant).
    """

    def _device(self, cupy: Any, x: Any) -> Any:
        if x is None:
            return None
        cache: dict[int, tuple[Any, Any]] = self.__dict__.setdefault("_device_cache", {})
        hit = cache.get(id(x))
        if hit is not None and hit[0] is x:
            return hit[1]
        device = cupy.asarray(_storage(np.asarray(x)))
        cache[id(x)] = (x, device)  # holding x keeps its id from being reused
        return device

    def _compute(self, A, weights: tuple, **attributes: int) -> np.ndarray:
        A = np.asarray(A)
        dtype = _dtype_name(A.dtype)
        # Checked on the numpy dtypes: on the device bfloat16 is held as uint16, which a uint16 bias would pass.
        arrays = [A, *(None if v is None else np.asarray(v) for v in weights)]
        check_inputs(Attributes.create(**attributes), [reference.tensor_info(x) for x in arrays])
        cupy = _cupy()
        on_device = [self._device(cupy, v) for v in weights]
        y = _matmul(cupy, cupy.asarray(_storage(A)), dtype, *on_device, **attributes)
        return cupy.asnumpy(y).view(A.dtype)


def _storage(x: np.ndarray) -> np.ndarray:
    """A numpy bfloat16 array (``ml_dtypes``) as its uint16 bit patterns, which CuPy can hold; others unchanged."""
    return x.view(np.uint16) if str(x.dtype) == "bfloat16" else x
