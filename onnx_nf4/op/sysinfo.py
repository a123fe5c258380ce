"""What this installation runs on: versions, the custom-op library, the CPU kernel set it chose, CUDA support.

:func:`info` gathers it as a :class:`SystemInfo`; ``onnx-nf4 info`` prints it (``--json`` for a machine-readable
form). Nothing here needs onnxruntime: without it, its fields say so.

The CPU kernel set is the one ``MatMulNF4`` runs in this process, as the library names it through its exported C
function ``const char* OnnxNF4CpuKernelSet(void)`` (``"avx512"``, ``"avx2"``, ``"portable"``, ...). The library
chooses once per process, from the CPU's features capped by the environment variable ``ONNX_NF4_CPU_ISA``, so the
answer holds for every session of the process and for another process with the same ``ONNX_NF4_CPU_ISA``.
"""

from __future__ import annotations

import ctypes
import os
import platform
from dataclasses import dataclass

from ..runtime.library import CustomOpLibraryNotFoundError, custom_op_library

__all__ = [
    "CPU_ISA_ENV_VAR",
    "CUDA_ENTRY_POINT",
    "KERNEL_SET_FUNCTION",
    "RELEVANT_CPU_FEATURES",
    "UNKNOWN",
    "SystemInfo",
    "format_info",
    "info",
    "query_library",
]

#: The environment variable that caps the CPU kernel set (``portable``, ``avx2``, ``avx512``; see docs/cpu_kernel.md).
CPU_ISA_ENV_VAR = "ONNX_NF4_CPU_ISA"
#: The library's C function naming the chosen CPU kernel set: ``const char* OnnxNF4CpuKernelSet(void)``.
KERNEL_SET_FUNCTION = "OnnxNF4CpuKernelSet"
#: A symbol only a library built with its CUDA kernels exports (custom_ops/src/cuda_op.cc).
CUDA_ENTRY_POINT = "onnx_nf4_cuda_matmul"
#: What a field says when the library cannot tell (not found, not loadable, or too old to have the function).
UNKNOWN = "unknown"

#: The CPU features the kernel choice depends on, in ``/proc/cpuinfo`` spelling, with numpy's name of each (the
#: fallback where there is no ``/proc/cpuinfo``; numpy has no name for AVX-VNNI).
RELEVANT_CPU_FEATURES: dict[str, str | None] = {
    "avx2": "AVX2",
    "fma": "FMA3",
    "f16c": "F16C",
    "avx_vnni": None,
    "avx512f": "AVX512F",
    "avx512bw": "AVX512BW",
    "avx512vl": "AVX512VL",
    "avx512dq": "AVX512DQ",
    "avx512_vnni": "AVX512VNNI",
    "avx512_bf16": "AVX512BF16",
}


@dataclass(frozen=True)
class SystemInfo:
    """Versions and capabilities of this ``onnx_nf4`` installation (:func:`info`).

    Attributes:
        onnx_nf4_version: the package's version.
        python_version: the interpreter's version, e.g. ``"3.11.7"``.
        numpy_version, onnx_version: versions of these dependencies.
        onnxruntime_version: ``None`` when onnxruntime is not installed.
        onnxruntime_providers: onnxruntime's available execution providers (empty without onnxruntime).
        library_path: absolute path of the custom-op library; ``None`` when it is not found.
        library_error: why the library could not be found or loaded; ``None`` when it was.
        cpu_kernel_set: the CPU kernel set ``MatMulNF4`` runs in this process, or ``"unknown"``.
        cpu_isa_env: the value of ``ONNX_NF4_CPU_ISA`` (``None`` when unset).
        cpu_features: the CPU features of :data:`RELEVANT_CPU_FEATURES` that this CPU has.
        cuda_kernels: whether the library holds its CUDA kernels; ``None`` when the library is not loaded.
    """

    onnx_nf4_version: str
    python_version: str
    numpy_version: str
    onnx_version: str
    onnxruntime_version: str | None
    onnxruntime_providers: tuple[str, ...]
    library_path: str | None
    library_error: str | None
    cpu_kernel_set: str
    cpu_isa_env: str | None
    cpu_features: tuple[str, ...]
    cuda_kernels: bool | None


def _onnxruntime() -> tuple[str | None, tuple[str, ...]]:
    try:
        import onnxruntime as ort
    except ImportError:
        return None, ()
    return ort.__version__, tuple(ort.get_available_providers())


def _cpu_features() -> tuple[str, ...]:
    """The :data:`RELEVANT_CPU_FEATURES` this CPU has: from ``/proc/cpuinfo`` (Linux), else from numpy."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        flags = None
    if flags is not None:
        present = set(flags)
        return tuple(name for name in RELEVANT_CPU_FEATURES if name in present)
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as numpy_features
    except ImportError:
        return ()
    return tuple(name for name, np_name in RELEVANT_CPU_FEATURES.items() if np_name and numpy_features.get(np_name))


def query_library(path: str) -> tuple[str, bool]:
    """``(cpu_kernel_set, cuda_kernels)`` of the library at ``path``, loaded with ctypes into this process.

    ``cpu_kernel_set`` is ``"unknown"`` for a library without :data:`KERNEL_SET_FUNCTION`.

    Raises:
        OSError: the library cannot be loaded.
    """
    library = ctypes.CDLL(path)
    cuda = hasattr(library, CUDA_ENTRY_POINT)
    try:
        function = getattr(library, KERNEL_SET_FUNCTION)
    except AttributeError:
        return UNKNOWN, cuda
    function.argtypes = []
    function.restype = ctypes.c_char_p
    name = function()
    return (name.decode() if name else UNKNOWN), cuda


def info() -> SystemInfo:
    """Versions, the custom-op library's path, the CPU kernel set chosen, CPU features and CUDA support.

    Loads the library (with ctypes) into this process when it is found; never raises for a missing or broken
    library or a missing onnxruntime: the fields say so.
    """
    import numpy
    import onnx

    from ..version import __version__

    ort_version, providers = _onnxruntime()
    path: str | None = None
    error: str | None = None
    kernel_set, cuda = UNKNOWN, None
    try:
        path = custom_op_library()
        kernel_set, cuda = query_library(path)
    except (CustomOpLibraryNotFoundError, OSError) as err:
        error = str(err)
    return SystemInfo(
        onnx_nf4_version=__version__,
        python_version=platform.python_version(),
        numpy_version=numpy.__version__,
        onnx_version=onnx.__version__,
        onnxruntime_version=ort_version,
        onnxruntime_providers=providers,
        library_path=path,
        library_error=error,
        cpu_kernel_set=kernel_set,
        cpu_isa_env=os.environ.get(CPU_ISA_ENV_VAR),
        cpu_features=_cpu_features(),
        cuda_kernels=cuda,
    )


def format_info(system: SystemInfo) -> str:
    """``system`` as aligned ``name: value`` lines (the output of ``onnx-nf4 info``)."""
    if system.library_path is None:
        library = f"not found ({system.library_error})"
    elif system.library_error is not None:
        library = f"{system.library_path} (cannot be loaded: {system.library_error})"
    else:
        library = system.library_path
    kernel_set = system.cpu_kernel_set
    if kernel_set == UNKNOWN and system.library_error is None:
        kernel_set += f" (the library has no {KERNEL_SET_FUNCTION}: built before it existed)"
    cuda = {None: UNKNOWN, True: f"yes ({CUDA_ENTRY_POINT})", False: "no (CPU-only build)"}[system.cuda_kernels]
    ort = system.onnxruntime_version or "not installed"
    if system.onnxruntime_providers:
        ort += f" ({', '.join(system.onnxruntime_providers)})"
    rows = [
        ("onnx_nf4", system.onnx_nf4_version),
        ("python", system.python_version),
        ("numpy", system.numpy_version),
        ("onnx", system.onnx_version),
        ("onnxruntime", ort),
        ("library", library),
        ("CPU kernel set", kernel_set),
        (CPU_ISA_ENV_VAR, system.cpu_isa_env if system.cpu_isa_env is not None else "(not set)"),
        ("CPU features", " ".join(system.cpu_features) or "(none of them)"),
        ("CUDA kernels", cuda),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name + ':':<{width + 1}} {value}" for name, value in rows)
