"""Builds and drives the CUDA emulation of ``matmul_nf4.cu`` (``custom_ops/cuda/emu``; docs/gpu.md, "Emulation").

The emulator is one C++ translation unit (``emu_main.cc``, which includes the real ``matmul_nf4.cu``) compiled by the
host compiler (``$CXX`` or ``g++``) into a shared library, loaded with ctypes. The library is cached in the system
temporary directory under a hash of its sources, flags and compiler, so a test session compiles it at most once.

* :func:`emulator`: the emulator of the source tree (or of a patched copy of the ``.cu``: the mutation tests);
* :class:`DeviceMemory`: host arrays standing for device buffers, placed at a chosen misalignment between guard
  bytes that a launch must leave intact;
* :func:`run_matmul`: one ``MatMulNF4`` call through the library's entry point (``LaunchMatMulNF4`` plans and
  launches, the emulator runs the kernels), returning ``Y`` and the launches the launcher made;
* :class:`EmulatedCupy`: the parts of CuPy that ``onnx_nf4.op.cupy_backend`` uses, on host memory, whose
  ``RawModule`` kernels (and the library entry point of ``backend="library"``) the emulator runs.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CUDA_DIR = REPO / "custom_ops" / "cuda"
EMU_DIR = CUDA_DIR / "emu"
INCLUDE_DIR = REPO / "custom_ops" / "include"
KERNEL_FILE = "matmul_nf4.cu"
#: -O1: the emulated suite is dominated by fiber switches and checks, not by code quality; one TU compiles in
#: seconds. -ffp-contract=off: float32 expressions round as written (nvcc's own contraction is not emulated).
CXXFLAGS = ("-std=c++17", "-O1", "-ffp-contract=off", "-fPIC", "-shared", "-DONNX_NF4_CUDA_EMU", "-Wall",
            "-Wno-unknown-pragmas")  # fmt: skip
#: The undefined-behaviour sanitizer (array bounds of local and __shared__ arrays, misaligned vector accesses,
#: signed overflow, shifts); reports go to stderr and the run goes on (the tests read stderr).
UBSAN_FLAGS = ("-fsanitize=undefined", "-fno-omit-frame-pointer")
SHARED_PREFIX = "_ZZN8onnx_nf43gpu"  # mangled prefix of the function-local statics (__shared__) of onnx_nf4::gpu
DATA_SYMBOL_TYPES = frozenset("uBbVvDd")  # nm's letters for objects (function-local statics: "u" or "b")
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}
ALGO_CODES = {"auto": 0, "simt": 1, "mma": 2}
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
#: The kernels' parameters after grid and block, in order (matmul_nf4.cu).
KERNEL_PARAMS = ("A", "B", "absmax", "absmax_codes", "nested_absmax", "nested_code", "absmax_offset", "bias", "Y",
                 "M", "K", "N", "block_shift", "k_blocks", "nested_shift", "k_split", "flags")  # fmt: skip


class EmulationBuildError(RuntimeError):
    """The host compiler is missing or rejected the emulator."""


def compiler() -> str:
    """The host C++ compiler: ``$CXX``, else ``g++``, else ``c++``."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise EmulationBuildError("no C++ compiler found (set CXX or install g++): the CUDA emulation needs one")
    return cxx


def _sources(kernel_dir: Path) -> list[Path]:
    return [
        *sorted(EMU_DIR.glob("*.h")),
        EMU_DIR / "emu_main.cc",
        kernel_dir / KERNEL_FILE,
        CUDA_DIR / "matmul_nf4_cuda.h",
        INCLUDE_DIR / "onnx_nf4" / "nf4_codebook.h",
    ]


def build(kernel_dir: Path = CUDA_DIR, extra_flags: tuple[str, ...] = ()) -> Path:
    """Compiles the emulator with ``kernel_dir/matmul_nf4.cu`` and ``extra_flags`` (e.g. :data:`UBSAN_FLAGS`),
    cached by content; returns the shared library."""
    cxx = compiler()
    flags = (*CXXFLAGS, *extra_flags)
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
    digest = hashlib.sha256("\0".join([cxx, version, *flags]).encode())
    for source in _sources(kernel_dir):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    out_dir = Path(tempfile.gettempdir()) / "onnx_nf4_cuda_emu" / digest.hexdigest()[:24]
    lib = out_dir / "libonnx_nf4_cuda_emu.so"
    if lib.is_file():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / f".build-{os.getpid()}.so"
    cmd = [cxx, *flags, "-I", str(EMU_DIR), "-I", str(kernel_dir), "-I", str(CUDA_DIR), "-I", str(INCLUDE_DIR),
           str(EMU_DIR / "emu_main.cc"), "-o", str(partial)]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise EmulationBuildError(f"{' '.join(cmd)}\n{run.stderr[-4000:]}")
    os.replace(partial, lib)
    return lib


@dataclass(frozen=True)
class RecordedLaunch:
    """One kernel launch as the emulator saw it: template-id, grid, block and the arguments by name."""

    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    args: dict[str, int]


class Emulator:
    """The ctypes face of one emulator library (see ``custom_ops/cuda/emu/emu_main.cc`` for the entry points)."""

    def __init__(self, path: Path):
        self.path = path
        lib = self.lib = ctypes.CDLL(str(path))
        ptr, i64, size, char_p = ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t, ctypes.c_char_p
        lib.emu_reset.argtypes = []
        lib.emu_configure.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.emu_add_buffer.argtypes = [ptr, size]
        lib.emu_add_shared.argtypes = [ptr, size]
        lib.emu_launch_count.restype = ctypes.c_int
        lib.emu_launch_info.argtypes = [ctypes.c_int, char_p, size, ctypes.POINTER(i64), ctypes.c_int]
        lib.emu_launch_info.restype = ctypes.c_int
        lib.emu_stats.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint64)]
        lib.onnx_nf4_cuda_matmul.argtypes = [ctypes.c_int, ctypes.c_int, ptr, ptr, ptr, ctypes.c_int, ptr, ptr, ptr,
                                             ptr, ptr, i64, i64, i64, i64, i64, ptr, char_p, size]  # fmt: skip
        lib.onnx_nf4_cuda_matmul.restype = ctypes.c_int
        lib.emu_launch_kernel.argtypes = [char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ptr, char_p, size]
        lib.emu_launch_kernel.restype = ctypes.c_int
        lib.emu_probe_mma.argtypes = [ctypes.c_int, ptr, ptr, ptr, ptr, char_p, size]
        lib.emu_probe_ldmatrix.argtypes = [ptr, ptr, ptr, char_p, size]
        lib.emu_probe_cvt.argtypes = [ptr, ptr, ptr, ptr, ctypes.c_int, char_p, size]
        lib.emu_probe_misuse.argtypes = [ctypes.c_int, ctypes.c_int, ptr, ptr, char_p, size]
        self.shared = self._register_shared()

    def _register_shared(self) -> dict[str, int]:
        """Registers every ``__shared__`` variable of the kernels (function-local statics in ``onnx_nf4::gpu``,
        found in the library's symbol table); returns their mangled names and sizes."""
        nm = shutil.which("nm")
        if nm is None:
            raise EmulationBuildError("nm (binutils) not found: the emulator needs it to find __shared__ variables")
        out = subprocess.run([nm, "--defined-only", "-S", str(self.path)], capture_output=True, text=True,
                             check=True).stdout  # fmt: skip
        symbols = [line.split() for line in out.splitlines()]
        # The load address: where the exported emu_reset is, less its offset in the file.
        (reset,) = [int(f[0], 16) for f in symbols if f[-1] == "emu_reset"]
        base = ctypes.cast(self.lib.emu_reset, ctypes.c_void_p).value - reset
        shared = {}
        for fields in symbols:
            # Data symbols only: the local lambdas of the kernels share the prefix.
            if len(fields) == 4 and fields[2] in DATA_SYMBOL_TYPES and fields[3].startswith(SHARED_PREFIX):
                name, nbytes = fields[3], int(fields[1], 16)
                self.lib.emu_add_shared(base + int(fields[0], 16), nbytes)
                shared[name] = nbytes
        return shared

    def reset(self, *, sm_count: int = 132, schedule: int = 0, dry_run: bool = False) -> None:
        """Forgets buffers, launches and errors; sets what the device reports and the schedule (0 or 1)."""
        self.lib.emu_reset()
        self.lib.emu_configure(sm_count, schedule, int(dry_run))

    def add_buffer(self, address: int, nbytes: int) -> None:
        self.lib.emu_add_buffer(address, nbytes)

    def launches(self) -> list[RecordedLaunch]:
        records = []
        for i in range(self.lib.emu_launch_count()):
            name = ctypes.create_string_buffer(512)
            values = (ctypes.c_int64 * 64)()
            n = self.lib.emu_launch_info(i, name, len(name), values, 64)
            v = list(values[:n])
            args = dict(zip(KERNEL_PARAMS, v[6:], strict=False)) if len(v) - 6 == len(KERNEL_PARAMS) else {}
            records.append(RecordedLaunch(name.value.decode(), tuple(v[0:3]), tuple(v[3:6]), args))
        return records

    def stats(self) -> tuple[int, int]:
        """Completed warp collectives and fiber switches since the last reset."""
        c, s = ctypes.c_uint64(), ctypes.c_uint64()
        self.lib.emu_stats(ctypes.byref(c), ctypes.byref(s))
        return c.value, s.value


@functools.cache
def emulator(kernel_dir: Path = CUDA_DIR, extra_flags: tuple[str, ...] = ()) -> Emulator:
    """The emulator of ``kernel_dir/matmul_nf4.cu``, built and loaded once per process."""
    return Emulator(build(kernel_dir, extra_flags))


class DeviceMemory:
    """Host arrays standing for device buffers.

    Each buffer starts ``misalign`` bytes past a 64-byte boundary and lies between ``GUARD`` bytes of a known
    pattern on both sides; :meth:`check_guards` fails when a launch wrote outside its buffers.
    """

    GUARD = 64
    PATTERN = 0xA5

    def __init__(self) -> None:
        self._blocks: list[tuple[np.ndarray, int, int]] = []  # (storage, start, nbytes)

    def put(self, data: np.ndarray | None, misalign: int = 0, fill: int | None = None) -> int | None:
        """Copies ``data`` (C order) into a new buffer and returns its address (``None`` for ``None``); with
        ``fill`` the buffer is ``data``'s size filled with that byte instead (an output)."""
        if data is None:
            return None
        raw_bytes = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        nbytes = raw_bytes.size
        storage = np.full(nbytes + 2 * self.GUARD + 128, self.PATTERN, np.uint8)
        base = storage.ctypes.data
        start = self.GUARD + (-(base + self.GUARD)) % 64 + misalign
        storage[start : start + nbytes] = raw_bytes if fill is None else fill
        self._blocks.append((storage, start, nbytes))
        return base + start

    def buffers(self) -> list[tuple[int, int]]:
        """(address, bytes) of every buffer."""
        return [(s.ctypes.data + start, n) for s, start, n in self._blocks]

    def read(self, address: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        for storage, start, nbytes in self._blocks:
            if storage.ctypes.data + start == address:
                return storage[start : start + nbytes].copy().view(dtype).reshape(shape)
        raise KeyError(hex(address))

    def check_guards(self) -> None:
        for storage, start, nbytes in self._blocks:
            before, after = storage[:start], storage[start + nbytes :]
            assert (before == self.PATTERN).all() and (after == self.PATTERN).all(), "a launch wrote outside a buffer"


@dataclass(frozen=True)
class MatmulRun:
    """The outcome of :func:`run_matmul`."""

    y: np.ndarray | None  # None when the call failed
    error: str
    launches: list[RecordedLaunch]
    a_ptr: int
    b_ptr: int
    y_ptr: int


def run_matmul(
    emu: Emulator,
    dtype: str,
    algo: str,
    a: np.ndarray,
    weights: list[np.ndarray | None],
    bias: np.ndarray | None,
    *,
    K: int,
    N: int,
    block_size: int,
    nested_block_size: int,
    sm_count: int = 132,
    schedule: int = 0,
    a_misalign: int = 0,
    b_misalign: int = 0,
) -> MatmulRun:
    """``Y = A @ W (+ bias)`` through the emulated library entry point; ``weights`` as
    :func:`gpu_cases.weight_arrays` gives them. ``Y`` starts as 0xff bytes (NaN), so unwritten outputs show."""
    emu.reset(sm_count=sm_count, schedule=schedule)
    mem = DeviceMemory()
    M = int(np.prod(a.shape[:-1]))
    packed, absmax, nested_absmax, nested_code, offset = weights
    a_ptr = mem.put(a, a_misalign)
    b_ptr = mem.put(packed, b_misalign)
    ptrs = [mem.put(x) for x in (absmax, nested_absmax, nested_code, offset, bias)]
    y_shape = (*a.shape[:-1], N)
    y_ptr = mem.put(np.empty(y_shape, a.dtype), fill=0xFF)
    for address, nbytes in mem.buffers():
        emu.add_buffer(address, nbytes)
    err = ctypes.create_string_buffer(1024)
    dq = absmax is not None and absmax.dtype == np.uint8
    rc = emu.lib.onnx_nf4_cuda_matmul(DTYPE_CODES[dtype], ALGO_CODES[algo], a_ptr, b_ptr, ptrs[0], int(dq), ptrs[1],
                                      ptrs[2], ptrs[3], ptrs[4], y_ptr, M, K, N, block_size, nested_block_size, None,
                                      err, len(err))  # fmt: skip
    mem.check_guards()
    y = mem.read(y_ptr, a.dtype, y_shape) if rc == 0 else None
    return MatmulRun(y, err.value.decode(errors="replace"), emu.launches(), a_ptr, b_ptr, y_ptr)


def record_launches(
    emu: Emulator,
    dtype: str,
    algo: str,
    *,
    M: int,
    K: int,
    N: int,
    block_size: int,
    sm_count: int,
    a_ptr: int,
    b_ptr: int,
    double_quant: bool = False,
) -> list[RecordedLaunch]:
    """The launches ``LaunchMatMulNF4`` makes for these sizes and (fake, never read) addresses, without running
    them (the emulator's dry run): any M, however large."""
    emu.reset(sm_count=sm_count, dry_run=True)
    fake = 1 << 20  # 256-byte aligned, never dereferenced
    err = ctypes.create_string_buffer(1024)
    nested = (fake, fake, fake) if double_quant else (None, None, None)
    rc = emu.lib.onnx_nf4_cuda_matmul(DTYPE_CODES[dtype], ALGO_CODES[algo], a_ptr, b_ptr, fake, int(double_quant),
                                      *nested, None, fake, M, K, N, block_size, 256, None, err, len(err))  # fmt: skip
    assert rc == 0, err.value.decode()
    return emu.launches()


class HostArray(np.ndarray):
    """A numpy array posing as a CuPy one: ``data.ptr`` is its address."""

    @property
    def data(self):  # type: ignore[override]
        return SimpleNamespace(ptr=self.ctypes.data)


def host(x) -> HostArray:
    return np.asarray(x).view(HostArray)


class EmulatedCupy:
    """The parts of CuPy that ``onnx_nf4.op.cupy_backend`` uses, on host memory; the kernels of its ``RawModule``
    run in the emulator (each launch with exactly its array arguments as global memory), and :meth:`library_entry`
    stands in for the compiled library's ``onnx_nf4_cuda_matmul``. ``kernels`` lists the launched template-ids."""

    ndarray = HostArray

    def __init__(self, emu: Emulator, *, sm_count: int = 132, schedule: int = 0):
        self.emu, self.sm_count, self.schedule = emu, sm_count, schedule
        self.kernels: list[str] = []
        outer = self

        class RawModule:
            def __init__(self, code: str, options: tuple, name_expressions: list[str]):
                self.names = set(name_expressions)

            def get_function(self, name: str):
                assert name in self.names, name
                return lambda grid, block, args, stream=None: outer._launch(name, grid, block, args)

        self.RawModule = RawModule
        device = SimpleNamespace(id=0, compute_capability="90", attributes={"MultiProcessorCount": sm_count})
        self.cuda = SimpleNamespace(Device=lambda: device, get_current_stream=lambda: SimpleNamespace(ptr=0))

    def _launch(self, name: str, grid: tuple, block: tuple, args: tuple) -> None:
        self.emu.reset(sm_count=self.sm_count, schedule=self.schedule)
        values: list[ctypes.c_uint64 | ctypes.c_int32] = []
        for arg in args:
            if isinstance(arg, np.ndarray):
                self.emu.add_buffer(arg.ctypes.data, arg.nbytes)
                values.append(ctypes.c_uint64(arg.ctypes.data))
            elif isinstance(arg, np.uint64):
                values.append(ctypes.c_uint64(int(arg)))
            else:
                assert isinstance(arg, np.int32), type(arg)
                values.append(ctypes.c_int32(int(arg)))
        pointers = (ctypes.c_void_p * len(values))(*(ctypes.addressof(v) for v in values))
        err = ctypes.create_string_buffer(1024)
        if self.emu.lib.emu_launch_kernel(name.encode(), grid[0], grid[1], block[0], pointers, err, len(err)):
            raise RuntimeError(err.value.decode(errors="replace"))
        self.kernels.append(name)

    def library_entry(self):
        """``onnx_nf4_cuda_matmul`` of the emulator, with the extents of its operands registered as global memory
        (computed from the sizes, as the op's contract gives them)."""
        lib = self.emu.lib

        def entry(dtype, algo, a, b, absmax, is_codes, nested_absmax, nested_code, offset, bias, y, M, K, N, bs, nbs,
                  stream, err, err_len):  # fmt: skip
            self.emu.reset(sm_count=self.sm_count, schedule=self.schedule)
            item = 4 if dtype == 0 else 2
            blocks = N * -(-K // bs)
            extents = [(a, M * K * item), (b, blocks * bs // 2), (absmax, blocks * (1 if is_codes else 4)),
                       (nested_absmax, -(-blocks // nbs) * 4), (nested_code, 256 * 4), (offset, 4), (bias, N * item),
                       (y, M * N * item)]  # fmt: skip
            for address, nbytes in extents:
                if address:
                    self.emu.add_buffer(address, nbytes)
            rc = lib.onnx_nf4_cuda_matmul(dtype, algo, a, b, absmax, is_codes, nested_absmax, nested_code, offset,
                                          bias, y, M, K, N, bs, nbs, stream, err, err_len)  # fmt: skip
            self.kernels += [launch.kernel for launch in self.emu.launches()]
            return rc

        return entry

    @staticmethod
    def ascontiguousarray(x):
        return host(np.ascontiguousarray(x))

    @staticmethod
    def empty(shape, dtype):
        return host(np.empty(shape, dtype))

    @staticmethod
    def asarray(x):
        return host(np.array(x))

    @staticmethod
    def asnumpy(x):
        return np.asarray(x).view(np.ndarray)
