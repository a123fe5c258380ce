"""The CUDA source compiles for both of its compilers, and the library's CUDA entry point checks its arguments.

No GPU is needed. The full nvcc build (sm_80 + sm_90 + PTX, static runtime) is the CMake build of the library,
which runs whenever nvcc is found (``pip install .`` in CI); here:

* nvcc: the device code compiles to PTX and holds exactly the kernels the CuPy path names (skipped without nvcc);
* NVRTC: ``kernel_source()`` compiles as CuPy will compile it, for sm_80 and sm_90, with every name expression
  (skipped when no ``libnvrtc`` is found, e.g. without ``cupy-cuda13x`` / ``nvidia-cuda-nvrtc``);
* ``onnx_nf4_cuda_matmul`` of the compiled library rejects bad arguments before touching the device (skipped
  when the library is not built, or built without CUDA on a machine without nvcc).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from onnx_nf4.op import cupy_backend as cb

REPO = Path(__file__).resolve().parents[1]
CUDA_DIR = REPO / "custom_ops" / "cuda"
DTYPES = ("float32", "float16", "bfloat16")


def _nvcc() -> str | None:
    return shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)


def _all_kernel_names() -> set[str]:
    return {name for dtype in DTYPES for name in cb.kernel_names(dtype)}


@pytest.mark.slow
def test_nvcc_ptx_holds_exactly_the_named_kernels(tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        pytest.skip("c++filt not found")
    ptx = tmp_path / "k.ptx"
    cmd = [nvcc, "-std=c++17", "-ptx", "-arch=compute_80", "-I", str(REPO / "custom_ops" / "include"),
           "-I", str(CUDA_DIR), str(CUDA_DIR / cb.KERNEL_FILE), "-o", str(ptx)]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    entries = [line.split()[-1].rstrip("(") for line in ptx.read_text().splitlines() if ".entry " in line]
    demangled = subprocess.run([cxxfilt], input="\n".join(entries), capture_output=True, text=True, check=True)
    # "void onnx_nf4::gpu::nf4_gemv_simt<float, 1>(float const*, ...)" -> the template-id
    names = {line.removeprefix("void ").split("(")[0] for line in demangled.stdout.splitlines()}
    assert names == _all_kernel_names()


def _find_nvrtc() -> str | None:
    """A libnvrtc of CUDA 13 (CuPy's wheel dependency, the nvidia-cuda-nvrtc wheel, or a CUDA install)."""
    candidates = []
    for site in sys.path:
        candidates += glob.glob(os.path.join(site, "nvidia", "cu13", "lib", "libnvrtc.so.13"))
        candidates += glob.glob(os.path.join(site, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so.13"))
    candidates += glob.glob("/usr/local/cuda*/lib64/libnvrtc.so.13")
    found = ctypes.util.find_library("nvrtc")
    if found:
        candidates.append(found)
    return next((c for c in candidates if os.path.exists(c) or not os.path.isabs(c)), None)


class Nvrtc:
    """The few NVRTC calls needed to compile a program (ctypes; no GPU involved)."""

    def __init__(self, path: str):
        # libnvrtc loads its builtins library by name: load the one beside it first.
        for builtins in sorted(glob.glob(os.path.join(os.path.dirname(path), "libnvrtc-builtins.so.*"))):
            if ".alt." not in builtins:
                ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
        self.lib = ctypes.CDLL(path)

    def _ok(self, status: int, what: str) -> None:
        if status != 0:
            self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p
            raise RuntimeError(f"{what}: {self.lib.nvrtcGetErrorString(status).decode()}")

    def compile(self, source: str, names: list[str], options: list[str]) -> tuple[bool, str, dict[str, str]]:
        prog = ctypes.c_void_p()
        self._ok(
            self.lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"matmul_nf4.cu", 0, None, None),
            "nvrtcCreateProgram",
        )
        try:
            for name in names:
                self._ok(self.lib.nvrtcAddNameExpression(prog, name.encode()), "nvrtcAddNameExpression")
            opts = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
            status = self.lib.nvrtcCompileProgram(prog, len(options), opts)
            size = ctypes.c_size_t()
            self._ok(self.lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)), "nvrtcGetProgramLogSize")
            log = ctypes.create_string_buffer(size.value)
            self._ok(self.lib.nvrtcGetProgramLog(prog, log), "nvrtcGetProgramLog")
            lowered = {}
            if status == 0:
                for name in names:
                    out = ctypes.c_char_p()
                    self._ok(self.lib.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(out)), "lowered")
                    lowered[name] = out.value.decode()
            return status == 0, log.value.decode(errors="replace"), lowered
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(prog))


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_nvrtc_compiles_the_kernel_source(arch):
    path = _find_nvrtc()
    if path is None:
        pytest.skip("libnvrtc (CUDA 13) not found")
    names = sorted(_all_kernel_names())
    ok, log, lowered = Nvrtc(path).compile(cb.kernel_source(), names, ["-std=c++17", f"--gpu-architecture={arch}"])
    assert ok, log
    assert "warning" not in log.lower(), log
    assert set(lowered) == set(names)
    assert all(v.startswith("_ZN8onnx_nf43gpu") for v in lowered.values())


# ---------------------------------------------------------------------------------------------------------
# The library's test entry point, without a device
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def entry():
    from onnx_nf4.runtime import CustomOpLibraryNotFoundError

    try:
        return cb._library_entry()
    except CustomOpLibraryNotFoundError as exc:
        pytest.skip(str(exc))
    except RuntimeError as exc:
        if _nvcc() is not None and os.environ.get("ONNX_NF4_EXPECT_CUDA_LIBRARY") == "1":
            raise
        pytest.skip(str(exc))


ALIGNED = 0x10000  # a fake device address: never dereferenced, since every call below fails its checks first
NESTED = {"nested_absmax": ALIGNED, "nested_code": ALIGNED, "absmax_offset": ALIGNED}


def _call(entry, **overrides) -> tuple[int, str]:
    args = {"dtype": 1, "algo": 0, "A": ALIGNED, "B": ALIGNED, "absmax": ALIGNED, "absmax_is_codes": 0,
            "nested_absmax": None, "nested_code": None, "absmax_offset": None, "bias": None, "Y": ALIGNED,
            "M": 1, "K": 64, "N": 8, "block_size": 64, "nested_block_size": 256, "stream": None}  # fmt: skip
    args.update(overrides)
    err = ctypes.create_string_buffer(256)
    rc = entry(*args.values(), err, len(err))
    return rc, err.value.decode()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dtype": 3}, "dtype must be"),
        ({"algo": 3}, "algo must be"),
        ({"K": 0}, "K and N must be"),
        ({"N": 2**31}, "K and N must be"),
        ({"M": -1}, "M must be >= 0"),
        ({"block_size": 48}, "block_size must be a power of two"),
        ({"block_size": 8192}, "block_size must be a power of two"),
        ({"absmax": None}, "exactly one of absmax"),
        ({"absmax_is_codes": 1}, "needs nested_absmax, nested_code and absmax_offset"),
        ({"absmax_is_codes": 1, **NESTED, "nested_block_size": 100}, "nested_block_size must be"),
        ({"A": None}, "device pointers"),
        ({"B": ALIGNED + 4}, "B must be 8-byte aligned"),
        ({"A": ALIGNED + 1}, "aligned to their element size"),
        ({"dtype": 0, "Y": ALIGNED + 2}, "aligned to their element size"),
        ({"dtype": 0, "algo": 2}, "float16 or bfloat16 A only"),
    ],
)
def test_entry_point_rejects_bad_arguments(entry, overrides, message):
    rc, err = _call(entry, **overrides)
    assert rc == 1
    assert message in err


def test_entry_point_zero_rows_is_a_no_op(entry):
    assert _call(entry, M=0, A=None, Y=None) == (0, "")
