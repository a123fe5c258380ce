"""The host side of the CuPy path (``onnx_nf4.op.cupy_backend``), without a GPU.

Covers what runs on the CPU: finding and preprocessing the kernel source, the launch plan, argument validation
and the marshalling of kernel arguments. The device is replaced by a stand-in CuPy module whose arrays are numpy
arrays (their ``data.ptr`` is the host address) and whose kernels only record their launches: the kernels
themselves run in tests/test_gpu_kernels.py, on a GPU.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pytest
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import onnx_nf4
from onnx_nf4.op import cupy_backend as cb

SM_COUNT = 132


# ---------------------------------------------------------------------------------------------------------
# Kernel source
# ---------------------------------------------------------------------------------------------------------


def test_kernel_source_inlines_the_codebook_header():
    src = cb.kernel_source()
    assert '#include "onnx_nf4/nf4_codebook.h"' not in src
    assert src.count("#define ONNX_NF4_CODEBOOK_VALUES") == 1
    # The table is defined before the kernels use it, and the host code is hidden from NVRTC.
    assert src.index("#define ONNX_NF4_CODEBOOK_VALUES") < src.rindex("c_nf4[ONNX_NF4_NUM_CODES]")
    host = src.index("#ifndef __CUDACC_RTC__\n#include <cuda_runtime.h>")
    assert src.index("std::string LaunchMatMulNF4") > src.index("#ifndef __CUDACC_RTC__\n// ---", host)


def test_kernel_source_prefers_the_installed_copy(tmp_path, monkeypatch):
    kernels = tmp_path / "kernels"
    kernels.mkdir()
    (kernels / cb.KERNEL_FILE).write_text('// installed\n#include "onnx_nf4/nf4_codebook.h"\nint k;\n')
    (kernels / cb.CODEBOOK_HEADER).write_text("#define TABLE 1\n")
    monkeypatch.setattr(cb, "_PACKAGE_DIR", tmp_path)
    assert cb.kernel_source() == "// installed\n#define TABLE 1\n\nint k;\n"


def test_kernel_source_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(cb, "_PACKAGE_DIR", tmp_path)
    monkeypatch.setattr(cb, "_REPO_DIR", tmp_path)
    with pytest.raises(cb.KernelSourceNotFoundError, match=r"matmul_nf4\.cu"):
        cb.kernel_source()


@pytest.mark.parametrize("includes", [0, 2])
def test_kernel_source_needs_exactly_one_include(tmp_path, monkeypatch, includes):
    kernels = tmp_path / "kernels"
    kernels.mkdir()
    (kernels / cb.KERNEL_FILE).write_text('#include "onnx_nf4/nf4_codebook.h"\n' * includes)
    (kernels / cb.CODEBOOK_HEADER).write_text("")
    monkeypatch.setattr(cb, "_PACKAGE_DIR", tmp_path)
    with pytest.raises(ValueError, match=f"exactly once, found {includes}"):
        cb.kernel_source()


def test_kernel_names_are_instantiable_template_ids():
    src = cb.kernel_source()
    assert cb.kernel_names("float32") == [f"onnx_nf4::gpu::nf4_gemv_simt<float, {mt}>" for mt in (1, 2, 4, 8)]
    for dtype, cpp in (("float16", "f16"), ("bfloat16", "bf16")):
        names = cb.kernel_names(dtype)
        assert len(names) == 7
        assert names[-3:-1] == [f"onnx_nf4::gpu::nf4_gemv_mma<onnx_nf4::gpu::{cpp}, {mt}>" for mt in (8, 16)]
        assert names[-1] == f"onnx_nf4::gpu::nf4_gemm_mma<onnx_nf4::gpu::{cpp}>"
        assert f"struct {cpp} {{" in src
    assert "nf4_gemv_simt(" in src and "nf4_gemv_mma(" in src and "nf4_gemm_mma(" in src


# ---------------------------------------------------------------------------------------------------------
# Launch plan
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "algo", "M", "family", "mt"),
    [
        ("float32", "auto", 1, "simt", 1),
        ("float32", "auto", 2, "simt", 2),
        ("float32", "auto", 3, "simt", 4),
        ("float32", "auto", 5, "simt", 8),
        ("float32", "auto", 2048, "simt", 8),
        ("float16", "auto", 1, "mma", 8),
        ("float16", "auto", 8, "mma", 8),
        ("float16", "auto", 9, "mma", 16),
        ("float16", "auto", 32, "mma", 16),
        ("bfloat16", "simt", 4, "simt", 4),
        ("float16", "mma", 1, "mma", 8),
    ],
)
def test_plan_kernel_choice(dtype, algo, M, family, mt):
    """Skinny kernels: CUDA cores for float32, tensor cores for 16-bit A up to M = 32."""
    (launch,) = cb.plan_launches(dtype, M, 4096, 4096, 64, algo=algo, sm_count=SM_COUNT)
    assert launch.kernel == f"onnx_nf4::gpu::nf4_gemv_{family}<{cb._CPP_TYPES[dtype]}, {mt}>"
    assert launch.kernel in cb.kernel_names(dtype)
    assert (launch.row_start, launch.rows) == (0, M)
    assert launch.grid[1] == -(-M // mt)


@pytest.mark.parametrize(("dtype", "M"), [("float16", 33), ("bfloat16", 2048), ("float16", 64 * 65535 + 1)])
def test_plan_large_m_uses_the_tiled_kernel(dtype, M):
    launches = cb.plan_launches(dtype, M, 4096, 1000, 64, sm_count=SM_COUNT)
    assert {x.kernel for x in launches} == {f"onnx_nf4::gpu::nf4_gemm_mma<{cb._CPP_TYPES[dtype]}>"}
    assert all(x.k_split == 1 and x.grid[0] == 8 for x in launches)  # ceil(1000 / 128) column tiles
    assert [x.grid[1] for x in launches] == [-(-x.rows // cb.TILE_M) for x in launches]
    assert sum(x.rows for x in launches) == M and launches[-1].row_start + launches[-1].rows == M


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize(
    ("M", "K", "N", "bs"),
    [(1, 4096, 4096, 64), (1, 14336, 4096, 64), (16, 8192, 28672, 64), (1, 64, 1, 64), (3, 40, 5, 64),
     (20, 4096, 14336, 128), (1, 100000, 3, 16)],
)  # fmt: skip
def test_plan_grid_covers_every_output(dtype, M, K, N, bs):
    (launch,) = cb.plan_launches(dtype, M, K, N, bs, sm_count=SM_COUNT)
    ks = launch.k_split
    assert ks in (1, 2, 4, 8)
    unit = 16 if "mma" in launch.kernel else 1  # output columns per warp group
    assert launch.grid[0] * (cb.WARPS // ks) * unit >= N
    assert (launch.grid[0] - 1) * (cb.WARPS // ks) * unit < N  # no CTA without work
    row_bytes = -(-K // bs) * bs // 2
    pieces = -(-row_bytes // 16)
    stretches = -(-row_bytes // 64) if unit == 16 else -(-pieces // 32)
    assert ks == 1 or ks <= stretches  # every warp of a unit has work


def test_plan_splits_k_only_when_outputs_are_few():
    wide = cb.plan_launches("float32", 1, 4096, 28672, 64, sm_count=SM_COUNT)[0]
    narrow = cb.plan_launches("float32", 1, 16384, 64, 64, sm_count=SM_COUNT)[0]
    short = cb.plan_launches("float32", 1, 4096, 64, 64, sm_count=SM_COUNT)[0]
    assert wide.k_split == 1
    assert narrow.k_split == 8
    assert short.k_split == 4  # 128 pieces of 16 bytes: 4 stretches of 32 lanes


def test_plan_flags_follow_alignment():
    def flags(K, bs, a_ptr, b_ptr, dtype="float16"):
        return cb.plan_launches(dtype, 1, K, 64, bs, sm_count=SM_COUNT, a_ptr=a_ptr, b_ptr=b_ptr)[0].flags

    assert flags(4096, 64, 0, 0) == 3
    assert flags(4096, 64, 8, 0) == 1  # A not 16-byte aligned
    assert flags(4096, 64, 0, 8) == 2  # B not 16-byte aligned
    assert flags(4100, 64, 0, 0) == 1  # K * 2 bytes not a multiple of 16
    assert flags(4100, 64, 0, 0, dtype="float32") == 3  # K * 4 bytes is
    assert flags(48, 16, 0, 0) == 2  # 3 blocks of 8 bytes: rows of 24 bytes


def test_plan_splits_huge_m_into_launches():
    M = cb.MAX_ROW_TILES * 8 + 20
    launches = cb.plan_launches("float32", M, 64, 64, 64, sm_count=SM_COUNT)
    assert [(x.row_start, x.rows, x.grid[1]) for x in launches] == [
        (0, cb.MAX_ROW_TILES * 8, cb.MAX_ROW_TILES),
        (cb.MAX_ROW_TILES * 8, 20, 3),
    ]
    assert cb.plan_launches("float32", 0, 64, 64, 64, sm_count=SM_COUNT) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dtype": "float64"}, "unsupported activation dtype"),
        ({"algo": "fast"}, "algo must be"),
        ({"algo": "mma"}, "float16 or bfloat16 A only"),
        ({"block_size": 48}, "power of two"),
        ({"block_size": 8192}, "power of two"),
        ({"K": 0}, "out of range"),
        ({"M": -1}, "out of range"),
    ],
)
def test_plan_rejects(kwargs, match):
    args = {"dtype": "float32", "M": 1, "K": 64, "N": 8, "block_size": 64} | kwargs
    algo = args.pop("algo", "auto")
    with pytest.raises(ValueError, match=match):
        cb.plan_launches(**args, algo=algo, sm_count=SM_COUNT)


# ---------------------------------------------------------------------------------------------------------
# Validation and argument marshalling, with a stand-in CuPy
# ---------------------------------------------------------------------------------------------------------


class HostArray(np.ndarray):
    """A numpy array posing as a CuPy one: ``data.ptr`` is its address."""

    @property
    def data(self):  # type: ignore[override]
        return SimpleNamespace(ptr=self.ctypes.data)


def _host(x) -> HostArray:
    return np.asarray(x).view(HostArray)


class FakeCupy:
    """The parts of CuPy that onnx_nf4.op.cupy_backend uses; kernels record their launches instead of running."""

    ndarray = HostArray

    def __init__(self, compute_capability: str = "90"):
        self.launches: list[tuple[str, tuple, tuple, tuple]] = []
        self.uploads: list[tuple[int, ...]] = []  # shapes of the host-to-device copies (asarray)
        self.modules: list[dict] = []
        fake = self

        class RawModule:
            def __init__(self, code, options, name_expressions):
                fake.modules.append({"code": code, "options": options, "names": list(name_expressions)})
                self.names = set(name_expressions)

            def get_function(self, name):
                assert name in self.names

                def launch(grid, block, args, stream=None):
                    fake.launches.append((name, grid, block, args))

                return launch

        self.RawModule = RawModule
        device = SimpleNamespace(id=0, compute_capability=compute_capability, attributes={"MultiProcessorCount": 4})
        self.cuda = SimpleNamespace(Device=lambda: device, get_current_stream=lambda: SimpleNamespace(ptr=0))

    @staticmethod
    def ascontiguousarray(x):
        return _host(np.ascontiguousarray(x))

    @staticmethod
    def empty(shape, dtype):
        return _host(np.empty(shape, dtype))

    def asarray(self, x):
        self.uploads.append(np.shape(x))
        return _host(np.array(x))

    @staticmethod
    def asnumpy(x):
        return np.asarray(x).view(np.ndarray)

    @staticmethod
    def from_dlpack(x):
        return _host(np.from_dlpack(x))


@pytest.fixture
def fake_cupy(monkeypatch):
    fake = FakeCupy()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(cb, "_modules", {})
    monkeypatch.setattr(cb, "_sm_counts", {})
    return fake


def _weight(K=100, N=24, bs=32, double_quant=False, seed=0):
    w = (np.random.default_rng(seed).standard_normal((K, N)) * 0.05).astype(np.float32)
    return onnx_nf4.quantize_weight(w, bs, double_quant=double_quant)


def _inputs(q: onnx_nf4.QuantizedWeight):
    if q.nested is None:
        return [_host(q.packed), _host(q.absmax)]
    nested = q.nested
    return [_host(q.packed), _host(q.absmax), _host(nested.nested_absmax), _host(nested.code),
            _host(np.asarray(nested.offset, np.float32))]  # fmt: skip


def _attrs(q):
    return {"K": q.K, "N": q.N, "block_size": q.block_size}


def test_launch_arguments_follow_the_kernel_signature(fake_cupy):
    q = _weight(double_quant=True)
    a = _host(np.ones((2, 3, q.K), np.float16))
    bias = _host(np.arange(q.N, dtype=np.float16))
    y = cb.matmul_nf4(a, *_inputs(q), bias, **_attrs(q))
    assert y.shape == (2, 3, q.N) and y.dtype == np.float16
    (module,) = fake_cupy.modules
    assert module["names"] == cb.kernel_names("float16")
    assert module["code"] == cb.kernel_source()
    (launch,) = fake_cupy.launches
    name, grid, block, args = launch
    assert name == "onnx_nf4::gpu::nf4_gemv_mma<onnx_nf4::gpu::f16, 8>"
    assert block == (cb.THREADS,)
    (a_arg, b_arg, absmax_f32, codes, nested_absmax, nested_code, offset, bias_arg, y_arg, *ints) = args
    assert a_arg.shape == (6, q.K) and np.shares_memory(a_arg, a)
    assert b_arg.shape == q.packed.shape and codes.dtype == np.uint8
    assert absmax_f32 == 0  # a null pointer: double quantization
    assert nested_absmax.shape == q.nested.nested_absmax.shape and nested_code.shape == (256,)
    assert offset.size == 1 and bias_arg is not None and np.shares_memory(y_arg, y)
    assert all(isinstance(v, np.int32) for v in ints)
    M, K, N, block_shift, k_blocks, nested_shift, k_split, flags = (int(v) for v in ints)
    assert (M, K, N, block_shift, k_blocks, nested_shift) == (6, q.K, q.N, 5, 4, 8)
    plan = cb.plan_launches("float16", 6, q.K, q.N, 32, sm_count=4, a_ptr=a_arg.data.ptr, b_ptr=b_arg.data.ptr)
    assert (grid, k_split, flags) == (plan[0].grid, plan[0].k_split, plan[0].flags)


def test_float_absmax_passes_null_nested_pointers(fake_cupy):
    q = _weight()
    cb.matmul_nf4(_host(np.ones((1, q.K), np.float32)), *_inputs(q), **_attrs(q), algo="simt")
    (name, _, _, args) = fake_cupy.launches[0]
    assert name == "onnx_nf4::gpu::nf4_gemv_simt<float, 1>"
    assert args[2].dtype == np.float32 and all(v == 0 for v in args[3:8])


def test_out_is_written_in_place(fake_cupy):
    q = _weight()
    out = _host(np.empty((3, q.N), np.float16))
    y = cb.matmul_nf4(_host(np.ones((3, q.K), np.float16)), *_inputs(q), **_attrs(q), out=out)
    assert y is out and fake_cupy.launches[0][3][8].data.ptr == out.data.ptr


def test_zero_rows_launch_nothing(fake_cupy):
    q = _weight()
    y = cb.matmul_nf4(_host(np.ones((0, q.K), np.float32)), *_inputs(q), **_attrs(q))
    assert y.shape == (0, q.N) and not fake_cupy.launches and not fake_cupy.modules


def test_misaligned_inputs_are_copied_aligned(fake_cupy):
    q = _weight(K=128, bs=64)
    raw = np.zeros(8 * q.K * 4 + 8, np.uint8)
    a = _host(raw[8 : 8 + 8 * q.K * 4].view(np.float32).reshape(8, q.K))  # 8-byte aligned at best
    if a.ctypes.data % 16 == 0:
        a = _host(raw[4 : 4 + 8 * q.K * 4].view(np.float32).reshape(8, q.K))
    cb.matmul_nf4(a, *_inputs(q), **_attrs(q))
    args = fake_cupy.launches[0][3]
    assert args[0].data.ptr % 16 == 0 and int(args[-1]) & 2  # 16-byte loads of A are allowed


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda i: i.update(K=99), ValueError, "last dimension of 'A' is 100, but K=99"),
        (lambda i: i.update(block_size=48), ValueError, "power of two"),
        (lambda i: i.update(B=i["B"][:, :, :8]), ValueError, "input 'B' has shape"),
        (lambda i: i.update(B=i["B"].view(np.int8)), ValueError, "'B' has dtype int8, expected uint8"),
        (lambda i: i.update(absmax=i["absmax"][:-1]), ValueError, "input 'absmax' has shape"),
        (lambda i: i.update(absmax=i["absmax"].astype(np.float16)), ValueError, "float32 or uint8"),
        (lambda i: i.update(nested_code=_host(np.zeros(256, np.float32))), ValueError, "nested inputs must be omitted"),
        (lambda i: i.update(bias=_host(np.zeros(24, np.float16))), ValueError, "'bias' has dtype float16"),
        (lambda i: i.update(bias=_host(np.zeros(23, np.float32))), ValueError, "'bias' has shape"),
        (lambda i: i.update(A=_host(np.ones((2, 100), np.float64))), TypeError, "dtype float64"),
        (lambda i: i.update(A=np.ones((2, 100), np.float32).tolist()), TypeError, "not a device array"),
        (lambda i: i.update(algo="mma"), ValueError, "float16 or bfloat16 A only"),
        (lambda i: i.update(backend="cpu"), ValueError, "backend must be"),
        (lambda i: i.update(out=_host(np.empty((2, 23), np.float32))), ValueError, "out must be float32 of shape"),
        (lambda i: i.update(out=_host(np.empty((24, 2), np.float32)).T), ValueError, "C-contiguous"),
        (lambda i: i.update(bfloat16=True), TypeError, "uint16 or int16 bit patterns"),
    ],
)
def test_bad_inputs_are_rejected_before_launch(fake_cupy, change, error, match):
    q = _weight()
    inputs = {"A": _host(np.ones((2, 100), np.float32)), "B": _host(q.packed), "absmax": _host(q.absmax), **_attrs(q)}
    change(inputs)
    with pytest.raises(error, match=match):
        cb.matmul_nf4(**inputs)
    assert not fake_cupy.launches


def test_double_quant_inputs_are_checked(fake_cupy):
    q = _weight(double_quant=True)
    packed, codes, nested_absmax, code, offset = _inputs(q)
    a = _host(np.ones((1, q.K), np.float32))
    with pytest.raises(ValueError, match="missing"):
        cb.matmul_nf4(a, packed, codes, nested_absmax, code, **_attrs(q))
    with pytest.raises(ValueError, match="'nested_absmax' has shape"):
        cb.matmul_nf4(a, packed, codes, nested_absmax[:0], code, offset, **_attrs(q))
    with pytest.raises(ValueError, match="'nested_code' has shape"):
        cb.matmul_nf4(a, packed, codes, nested_absmax, code[:255], offset, **_attrs(q))
    with pytest.raises(ValueError, match="expected float32"):
        cb.matmul_nf4(a, packed, codes, nested_absmax.astype(np.float16), code, offset, **_attrs(q))
    with pytest.raises(ValueError, match="nested_block_size"):
        cb.matmul_nf4(a, packed, codes, nested_absmax, code, offset, **_attrs(q), nested_block_size=100)
    assert not fake_cupy.launches


def test_old_gpu_is_rejected(monkeypatch):
    fake = FakeCupy(compute_capability="75")
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(cb, "_modules", {})
    q = _weight()
    with pytest.raises(RuntimeError, match=r"compute capability >= 8.0, device 0 has 7.5"):
        cb.matmul_nf4(_host(np.ones((1, q.K), np.float32)), *_inputs(q), **_attrs(q))


def test_without_cupy_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    q = _weight()
    with pytest.raises(ImportError, match=r"onnx_nf4\[cupy\]"):
        cb.matmul_nf4(np.ones((1, q.K), np.float32), q.packed, q.absmax, **_attrs(q))


def test_torch_cpu_tensor_is_rejected(fake_cupy):
    torch = pytest.importorskip("torch")
    q = _weight()
    with pytest.raises(TypeError, match="CPU tensor"):
        cb.matmul_nf4(torch.ones(1, q.K), _host(q.packed), _host(q.absmax), **_attrs(q))


def test_dlpack_producers_are_accepted(fake_cupy):
    class Producer:  # any object with __dlpack__ (here backed by a numpy array)
        def __init__(self, x):
            self.x = x

        def __dlpack__(self, **kwargs):
            return self.x.__dlpack__(**kwargs)

        def __dlpack_device__(self):
            return self.x.__dlpack_device__()

    q = _weight()
    y = cb.matmul_nf4(Producer(np.ones((1, q.K), np.float32)), Producer(q.packed), Producer(q.absmax), **_attrs(q))
    assert y.shape == (1, q.N) and len(fake_cupy.launches) == 1


def _node_model(q: onnx_nf4.QuantizedWeight, elem: int):
    inits = [numpy_helper.from_array(q.packed, "B"), numpy_helper.from_array(q.absmax, "absmax")]
    node = helper.make_node("MatMulNF4", ["A", "B", "absmax"], ["Y"], domain="onnx_nf4", **_attrs(q))
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("A", elem, [None, q.K])],
        [helper.make_tensor_value_info("Y", elem, None)], inits,
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("onnx_nf4", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def test_reference_evaluator_op_copies_weights_once(fake_cupy):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    q = _weight()
    session = ReferenceEvaluator(_node_model(q, 16), new_ops=[cb.MatMulNF4])  # 16: bfloat16
    a = np.ones((2, q.K), ml_dtypes.bfloat16)
    for _ in range(2):
        (y,) = session.run(None, {"A": a})
        assert y.shape == (2, q.N) and y.dtype == ml_dtypes.bfloat16
    first, second = fake_cupy.launches
    assert first[0] == "onnx_nf4::gpu::nf4_gemv_mma<onnx_nf4::gpu::bf16, 8>"
    assert first[3][0].dtype == np.uint16  # bfloat16 travels as its bit patterns
    assert first[3][1].data.ptr == second[3][1].data.ptr
    # Copies: B and absmax once, A per run.
    assert fake_cupy.uploads == [q.packed.shape, q.absmax.shape, a.shape, a.shape]


def test_reference_evaluator_op_checks_dtypes_before_they_become_bit_patterns(fake_cupy):
    """A uint16 bias beside a bfloat16 A would pass once both are uint16 on the device: refused on the host."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    q = _weight()
    a = np.ones((2, q.K), ml_dtypes.bfloat16)
    weights = (q.packed, q.absmax, None, None, None, np.zeros(q.N, np.uint16))
    with pytest.raises(TypeError, match="input 'bias' has dtype uint16, expected bfloat16"):
        cb.MatMulNF4._compute(None, a, weights, **_attrs(q))
    assert not fake_cupy.launches
