"""The emulated suite catches injected kernel bugs: a copy of ``matmul_nf4.cu`` with one bug is compiled into its own
emulator and must fail on a case that reaches the bug (an emulator error, a result outside the accuracy bound, a
write outside the buffers, or results that differ between the two schedules), while the real source passes the same
case. Each patch must apply exactly once, so a change of the source that moves the code fails here loudly.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from cuda_emu import CUDA_DIR, KERNEL_FILE, Emulator, build, emulator, run_matmul
from gpu_cases import CASES, assert_close, attrs, problem, weight_arrays


@dataclass(frozen=True)
class Mutant:
    """A bug: each (old, new) replaces text that occurs exactly once; the case (gpu_cases form) that reaches it."""

    name: str
    patches: tuple[tuple[str, str], ...]
    case: tuple
    dtype: str
    algo: str


SKINNY_MMA_CASE = (128, 40, 64, [6, 128], False, False, True)  # 2 blocks per 128-k chunk: two lane groups
TILED_CASE = (200, 150, 32, [70, 200], True, False, True)  # 2 x 2 CTAs of the tiled kernel, a partial last stage
SIMT_CASE = (300, 37, 64, [5, 300], False, False, True)

MUTANTS = [
    Mutant(
        "swapped mma A registers (skinny kernel: rows g + 8 and k-slots 8.. exchanged)",
        (
            (
                "decode_byte(table, qb[s >> 1], sh, w_hi[1], w_lo[1]);",
                "decode_byte(table, qb[s >> 1], sh, w_hi[2], w_lo[2]);",
            ),
            (
                "decode_byte(table, qa[s >> 1], sh + 8, w_hi[2], w_lo[2]);",
                "decode_byte(table, qa[s >> 1], sh + 8, w_hi[1], w_lo[1]);",
            ),
        ),
        SKINNY_MMA_CASE,
        "float16",
        "mma",
    ),
    Mutant(
        "swapped ldmatrix addressing (tiled kernel: the B operand's matrices 1 and 2 exchanged)",
        (
            (
                "&s_act[wm + 16 * p + (lane & 7) + ((lane >> 4) << 3)][kk + 8 * ((lane >> 3) & 1)]",
                "&s_act[wm + 16 * p + (lane & 7) + (((lane >> 3) & 1) << 3)][kk + 8 * (lane >> 4)]",
            ),
        ),
        TILED_CASE,
        "bfloat16",
        "mma",
    ),
    Mutant(
        "swapped D store (skinny kernel: rows g and g + 8 of the accumulator exchanged)",
        (
            ("partial[warp][g][8 * j + 2 * t] = d[j][0];", "partial[warp][g][8 * j + 2 * t] = d[j][2];"),
            ("partial[warp][g + 8][8 * j + 2 * t] = d[j][2];", "partial[warp][g + 8][8 * j + 2 * t] = d[j][0];"),
        ),
        SKINNY_MMA_CASE,
        "bfloat16",
        "mma",
    ),
    Mutant(
        "swapped D store (tiled kernel: the row and column halves of the accumulator exchanged)",
        (
            ("n = n_base + wn + 16 * i + g + 8 * (r >> 1);", "n = n_base + wn + 16 * i + g + 8 * (r & 1);"),
            ("m = m_base + wm + 8 * j + 2 * t + (r & 1);", "m = m_base + wm + 8 * j + 2 * t + (r >> 1);"),
        ),
        TILED_CASE,
        "float16",
        "mma",
    ),
    Mutant(
        "tail bound off by one (float32 activations read one past K)",
        (("a[e] = k + e < K ? __ldg(row + k + e) : 0.0f;", "a[e] = k + e <= K ? __ldg(row + k + e) : 0.0f;"),),
        CASES[10],  # K = 37: the scalar path
        "float32",
        "simt",
    ),
    Mutant(
        "tail bound off by one (16-bit activation pairs read one past K)",
        (
            (
                "const u32 hi = k + 2 * i + 1 < K ? __ldg(row + k + 2 * i + 1) : 0u;",
                "const u32 hi = k + 2 * i + 1 <= K ? __ldg(row + k + 2 * i + 1) : 0u;",
            ),
        ),
        CASES[10],
        "float16",
        "mma",
    ),
    Mutant(
        "wrong shuffle source lane (skinny kernel: the scale of another lane group)",
        (("const int src = (lane & ~3) | (gi << gshift);", "const int src = (lane & ~3) | gi;"),),
        SKINNY_MMA_CASE,
        "float16",
        "mma",
    ),
    Mutant(
        "wrong shuffle source lane (CUDA-core kernel: the codebook lane of the even code)",
        (
            (
                "__shfl_sync(kFullMask, table, static_cast<int>(q[j] >> (8 * i + 4)))",
                "__shfl_sync(kFullMask, table, static_cast<int>(q[j] >> (8 * i + 3)))",
            ),
        ),
        SIMT_CASE,
        "float32",
        "simt",
    ),
    Mutant(
        "missing __syncthreads (CUDA-core kernel: before the split-K reduction)",
        (
            (
                "  __syncthreads();\n  for (int idx = threadIdx.x; idx < cols_per_cta * MT; idx += kThreads) {",
                "  for (int idx = threadIdx.x; idx < cols_per_cta * MT; idx += kThreads) {",
            ),
        ),
        SIMT_CASE,
        "float32",
        "simt",
    ),
    Mutant(
        "missing __syncthreads (skinny tensor-core kernel: before the reduction)",
        (("  __syncthreads();\n  const int cols = 16 * tiles_per_cta;", "  const int cols = 16 * tiles_per_cta;"),),
        SKINNY_MMA_CASE,
        "float16",
        "mma",
    ),
    Mutant(
        "missing __syncthreads (tiled kernel: a stage is overwritten while other warps still read it)",
        (("    __syncthreads();  // the previous stage is consumed\n", ""),),
        TILED_CASE,
        "float16",
        "mma",
    ),
]


def _mutant_source(mutant: Mutant, directory: Path) -> Path:
    source = (CUDA_DIR / KERNEL_FILE).read_text(encoding="utf-8")
    for old, new in mutant.patches:
        assert source.count(old) == 1, f"{mutant.name}: the patched text occurs {source.count(old)} times"
        source = source.replace(old, new)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / KERNEL_FILE).write_text(source, encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def mutant_emulators(tmp_path_factory) -> dict[str, Emulator]:
    """One emulator per mutant, compiled two at a time (the machine's two cores)."""
    root = tmp_path_factory.mktemp("mutants")
    dirs = [_mutant_source(m, root / f"m{i}") for i, m in enumerate(MUTANTS)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        libraries = list(pool.map(build, dirs))
    return {m.name: Emulator(lib) for m, lib in zip(MUTANTS, libraries, strict=True)}


def _caught(emu: Emulator, mutant: Mutant) -> str:
    """What gives the bug away on its case ("" when nothing does)."""
    q, a, bias, ref = problem(mutant.case, mutant.dtype)
    outputs = []
    for schedule in (0, 1):
        try:
            run = run_matmul(emu, mutant.dtype, mutant.algo, a, weight_arrays(q), bias, **attrs(q), schedule=schedule)
        except AssertionError as exc:  # guard bytes overwritten
            return f"schedule {schedule}: {exc}"
        if run.error:
            return f"schedule {schedule}: {run.error}"
        try:
            assert_close(run.y, ref, q, a, mutant.dtype)
        except AssertionError as exc:
            return f"schedule {schedule}: outside the accuracy bound ({str(exc).splitlines()[0]})"
        outputs.append(run.y.tobytes())
    return "" if outputs[0] == outputs[1] else "the two schedules give different results"


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_injected_bug_is_caught(mutant, mutant_emulators):
    assert _caught(emulator(), mutant) == "", "the real kernels must pass the mutant's case"
    assert _caught(mutant_emulators[mutant.name], mutant) != "", f"not caught: {mutant.name}"
