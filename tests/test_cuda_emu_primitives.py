"""The CUDA emulation's single instructions and its error reports, each alone (``custom_ops/cuda/emu``).

The fragments of ``mma.m16n8k16`` and ``ldmatrix.x4`` are built here from the PTX ISA's *forward* formulas
(groupID / threadID_in_group: which matrix element a lane's register holds), while the emulator reads the layouts
as CUTLASS's (thread, value) -> index maps: an emulator that shared a misreading with the kernels would fail here
against a plain matrix product. The probes call the ``.cu``'s own wrappers (``mma16816``, ``ldmatrix_x4``,
``f32_to_f16_bits``, ...). Misuse (partial masks, divergent barriers, lanes leaving a collective, a deadlock,
misaligned or out-of-buffer loads) must come back as an error, never a hang; a shared-memory race must show as
different results under the two schedules.
"""

from __future__ import annotations

import ctypes
import subprocess
from collections import defaultdict

import ml_dtypes
import numpy as np
import pytest
from cuda_emu import emulator

STATIC_SHARED_LIMIT = 48 * 1024  # bytes of static __shared__ memory per kernel


@pytest.fixture(scope="module")
def emu():
    e = emulator()
    e.reset()
    return e


def _err() -> ctypes.Array:
    return ctypes.create_string_buffer(512)


def _ptr(x: np.ndarray) -> int:
    return x.ctypes.data


# PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type" (.f16 / .bf16 A and B, .f32 C and D).
def _a_element(lane: int, i: int) -> tuple[int, int]:
    """(row, col) of element a_i (i in 0..7; register i // 2, half i % 2) of lane in the 16 x 16 A."""
    group, tig = lane >> 2, lane % 4
    row = group if (i < 2 or 4 <= i < 6) else group + 8
    col = tig * 2 + (i & 1) + (8 if i >= 4 else 0)
    return row, col


def _b_element(lane: int, i: int) -> tuple[int, int]:
    """(row, col) of element b_i (i in 0..3) of lane in the 16 x 8 B."""
    group, tig = lane >> 2, lane % 4
    return tig * 2 + (i & 1) + (8 if i >= 2 else 0), group


def _c_element(lane: int, i: int) -> tuple[int, int]:
    """(row, col) of element c_i / d_i (i in 0..3) of lane in the 16 x 8 C and D."""
    group, tig = lane >> 2, lane % 4
    return group + (8 if i >= 2 else 0), tig * 2 + (i & 1)


def _pack_pairs(bits: np.ndarray) -> np.ndarray:
    """[..., 2k] uint16 -> [..., k] uint32, element 2j in the low half."""
    return bits[..., 0::2].astype(np.uint32) | (bits[..., 1::2].astype(np.uint32) << 16)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("values", ["integers", "normal"])
def test_mma_fragments_against_a_matrix_product(emu, dtype, values):
    rng = np.random.default_rng(7)
    np_type = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    if values == "integers":  # every product and sum exact: the result is known to the bit
        a = rng.integers(-16, 17, (16, 16)).astype(np_type)
        b = rng.integers(-16, 17, (16, 8)).astype(np_type)
        c = rng.integers(-64, 65, (16, 8)).astype(np.float32)
    else:
        a = rng.standard_normal((16, 16)).astype(np_type)
        b = rng.standard_normal((16, 8)).astype(np_type)
        c = rng.standard_normal((16, 8)).astype(np.float32)
    a_bits, b_bits = a.view(np.uint16), b.view(np.uint16)
    a_frag = np.zeros((32, 8), np.uint16)
    b_frag = np.zeros((32, 4), np.uint16)
    c_frag = np.zeros((32, 4), np.float32)
    for lane in range(32):
        for i in range(8):
            a_frag[lane, i] = a_bits[_a_element(lane, i)]
        for i in range(4):
            b_frag[lane, i] = b_bits[_b_element(lane, i)]
            c_frag[lane, i] = c[_c_element(lane, i)]
    a_regs, b_regs = _pack_pairs(a_frag), _pack_pairs(b_frag)
    d_frag = np.full((32, 4), np.nan, np.float32)
    err = _err()
    rc = emu.lib.emu_probe_mma(int(dtype == "bfloat16"), _ptr(a_regs), _ptr(b_regs), _ptr(c_frag), _ptr(d_frag), err,
                               len(err))  # fmt: skip
    assert rc == 0, err.value.decode()
    d = np.zeros((16, 8), np.float32)
    for lane in range(32):
        for i in range(4):
            d[_c_element(lane, i)] = d_frag[lane, i]
    want = a.astype(np.float64) @ b.astype(np.float64) + c.astype(np.float64)
    if values == "integers":
        assert np.array_equal(d, want.astype(np.float32))
    else:  # exact products, one rounding of the sum (the emulator's model of the tensor core)
        np.testing.assert_allclose(d, want, rtol=2.0**-23, atol=1e-6)


def test_ldmatrix_x4_fragments(emu):
    """PTX ISA, ldmatrix .m8n8 .x4 .b16: lanes 8i .. 8i + 7 address the rows of matrix i; register i of lane l holds
    row l // 4 of matrix i, elements 2 (l % 4) and 2 (l % 4) + 1 (the lower one in the low half)."""
    rng = np.random.default_rng(3)
    tile = rng.permutation(64 * 8).astype(np.uint16).reshape(64, 8)  # distinct values
    rows = rng.permutation(64)[:32].astype(np.int32)  # any rows of the shared tile, in any order
    out = np.zeros((32, 4), np.uint32)
    err = _err()
    assert emu.lib.emu_probe_ldmatrix(_ptr(tile), _ptr(rows), _ptr(out), err, len(err)) == 0, err.value.decode()
    for lane in range(32):
        for i in range(4):
            row = tile[rows[8 * i + lane // 4]]
            col = 2 * (lane % 4)
            assert out[lane, i] == int(row[col]) | (int(row[col + 1]) << 16), (lane, i)


def test_conversions_round_to_nearest_even(emu):
    f16_max, f16_tiny = 65504.0, 2.0**-24
    special = [0.0, -0.0, 1.0, -2.5, 1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-11 + 2**-20, f16_max, 65519.0, 65520.0,
               1e6, -1e6, f16_tiny, f16_tiny / 2, f16_tiny * 0.75, f16_tiny * 1.5, 2.0**-14, 2.0**-14 * (1 - 2**-11),
               1 + 2**-8, 1 + 3 * 2**-8, 3.0e38, -np.inf, np.inf, 1e-40]  # fmt: skip
    rng = np.random.default_rng(5)
    x = np.concatenate([np.array(special, np.float32), (rng.standard_normal(2000) * 10.0**rng.integers(-9, 6, 2000))
                        .astype(np.float32)])  # fmt: skip
    f16_bits, bf16_bits = np.zeros(x.size, np.uint16), np.zeros(x.size, np.uint16)
    back = np.zeros(x.size, np.float32)
    err = _err()
    rc = emu.lib.emu_probe_cvt(_ptr(x), _ptr(f16_bits), _ptr(bf16_bits), _ptr(back), x.size, err, len(err))
    assert rc == 0, err.value.decode()
    with np.errstate(over="ignore"):
        want_f16 = x.astype(np.float16)
    assert np.array_equal(f16_bits, want_f16.view(np.uint16))
    assert np.array_equal(bf16_bits, x.astype(ml_dtypes.bfloat16).view(np.uint16))
    assert np.array_equal(back, want_f16.astype(np.float32))


@pytest.mark.parametrize(
    ("kind", "threads", "message"),
    [
        (0, 32, "partial warp mask"),
        (1, 32, "mismatched warp collective"),
        (2, 32, "exited while other lanes of its warp wait"),
        (3, 64, "divergent __syncthreads"),
        (4, 64, "divergent __syncthreads"),
        (5, 32, "is not 16-byte aligned"),
        (6, 32, "outside every buffer of the launch"),
        (8, 64, "deadlock"),
    ],
)
def test_misuse_is_an_error_not_a_hang(emu, kind, threads, message):
    emu.reset()
    buffer = np.zeros(16, np.uint32)  # 64 bytes of global memory
    emu.add_buffer(_ptr(buffer), buffer.nbytes)
    out = np.zeros(threads, np.uint32)
    err = _err()
    rc = emu.lib.emu_probe_misuse(kind, threads, _ptr(buffer), _ptr(out), err, len(err))
    assert rc == 1 and message in err.value.decode(), err.value.decode()
    # The error is taken; the next launch runs normally.
    assert emu.lib.emu_probe_misuse(-1, threads, _ptr(buffer), _ptr(out), err, len(err)) == 0
    assert np.array_equal(out, np.arange(threads, dtype=np.uint32))


def test_a_race_shows_under_the_two_schedules(emu):
    """Threads write and read shared memory without a barrier: the result depends on the order the fibers run in,
    so the two schedules disagree (and the poisoned, never-written words show)."""
    outs = []
    for schedule in (0, 1):
        emu.reset(schedule=schedule)
        out = np.zeros(256, np.uint32)
        err = _err()
        assert emu.lib.emu_probe_misuse(7, 256, None, _ptr(out), err, len(err)) == 0, err.value.decode()
        outs.append(out)
    assert not np.array_equal(outs[0], outs[1])
    emu.reset()


def test_shared_memory_of_every_kernel_is_registered_and_fits(emu):
    """Every kernel's __shared__ arrays are known to the emulator (poisoned before each block, bounds of ldmatrix)
    and add up to at most 48 KiB of static shared memory per kernel."""
    names = list(emu.shared)
    demangled = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
    per_kernel: dict[str, int] = defaultdict(int)
    variables: dict[str, set[str]] = defaultdict(set)
    for name, line in zip(names, demangled.stdout.splitlines(), strict=True):
        function, _, variable = line.rpartition("::")
        kernel = function.removeprefix("void ").split("(")[0]
        per_kernel[kernel] += emu.shared[name]
        variables[kernel.split("<")[0]].add(variable)
    assert variables["onnx_nf4::gpu::nf4_gemv_simt"] == {"partial"}
    assert variables["onnx_nf4::gpu::nf4_gemv_mma"] == {"partial"}
    assert variables["onnx_nf4::gpu::nf4_gemm_mma"] == {"s_whi", "s_wlo", "s_act", "s_scale"}
    assert len([k for k in per_kernel if "emu_probe" not in k]) == 18  # 12 simt, 4 skinny mma, 2 tiled mma
    assert max(per_kernel.values()) <= STATIC_SHARED_LIMIT, per_kernel
