"""Write ``tests/data/nf4_vectors.npz``: NF4 codes and absmax computed by bitsandbytes and by onnxruntime.

The file is the oracle of the codec tests: for every test weight it holds what bitsandbytes' CPU
``quantize_4bit(..., quant_type="nf4")`` and onnxruntime's ``quantize_matmul_bnb4`` (the function behind
``MatMulBnb4Quantizer``) produce at block sizes 64 and 128, plus the code table and the two libraries' decision
bounds, measured by probing each library (not restated from the project's
``onnx_nf4.codec.codebook``). The key layout is described in ``tests/data/README.md``.

The output is a pure function of the seed and the two libraries' arithmetic: the weights come from a seeded numpy
generator, the archive is written uncompressed with fixed member dates, and no version or time is stored in it.

Usage::

    python tools/make_oracle_vectors.py            # (re)write tests/data/nf4_vectors.npz
    python tools/make_oracle_vectors.py --check    # exit 1 unless the committed file is byte for byte what it writes
    python tools/make_oracle_vectors.py --out OTHER.npz

Needs numpy, torch, bitsandbytes and onnxruntime (CPU).
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "tests" / "data" / "nf4_vectors.npz"
DEFAULT_SEED = 20240607
BLOCK_SIZES = (64, 128)
ONNXRUNTIME_NF4 = 1  # quant_type argument of quantize_matmul_bnb4 (MatMulBnb4Quantizer.NF4)
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip member can carry: no build time in the file

README_TEXT = """\
NF4 oracle vectors of onnx_nf4 (tests/data/README.md has the full description; tools/make_oracle_vectors.py writes
this file). CASE is an entry of meta_json["cases"], BS is 64 or 128.
  CASE__weight          float32 or float16 [N_out, K_in] (torch Linear layout; the ONNX MatMul weight is its transpose)
  CASE__bnbBS__packed   uint8 [ceil(numel/2)]  bitsandbytes quantize_4bit(weight, blocksize=BS, quant_type="nf4"), CPU
  CASE__bnbBS__absmax   float32 [ceil(numel/BS)]
  CASE__ortBS__packed   uint8 [ceil(numel/2)]  onnxruntime quantize_matmul_bnb4(weight, BS, NF4)
  CASE__ortBS__absmax   dtype of the weight [ceil(numel/BS)]
  CASE__diffBS          int64, the flat indices at which the two libraries' codes differ
  nf4_code              float32 [16], the code table
  bnb_cpu_midpoints_f32 float32 [15], bitsandbytes' CPU decision bounds
  ort_thresholds_f32    float32 [15], onnxruntime's decision bounds
Elements are the row-major flattening of the weight; block b is elements [b*BS, (b+1)*BS), across row ends; the last
block may be partial. Byte j = code(2j) << 4 | code(2j+1); an odd count is padded with code 7 (0.0). A scaled value s
gets code #{bounds t : s > t}. Decoded value: nf4_code[code] * absmax[block].
"""


# ---------------------------------------------------------------------------------------------------------------
# The two libraries
# ---------------------------------------------------------------------------------------------------------------
def bitsandbytes_quantize(weight: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """bitsandbytes' NF4 codes (packed, flat) and float32 absmax of ``weight``, without double quantization, on CPU."""
    import torch
    from bitsandbytes.functional import quantize_4bit

    packed, state = quantize_4bit(
        torch.from_numpy(np.ascontiguousarray(weight)),
        blocksize=block_size,
        compress_statistics=False,
        quant_type="nf4",
    )
    return packed.numpy().reshape(-1).copy(), state.absmax.numpy().astype(np.float32)


def onnxruntime_quantize(weight: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """onnxruntime's NF4 codes (packed, flat) and absmax (the weight's dtype) of ``weight [N_out, K_in]``.

    ``MatMulBnb4Quantizer`` passes the transpose of the ONNX weight ``B [K, N]``, which is ``weight`` itself.
    """
    from onnxruntime.capi._pybind_state import quantize_matmul_bnb4

    n_out, k_in = weight.shape
    packed = np.zeros((weight.size + 1) // 2, np.uint8)
    absmax = np.zeros(-(-weight.size // block_size), weight.dtype)
    quantize_matmul_bnb4(packed, np.ascontiguousarray(weight), absmax, block_size, ONNXRUNTIME_NF4, n_out, k_in)
    return packed, absmax


def nibbles(packed: np.ndarray, count: int) -> np.ndarray:
    """The first ``count`` 4-bit codes of ``packed`` (high nibble first)."""
    return np.stack([packed >> 4, packed & 0x0F], axis=-1).reshape(-1)[:count]


# ---------------------------------------------------------------------------------------------------------------
# The code table and decision bounds, measured
# ---------------------------------------------------------------------------------------------------------------
def nf4_code_table() -> np.ndarray:
    """bitsandbytes' NF4 table, float32 [16] ascending."""
    from bitsandbytes.functional import get_4bit_type

    return get_4bit_type("nf4", device="cpu").numpy().astype(np.float32)


def _ordinal(x: np.ndarray) -> np.ndarray:
    """float32 values as int64 integers with the same order (consecutive float32 values are consecutive integers)."""
    bits = np.abs(x).astype(np.float32).view(np.uint32).astype(np.int64)
    return np.where(np.signbit(x), -bits, bits)


def _from_ordinal(o: np.ndarray) -> np.ndarray:
    values = np.abs(o).astype(np.uint32).view(np.float32)
    return np.where(o < 0, -values, values).astype(np.float32)


def measured_bounds(quantize: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]], code: np.ndarray):
    """The 15 decision bounds of ``quantize``: bound i is the largest float32 ``s`` that still gets code ``i``.

    Found by bisection over float32 values between ``code[i]`` and ``code[i+1]``, all bounds at once: each probe ``s``
    is the second element of its own 64-block whose first element is 1.0, so the scaled value is ``s`` exactly
    (``s * (1/1)`` and ``s / 1`` alike). With that definition, ``code(s) = #{bounds t : s > t}``.
    """
    lo, hi = _ordinal(code[:-1]), _ordinal(code[1:])  # code(lo) <= i < code(hi)
    target = np.arange(15)
    while np.any(hi - lo > 1):
        mid = (lo + hi) // 2
        blocks = np.zeros((15, 64), np.float32)
        blocks[:, 0] = 1.0
        blocks[:, 1] = _from_ordinal(mid)
        codes = nibbles(quantize(blocks, 64)[0], blocks.size).reshape(15, 64)[:, 1]
        low = codes <= target
        lo, hi = np.where(low, mid, lo), np.where(low, hi, mid)
    return _from_ordinal(lo)


# ---------------------------------------------------------------------------------------------------------------
# The test weights, torch layout [N_out, K_in]
# ---------------------------------------------------------------------------------------------------------------
def ulps_away(value: float, steps: int) -> np.float32:
    """The float32 ``steps`` representable values above ``value`` (below when ``steps`` < 0)."""
    x = np.float32(value)
    toward = np.float32(np.inf if steps > 0 else -np.inf)
    for _ in range(abs(steps)):
        x = np.nextafter(x, toward)
    return x


def boundary_rows(bounds: np.ndarray) -> np.ndarray:
    """[10, 256]: each row has absmax ``a`` at the start of every 64-block and, elsewhere, every bound and its two
    float32 neighbours times ``a``, then their negatives. Powers of two make the scaled values exact; the other
    absmax values exercise how each library rounds ``x * (1/absmax)``."""
    probes = np.array([ulps_away(b, k) for b in bounds for k in (-1, 0, 1)], np.float32)
    others = [i for i in range(256) if i % 64]
    rows = []
    for a in np.array([1.0, 2.0, 0.5, 0.25, 3.0, 0.37, 1.3, 0.011, 5.1, 0.0625], np.float32):
        row = np.zeros(256, np.float32)
        row[::64] = a
        scaled = (probes * a).astype(np.float32)
        row[others[: scaled.size]] = scaled
        rest = others[scaled.size : 2 * scaled.size]
        row[rest] = -scaled[: len(rest)]
        rows.append(row)
    return np.stack(rows)


def tail_block_row(
    rng: np.random.Generator, a: np.float32, bnb_bounds: np.ndarray, ort_bounds: np.ndarray
) -> np.ndarray:
    """[1, n] with n < 128: 64 small values, the absmax ``a``, then values near ``bound * a`` whose code differs when
    divided by ``a`` (bitsandbytes' partial last block) and when multiplied by ``1/a`` (onnxruntime), with their
    upper neighbours, at most 40. At block 64 they form the partial last block; at 128 the whole tensor is one."""
    near = np.array([ulps_away(b * a, k) for b in bnb_bounds for k in range(-12, 13)], np.float32)
    with np.errstate(all="ignore"):
        divided = np.searchsorted(bnb_bounds, near / a, side="left")
        multiplied = np.searchsorted(ort_bounds, near * (np.float32(1) / a), side="left")
    hits = np.flatnonzero(divided != multiplied)
    chosen = np.unique(np.concatenate([hits, np.minimum(hits + 1, near.size - 1)]))[:40]
    small = (rng.standard_normal(64) * 0.1).astype(np.float32)
    return np.concatenate([small, [a], near[chosen]]).astype(np.float32).reshape(1, -1)


def make_cases(seed: int, bnb_bounds: np.ndarray, ort_bounds: np.ndarray) -> dict[str, np.ndarray]:
    """The test weights by case name, in file order. Every random draw comes from one generator seeded ``seed``, in
    a fixed order, so the weights depend on the seed alone."""
    rng = np.random.default_rng(seed)
    f32, f16 = np.float32, np.float16
    cases: dict[str, np.ndarray] = {}

    cases["randn_f32_384x512"] = (rng.standard_normal((384, 512)) * 0.05).astype(f32)
    bound = 1 / np.sqrt(200)  # torch's default Linear init for K = 200
    cases["kaiming_uniform_f32_96x200"] = rng.uniform(-bound, bound, (96, 200)).astype(f32)
    cases["heavy_tail_f32_64x256"] = (rng.standard_t(2, (64, 256)) * 0.02).astype(f32)

    w = rng.standard_normal((128, 256)).astype(f32)
    w[rng.random(w.shape) < 0.2] = 0.0
    w[0, :7] = -0.0
    cases["zeros_and_negzero_f32_128x256"] = w

    w = rng.standard_normal((16, 512)).astype(f32)
    w[0, 64:128] = 0.0  # a zero 64-block inside a non-zero 128-block
    w[1, 128:256] = 0.0  # a zero 128-block (two zero 64-blocks)
    w[5] = 0.0  # a zero row
    cases["zero_blocks_f32_16x512"] = w
    cases["all_zero_f32_8x64"] = np.zeros((8, 64), f32)

    cases["boundaries_f32_10x256"] = boundary_rows(np.unique(np.concatenate([bnb_bounds, ort_bounds])))

    for a in np.array([3.0, 1.3, 0.7], f32):
        w = tail_block_row(rng, a, bnb_bounds, ort_bounds)
        cases[f"tail_block_near_bounds_a{a:g}_f32_1x{w.shape[1]}"] = w

    for n, k in [(1, 1), (3, 3), (9, 7), (5, 33), (1, 65), (17, 31), (3, 100), (129, 11), (67, 130)]:
        cases[f"awkward_f32_{n}x{k}"] = rng.standard_normal((n, k)).astype(f32)

    w = rng.standard_normal((4, 64)).astype(f32)
    w[1] = 0.0
    w[1, :4] = [1e-40, -5e-41, 2e-41, 0.0]  # a float32-subnormal absmax
    w[2] *= f32(1e-38)  # an absmax just above the subnormal range
    w[3] *= f32(1e30)
    w[3, 0] = f32(3e38)  # near float32's maximum
    cases["extreme_magnitudes_f32_4x64"] = w

    cases["randn_f16_96x256"] = (rng.standard_normal((96, 256)) * 0.05).astype(f16)
    cases["awkward_f16_33x17"] = rng.standard_normal((33, 17)).astype(f16)
    w = (rng.standard_normal((4, 64)) * 0.1).astype(f16)
    w[0, 0] = f16(65504.0)  # float16's maximum
    w[1] = f16(0)
    w[1, :3] = [f16(6e-8), f16(-1.2e-7), f16(3e-8)]  # a float16-subnormal block
    w[2] = f16(0)
    cases["extremes_f16_4x64"] = w
    return cases


# ---------------------------------------------------------------------------------------------------------------
# The file
# ---------------------------------------------------------------------------------------------------------------
def build_arrays(seed: int) -> dict[str, np.ndarray]:
    """Every array of the file, by key, in file order."""
    code = nf4_code_table()
    bnb_bounds = measured_bounds(bitsandbytes_quantize, code)
    ort_bounds = measured_bounds(onnxruntime_quantize, code)
    cases = make_cases(seed, bnb_bounds, ort_bounds)

    arrays: dict[str, np.ndarray] = {}
    summary = []
    for name, weight in cases.items():
        arrays[f"{name}__weight"] = weight
        for bs in BLOCK_SIZES:
            bnb_packed, bnb_absmax = bitsandbytes_quantize(weight, bs)
            ort_packed, ort_absmax = onnxruntime_quantize(weight, bs)
            diff = np.flatnonzero(nibbles(bnb_packed, weight.size) != nibbles(ort_packed, weight.size))
            arrays[f"{name}__bnb{bs}__packed"] = bnb_packed
            arrays[f"{name}__bnb{bs}__absmax"] = bnb_absmax
            arrays[f"{name}__ort{bs}__packed"] = ort_packed
            arrays[f"{name}__ort{bs}__absmax"] = ort_absmax
            arrays[f"{name}__diff{bs}"] = diff.astype(np.int64)
            same_absmax = np.array_equal(bnb_absmax.view(np.uint32), ort_absmax.astype(np.float32).view(np.uint32))
            summary.append(
                {
                    "case": name,
                    "dtype": str(weight.dtype),
                    "shape": list(weight.shape),
                    "block_size": bs,
                    "codes_differing": int(diff.size),
                    "absmax_equal": bool(same_absmax),
                }
            )
    arrays["nf4_code"] = code
    arrays["bnb_cpu_midpoints_f32"] = bnb_bounds
    arrays["ort_thresholds_f32"] = ort_bounds
    meta = {"cases": list(cases), "block_sizes": list(BLOCK_SIZES), "seed": seed, "summary": summary}
    arrays["meta_json"] = np.array(json.dumps(meta, indent=1))
    arrays["README"] = np.array(README_TEXT)
    return arrays


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An ``.npz`` (readable by ``np.load`` without pickle) whose bytes depend on the arrays alone: members stored
    uncompressed (no dependence on the zlib build), dated 1980-01-01, in the given order."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for key, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, array, version=(1, 0), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=ZIP_DATE)
            info.external_attr = 0o644 << 16
            archive.writestr(info, member.getvalue())
    return buffer.getvalue()


def library_versions() -> dict[str, str]:
    import bitsandbytes
    import onnxruntime
    import torch

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def differing_keys(expected: bytes, actual_path: Path) -> list[str]:
    """The keys whose arrays differ (dtype, shape or bytes) between the archive ``expected`` and the file."""
    with np.load(io.BytesIO(expected)) as new, np.load(actual_path) as old:
        keys = list(dict.fromkeys([*new.files, *old.files]))
        return [
            key
            for key in keys
            if key not in new.files
            or key not in old.files
            or new[key].dtype != old[key].dtype
            or new[key].shape != old[key].shape
            or new[key].tobytes() != old[key].tobytes()
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the file (default {DEFAULT_OUT})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"weight seed (default {DEFAULT_SEED})")
    parser.add_argument("--check", action="store_true", help="compare with the file instead of writing it")
    args = parser.parse_args(argv)

    print("with " + ", ".join(f"{name} {version}" for name, version in library_versions().items()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes' notices about optional CPU kernel packages
        arrays = build_arrays(args.seed)
    data = npz_bytes(arrays)
    meta = json.loads(str(arrays["meta_json"]))
    differing = sum(row["codes_differing"] > 0 for row in meta["summary"])
    print(
        f"{len(meta['cases'])} cases x {len(BLOCK_SIZES)} block sizes; the libraries' codes differ in {differing} of "
        f"{len(meta['summary'])} (boundary, partial-block and extreme-magnitude cases)"
    )
    if not args.check:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_bytes(data)
        print(f"wrote {args.out} ({len(data)} bytes)")
        return 0
    if not args.out.exists():
        print(f"{args.out} does not exist", file=sys.stderr)
        return 1
    if args.out.read_bytes() == data:
        print(f"{args.out} is byte for byte what this script writes ({len(data)} bytes)")
        return 0
    keys = differing_keys(data, args.out)
    detail = f"arrays that differ: {', '.join(keys)}" if keys else "same arrays, different archive bytes"
    print(f"{args.out} differs from what this script writes; {detail}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
