"""The CUDA kernels of ``matmul_nf4.cu`` executed on the CPU under the CUDA emulation, against the numpy reference.

No GPU is needed and nothing is skipped: the emulator (``custom_ops/cuda/emu``, built by ``tests/cuda_emu.py`` with
the host compiler) runs the real kernels and the real launcher ``LaunchMatMulNF4`` through the library's entry
point. For every call:

* the launches the C++ launcher made equal those of ``onnx_nf4.op.cupy_backend.plan_launches`` (kernel, grid, rows,
  k_split, load flags, row offsets of A and Y): the CuPy path and the library plan alike;
* ``Y`` is within the accuracy bound of tests/test_gpu_kernels.py of the numpy reference, every output is written
  (Y starts as NaN) and nothing outside the buffers is (guard bytes);
* a second run under the warp-serial schedule (blocks in reverse order, one warp at a time up to its next barrier,
  warps and lanes in a fresh order at every barrier and collective) gives the same bits;
* once more under the undefined-behaviour sanitizer (array bounds, misaligned vector accesses, integer overflow).

The matrix: tests/test_gpu_kernels.py's shapes x every kernel family forced in turn (float32 / float16 / bfloat16)
x a large and a small SM count (split-K on and off); M across the family thresholds; the unaligned load paths;
dry-run plans for sizes too large to run.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from cuda_emu import ITEMSIZE, UBSAN_FLAGS, MatmulRun, emulator, record_launches, run_matmul
from gpu_cases import CASES, KERNELS, assert_close, attrs, case_id, problem, weight_arrays

from onnx_nf4.op import cupy_backend as cb

SM_COUNTS = {"sm132": 132, "sm2": 2}  # an H100-sized GPU (k_split up to 8) and a tiny one (k_split mostly 1)


@pytest.fixture(scope="module")
def emu():
    return emulator()


def _check_plan(run: MatmulRun, dtype: str, algo: str, M: int, K: int, N: int, bs: int, sm_count: int) -> None:
    plan = cb.plan_launches(dtype, M, K, N, bs, algo=algo, sm_count=sm_count, a_ptr=run.a_ptr, b_ptr=run.b_ptr)
    _check_same_launches(run.launches, plan, dtype, K, N, bs, run.a_ptr, run.y_ptr)


def _check_same_launches(launches, plan, dtype: str, K: int, N: int, bs: int, a_ptr: int, y_ptr: int) -> None:
    assert len(launches) == len(plan)
    size = ITEMSIZE[dtype]
    for got, want in zip(launches, plan, strict=True):
        assert got.kernel == want.kernel
        assert got.grid == (*want.grid, 1) and got.block == (cb.THREADS, 1, 1)
        args = got.args
        assert (args["M"], args["k_split"], args["flags"]) == (want.rows, want.k_split, want.flags)
        assert args["A"] == a_ptr + want.row_start * K * size and args["Y"] == y_ptr + want.row_start * N * size
        assert (args["K"], args["N"]) == (K, N)
        assert (args["block_shift"], args["k_blocks"]) == (bs.bit_length() - 1, -(-K // bs))


def _run_twice(emu, q, a, bias, dtype: str, algo: str, sm_count: int, **kwargs) -> MatmulRun:
    """Runs the call under both schedules; checks errors, the plan and bit-identical outputs; returns the first."""
    at = attrs(q)
    runs = [
        run_matmul(emu, dtype, algo, a, weight_arrays(q), bias, **at, sm_count=sm_count, schedule=s, **kwargs)
        for s in (0, 1)
    ]
    M = int(np.prod(a.shape[:-1]))
    for run in runs:
        assert run.error == ""
        _check_plan(run, dtype, algo, M, q.K, q.N, q.block_size, sm_count)
    assert runs[0].y.tobytes() == runs[1].y.tobytes(), "the result depends on the schedule (a race)"
    return runs[0]


@pytest.mark.parametrize("sm", list(SM_COUNTS))
@pytest.mark.parametrize(("dtype", "algo"), KERNELS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_kernels_match_reference(emu, case, dtype, algo, sm):
    q, a, bias, ref = problem(case, dtype)
    run = _run_twice(emu, q, a, bias, dtype, algo, SM_COUNTS[sm])
    assert_close(run.y, ref, q, a, dtype)


@pytest.mark.parametrize(
    ("dtype", "M", "family"),
    [("float32", 128, "nf4_gemv_simt<float, 8>"), ("float16", 3, "nf4_gemv_mma<onnx_nf4::gpu::f16, 8>"),
     ("bfloat16", 128, "nf4_gemm_mma<onnx_nf4::gpu::bf16>")],
)  # fmt: skip
def test_auto_picks_a_kernel_per_dtype(emu, dtype, M, family):
    q, a, bias, ref = problem((1000, 33, 128, [M, 1000], False, True, True), dtype)
    run = _run_twice(emu, q, a, bias, dtype, "auto", 132)
    assert {launch.kernel for launch in run.launches} == {f"onnx_nf4::gpu::{family}"}
    assert_close(run.y, ref, q, a, dtype)


def test_the_matrix_reaches_every_k_split_and_kernel(emu):
    """The shapes above exercise split-K 1, 2, 4 and 8 and every kernel instantiation the launcher has."""
    seen_split, seen_kernel = set(), set()
    for case in CASES:
        K, N, bs, shape, dq = case[:5]
        M = int(np.prod(shape[:-1]))
        for dtype, algo in KERNELS:
            for sm_count in SM_COUNTS.values():
                for launch in record_launches(emu, dtype, algo, M=M, K=K, N=N, block_size=bs, sm_count=sm_count,
                                              a_ptr=1 << 16, b_ptr=1 << 16, double_quant=dq):  # fmt: skip
                    seen_split.add(launch.args["k_split"])
                    seen_kernel.add(launch.kernel)
    assert seen_split == {1, 2, 4, 8}
    all_kernels = {name for dtype in ("float32", "float16", "bfloat16") for name in cb.kernel_names(dtype)}
    # simt MT = 2 needs M = 2, which the shape matrix has only batched (2 x 3 = 6 rows): test_m_thresholds has it.
    assert all_kernels - seen_kernel <= {f"onnx_nf4::gpu::nf4_gemv_simt<{t}, 2>" for t in cb._CPP_TYPES.values()}


# M on both sides of every threshold: simt MT 1 / 2 / 4 / 8, mma MT 8 / 16, the tiled kernel above 32 (two row tiles
# of 64 at 65 and more); K = 200 is not a multiple of the block.
M_BY_FAMILY = {"simt": [1, 2, 3, 4, 5, 8, 9, 17], "mma": [1, 8, 9, 16, 17, 32, 33, 64, 65, 130]}


@pytest.mark.parametrize(("dtype", "algo"), KERNELS)
@pytest.mark.parametrize("dq", [False, True], ids=["absmax", "dq"])
def test_m_thresholds(emu, dtype, algo, dq):
    for M in M_BY_FAMILY[algo]:
        case = (200, 37, 64, [M, 200], dq, False, True)
        q, a, bias, ref = problem(case, dtype, seed=M)
        run = _run_twice(emu, q, a, bias, dtype, algo, 132)
        assert_close(run.y, ref, q, a, dtype)


@pytest.mark.parametrize(("dtype", "algo"), KERNELS)
@pytest.mark.parametrize(("a_misalign", "b_misalign"), [("elem", 0), (0, 8), ("elem", 8)])
@pytest.mark.parametrize("M", [5, 40])
def test_unaligned_buffers(emu, dtype, algo, a_misalign, b_misalign, M):
    """A at an element-aligned but not 16-byte aligned address and / or B 8-byte aligned: the scalar and 8-byte load
    paths (the launch flags say which, and must match the plan)."""
    a_off = ITEMSIZE[dtype] if a_misalign == "elem" else 0
    case = (256, 24, 32, [M, 256], False, False, True)
    q, a, bias, ref = problem(case, dtype)
    run = _run_twice(emu, q, a, bias, dtype, algo, 132, a_misalign=a_off, b_misalign=b_misalign)
    flags = run.launches[0].args["flags"]
    assert flags == (0 if b_misalign else 1) | (0 if a_off else 2)
    assert_close(run.y, ref, q, a, dtype)


@pytest.mark.parametrize(
    ("dtype", "algo", "M", "K", "N", "bs"),
    [
        ("float32", "auto", cb.MAX_ROW_TILES * 8 + 20, 64, 64, 64),  # two launches
        ("float16", "auto", 64 * cb.MAX_ROW_TILES + 1, 4096, 1000, 64),  # two launches of the tiled kernel
        ("bfloat16", "simt", 3, 100000, 3, 16),
        ("float16", "mma", 16, 8192, 28672, 64),
        ("float32", "simt", 1, 16384, 64, 64),
        ("bfloat16", "auto", 33, 4100, 777, 4096),
    ],
)
@pytest.mark.parametrize("sm_count", [1, 132])
@pytest.mark.parametrize(("a_ptr", "b_ptr"), [(0x10000, 0x10000), (0x10004, 0x10008)])
def test_launcher_and_plan_agree_on_large_sizes(emu, dtype, algo, M, K, N, bs, sm_count, a_ptr, b_ptr):
    launches = record_launches(emu, dtype, algo, M=M, K=K, N=N, block_size=bs, sm_count=sm_count, a_ptr=a_ptr,
                               b_ptr=b_ptr)  # fmt: skip
    plan = cb.plan_launches(dtype, M, K, N, bs, algo=algo, sm_count=sm_count, a_ptr=a_ptr, b_ptr=b_ptr)
    y_ptr = 1 << 20  # record_launches' fake Y
    _check_same_launches(launches, plan, dtype, K, N, bs, a_ptr, y_ptr)


def test_a_short_buffer_is_an_error_not_a_read(emu):
    """The emulator checks every ld.global.nc against the launch's buffers: B one 16-byte piece short fails."""
    q, a, bias, _ = problem(CASES[0], "float16")
    weights = weight_arrays(q)
    weights[0] = weights[0].reshape(-1)[:-16]
    run = run_matmul(emu, "float16", "simt", a, weights, bias, **attrs(q))
    assert run.y is None
    assert "CUDA kernel launch failed" in run.error and "outside every buffer of the launch" in run.error


@pytest.fixture(scope="module")
def ubsan_emu():
    return emulator(extra_flags=UBSAN_FLAGS)


def test_sanitizer_build_reports_undefined_behaviour(ubsan_emu, capfd):
    """The sanitizer build is live: a probe's signed overflow is reported on stderr."""
    ubsan_emu.reset()
    out = np.zeros(32, np.uint32)
    err = ctypes.create_string_buffer(256)
    assert ubsan_emu.lib.emu_probe_misuse(9, 32, None, out.ctypes.data, err, len(err)) == 0
    assert "signed integer overflow" in capfd.readouterr().err


@pytest.mark.parametrize(("dtype", "algo"), KERNELS)
def test_matrix_under_the_undefined_behaviour_sanitizer(ubsan_emu, capfd, dtype, algo):
    """The shape matrix once more (lockstep schedule, aligned and unaligned buffers) with every array index,
    vector access and integer operation of the kernels checked by UBSan: no report. The largest shape (20 M
    multiply-adds, no code path of its own) is left to the runs above."""
    for case in CASES:
        if case[0] * case[1] * int(np.prod(case[3][:-1])) > 10**7:
            continue
        q, a, bias, ref = problem(case, dtype)
        for a_off, b_off in ((0, 0), (ITEMSIZE[dtype], 8)):
            run = run_matmul(ubsan_emu, dtype, algo, a, weight_arrays(q), bias, **attrs(q), a_misalign=a_off,
                             b_misalign=b_off)  # fmt: skip
            assert run.error == ""
            assert_close(run.y, ref, q, a, dtype)
    assert "runtime error" not in capfd.readouterr().err
