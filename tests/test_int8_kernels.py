"""``accuracy_level = 4`` (int8 activations, integer dot products) of the C++ ``MatMulNF4`` CPU op, on every
kernel set this CPU runs, and the exported ``OnnxNF4CpuKernelSet``.

The int8 algorithm is exact in its integer part, so every kernel set must give the same result as a numpy
emulation of it (``int8_emulation``: per (row, block) ``s_a = max|a| / 127``, ``q_a = round_half_even(a / s_a)``,
the weight codes through ``NF4_CODE_I8``, exact integer block sums scaled by ``s_w * s_a / 127``) up to the
float32 rounding of the scaling and of the sum over blocks. That covers every row-count path (weight streaming
for few rows, the packed-panel GEMM from 8 rows on the SIMD sets), block sizes from 16 to 4096, K not a multiple
of the block, double quantization, bias, all-zero blocks and one or two threads. The extra error of the mode
against the float32 reference is bounded per block size for normal and outlier activations (the figures of
docs/cpu_kernel.md).
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from models import reference_matmul

import onnx_nf4
from onnx_nf4.codec.blockwise import unpack_nibbles
from onnx_nf4.codec.codebook import NF4_CODE_I8, NF4_I8_LEVELS
from onnx_nf4.runtime import CustomOpLibraryNotFoundError, custom_op_library

ort = pytest.importorskip("onnxruntime")
try:
    custom_op_library()
except CustomOpLibraryNotFoundError as exc:  # pragma: no cover - depends on the build
    pytest.skip(str(exc), allow_module_level=True)

import test_cpu_op as cpu_op  # noqa: E402  (after the library check: it skips the same way)

KERNEL_SETS = ["avx512", "avx2vnni", "avx2", "portable"]  # ONNX_NF4_CPU_ISA values, most capable first
F32_EPS = float(np.finfo(np.float32).eps)

# (K, N, block_size, M, double_quant, zero_blocks, bias, threads): M < 8 streams the weight, M >= 8 packs panels
CASES = [
    (512, 37, 64, 1, False, False, False, 1),
    (300, 45, 64, 1, True, True, True, 2),  # one row: a lone, padded last block of 64 (AVX-512: 128-code steps)
    (1000, 33, 256, 1, False, True, True, 1),  # one row, blocks of 256, the last one padded
    (4096, 20, 128, 1, True, False, False, 2),  # one row, blocks of 128
    (300, 45, 64, 3, True, True, True, 2),
    (4096, 20, 128, 2, False, False, True, 1),  # long blocks: two accumulators per row
    (256, 33, 32, 7, False, False, False, 2),
    (96, 20, 16, 2, True, False, False, 1),  # block 16: below every SIMD decode step
    (72, 50, 16, 9, False, True, True, 2),
    (520, 30, 4096, 5, False, False, False, 1),  # one block, K < block size
    (520, 30, 4096, 12, True, False, True, 2),
    (1000, 70, 128, 8, False, False, False, 2),
    (1000, 70, 128, 16, True, True, True, 1),
    (300, 25, 32, 17, False, False, True, 2),
    (640, 26, 512, 40, False, False, False, 1),
    (2048, 17, 1024, 33, False, True, False, 2),
    (384, 130, 64, 130, True, False, True, 2),  # several row tiles, several column tasks
    (4000, 24, 256, 20, False, False, False, 1),  # K walked in chunks, K % block != 0
]


def case_inputs(K, N, bs, M, double_quant, zero_blocks, bias, threads, seed=0):
    """The weight, activations (with a few outliers) and bias of one case, the same in every process."""
    q = cpu_op.make_case(K, N, bs, double_quant=double_quant, zero_blocks=zero_blocks, seed=K + M + seed)
    rng = np.random.default_rng(K * M + seed)
    a = rng.standard_normal((M, K)).astype(np.float32)
    a[rng.random((M, K)) < 0.01] *= 20.0
    if M > 2:
        a[1] = 0.0  # an all-zero row: every block scale 0
    b = rng.standard_normal(N).astype(np.float32) if bias else None
    return q, a, b


def int8_emulation(q: onnx_nf4.QuantizedWeight, a: np.ndarray, bias: np.ndarray | None):
    """``(y, magnitude)`` of accuracy_level 4 in float64: ``y`` the exact result of the int8 algorithm,
    ``magnitude`` per output the sum over blocks of ``|s_w s_a| (|dot| + 128 |sum q_a|) / 127`` (+ |bias|),
    the scale of the float32 roundings a kernel may add (a kernel may carry 128 * sum q_a through float32)."""
    K, N, bs, kb = q.K, q.N, q.block_size, q.k_blocks
    kpad = kb * bs
    M = a.shape[0]
    codes = unpack_nibbles(q.packed, N * kpad).astype(np.int64)  # [N * kpad], high nibble = even k
    w8 = NF4_CODE_I8.astype(np.int64)[codes].reshape(N, kb, bs)
    ap = np.zeros((M, kpad), np.float32)
    ap[:, :K] = a
    blocks = ap.reshape(M, kb, bs)
    amax = np.abs(blocks).max(axis=2)  # float32
    with np.errstate(divide="ignore", over="ignore"):
        inv = (np.float32(NF4_I8_LEVELS) / amax).astype(np.float32)
    inv = np.where(np.isfinite(inv), inv, np.float32(0))  # all-zero and tiny-maximum blocks: zeros
    qa = np.clip(np.rint(blocks * inv[..., None]), -127, 127).astype(np.int64)  # float32 product, half-even
    sa = (amax / np.float32(NF4_I8_LEVELS)).astype(np.float64)  # [M, kb]
    sw = q.float_absmax().astype(np.float64)  # [N, kb]
    dot = np.einsum("mbk,nbk->mnb", qa, w8)  # exact
    f = sa[:, None, :] * sw[None, :, :]  # [M, N, kb]
    y = (dot * f).sum(axis=2) / NF4_I8_LEVELS
    magnitude = (np.abs(f) * (np.abs(dot) + 128 * np.abs(qa.sum(axis=2))[:, None, :])).sum(axis=2) / NF4_I8_LEVELS
    if bias is not None:
        y = y + bias
        magnitude = magnitude + np.abs(bias)
    return y, magnitude


def kernel_set_name() -> str:
    lib = ctypes.CDLL(custom_op_library())
    lib.OnnxNF4CpuKernelSet.restype = ctypes.c_char_p
    return lib.OnnxNF4CpuKernelSet().decode()


WORKER = r"""
import json, sys
import numpy as np
sys.path.insert(0, {tests_dir!r})
import test_int8_kernels as t
out = {{}}
for i, case in enumerate(t.CASES):
    q, a, bias = t.case_inputs(*case)
    model = t.cpu_op.nf4_node_model(q, ["M", q.K], bias=bias, accuracy_level=4)
    out[f"y{{i}}"] = t.cpu_op.run_op(model, a, threads=case[-1])
np.savez({out_path!r}, **out)
print(json.dumps(t.kernel_set_name()))
"""


def run_worker(isa: str, tmp_path: Path) -> tuple[str, dict[str, np.ndarray]]:
    out_path = tmp_path / f"{isa}.npz"
    script = WORKER.format(tests_dir=str(Path(__file__).resolve().parent), out_path=str(out_path))
    env = dict(os.environ, ONNX_NF4_CPU_ISA=isa)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    name = json.loads(proc.stdout.strip().splitlines()[-1])
    with np.load(out_path) as data:
        return name, dict(data)


def test_kernel_set_name_is_exported():
    assert kernel_set_name() in KERNEL_SETS


def kernel_set_name_under(cap: str | None) -> str:
    """The kernel set a fresh process chooses with ONNX_NF4_CPU_ISA=cap (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k != "ONNX_NF4_CPU_ISA"}
    if cap is not None:
        env["ONNX_NF4_CPU_ISA"] = cap
    tests_dir = str(Path(__file__).resolve().parent)
    script = f"import sys; sys.path.insert(0, {tests_dir!r}); import test_int8_kernels as t; print(t.kernel_set_name())"
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def test_kernel_set_name_follows_the_cap():
    best = kernel_set_name_under(None)
    assert best in KERNEL_SETS
    assert kernel_set_name_under("portable") == "portable"
    assert kernel_set_name_under("no-such-set") == best  # an unknown value is ignored
    below = KERNEL_SETS[KERNEL_SETS.index(best) :]
    for cap in KERNEL_SETS:  # a cap above the best set gives the best; at or below it, a set at or below the cap
        name = kernel_set_name_under(cap)
        assert name in below and KERNEL_SETS.index(name) >= KERNEL_SETS.index(cap)


@pytest.mark.parametrize("isa", KERNEL_SETS)
def test_every_kernel_set_matches_the_int8_emulation(isa, tmp_path):
    """Each kernel set gives the int8 algorithm's exact result up to float32 rounding of its scaling."""
    name, outputs = run_worker(isa, tmp_path)
    if name != isa:
        pytest.skip(f"this CPU does not run the {isa} kernels (chosen: {name})")
    for i, case in enumerate(CASES):
        q, a, bias = case_inputs(*case)
        y = outputs[f"y{i}"].astype(np.float64)
        ref, magnitude = int8_emulation(q, a, bias)
        tol = (2 * q.k_blocks + 16) * F32_EPS * magnitude + 1e-30
        err = np.abs(y - ref)
        assert (err <= tol).all(), f"case {case}: worst ratio to tolerance {(err / tol).max():.2f}"
        if case[3] > 2:
            row = ref[1] if bias is None else ref[1] - bias
            assert np.all(row == 0)  # the all-zero row: exactly the bias


# Documented bounds (docs/cpu_kernel.md) of ||y - y_ref|| / ||y_ref|| against the float32 reference, K = 4096,
# N = 256; "outliers": 1% of the activations scaled by 20.
ERROR_BOUNDS = {16: (9e-3, 1.2e-2), 32: (1.0e-2, 1.5e-2), 64: (1.1e-2, 2.0e-2), 128: (1.2e-2, 2.6e-2)}


@pytest.mark.parametrize("M", [4, 64])  # weight streaming, packed panels
@pytest.mark.parametrize("bs", sorted(ERROR_BOUNDS))
def test_error_against_the_float_reference(bs, M):
    K, N = 4096, 256
    q = cpu_op.make_case(K, N, bs, seed=bs)
    rng = np.random.default_rng(bs + M)
    normal = rng.standard_normal((M, K)).astype(np.float32)
    outliers = normal.copy()
    outliers[rng.random((M, K)) < 0.01] *= 20.0
    for a, bound in zip((normal, outliers), ERROR_BOUNDS[bs], strict=True):
        y = cpu_op.run_op(cpu_op.nf4_node_model(q, ["M", K], accuracy_level=4), a)
        ref = reference_matmul(q, a)
        rel = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
        assert 1e-4 < rel < bound, rel  # > 1e-4: the int8 path really ran
