"""The compiled NF4 encoder (onnx_nf4.codec.native) against the numpy reference, byte for byte.

Every oracle vector, both roundings, every block size, float16 / bfloat16 / float64 input, K not a multiple of the
block, zero and subnormal blocks, any strides, several thread counts, scaled values at and next to every decision
bound, a hypothesis fuzz test, the error sums, the C entry points' argument checks, and the other instruction sets
(re-run in a subprocess with ``ONNX_NF4_CPU_ISA`` capped).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle_vectors import f32_bits, parametrize_cases

from onnx_nf4.codec import native as native_codec
from onnx_nf4.codec.blockwise import quantize_blockwise
from onnx_nf4.codec.codebook import NF4_MIDPOINTS_BNB, NF4_THRESHOLDS
from onnx_nf4.codec.layout import nf4_error_sums, quantize_weight, quantize_weight_and_error

pytestmark = pytest.mark.skipif(not native_codec.available(), reason="the custom-op library is not built")
pytest_generate_tests = parametrize_cases

BLOCK_SIZES = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
ROUNDINGS = ["onnxruntime", "bitsandbytes"]
DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16, np.float64]
SETTINGS = {
    "deadline": None,
    "derandomize": os.environ.get("CI", "").lower() == "true",
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}


def assert_flat_equal(w: np.ndarray, bs: int, rounding: str, threads: int = 0) -> None:
    ref = quantize_blockwise(w, bs, rounding=rounding, backend="numpy")
    got = quantize_blockwise(w, bs, rounding=rounding, backend="native", threads=threads)
    assert np.array_equal(got[0], ref[0]), "packed codes differ"
    assert np.array_equal(f32_bits(got[1]), f32_bits(ref[1])), "absmax differs"


def assert_weight_equal(w: np.ndarray, bs: int, rounding: str, threads: int = 0) -> None:
    ref = quantize_weight(w, bs, rounding=rounding, backend="numpy")
    got = quantize_weight(w, bs, rounding=rounding, backend="native", threads=threads)
    assert got.packed.shape == ref.packed.shape and got.absmax.shape == ref.absmax.shape
    assert np.array_equal(got.packed, ref.packed), "packed codes differ"
    assert np.array_equal(f32_bits(got.absmax), f32_bits(ref.absmax)), "absmax differs"


# ------------------------------------------------------------------------------------------------- oracle


@pytest.mark.parametrize("bs", [64, 128])
def test_oracle_flat_both_roundings(oracle, case, bs):
    w = oracle[f"{case}__weight"]
    for rounding, lib in (("onnxruntime", "ort"), ("bitsandbytes", "bnb")):
        packed, absmax = quantize_blockwise(w, bs, rounding=rounding, backend="native")
        assert np.array_equal(packed, oracle[f"{case}__{lib}{bs}__packed"]), rounding
        assert np.array_equal(f32_bits(absmax), f32_bits(oracle[f"{case}__{lib}{bs}__absmax"])), rounding


@pytest.mark.parametrize("bs", [64, 128])
def test_oracle_weight_layout(oracle, case, bs):
    """``B = weight.T`` in the MatMulNF4 layout: the numpy layout's bytes, and the oracle's when K % bs == 0."""
    w = oracle[f"{case}__weight"]
    for rounding, lib in (("onnxruntime", "ort"), ("bitsandbytes", "bnb")):
        assert_weight_equal(w.T, bs, rounding)
        if w.shape[1] % bs == 0:
            q = quantize_weight(w.T, bs, rounding=rounding, backend="native")
            assert np.array_equal(q.packed.reshape(-1), oracle[f"{case}__{lib}{bs}__packed"])


# ----------------------------------------------------------------------------------- shapes, dtypes, strides


@pytest.mark.parametrize("bs", BLOCK_SIZES)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_every_block_size_flat(bs, rounding):
    rng = np.random.default_rng(bs)
    for n in (1, 2, 15, bs - 1, bs, bs + 1, 3 * bs + 7, 70001):
        w = rng.standard_normal(n).astype(np.float32) * np.float32(rng.uniform(1e-3, 1e3))
        if n > 2 * bs:
            w[bs : 2 * bs] = 0  # a zero block
        assert_flat_equal(w, bs, rounding)


@pytest.mark.parametrize("bs", BLOCK_SIZES)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_every_block_size_weight(bs, rounding):
    rng = np.random.default_rng(bs + 1)
    for K, N in ((1, 3), (bs - 1, 5), (bs, 9), (bs + 3, 70), (2 * bs + 17, 33)):
        w = rng.standard_normal((K, N)).astype(np.float32)
        w[:, 1] = 0  # zero column: zero blocks, also the padded one
        assert_weight_equal(w, bs, rounding)
        assert_weight_equal(np.asfortranarray(w), bs, rounding)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_input_dtypes(dtype, rounding):
    rng = np.random.default_rng(7)
    for shape in ((131, 77), (256, 64), (1000, 3)):
        w = rng.standard_normal(shape).astype(dtype)
        for bs in (16, 64, 256):
            assert_flat_equal(w, bs, rounding)
            assert_weight_equal(w, bs, rounding)
            assert_weight_equal(np.asfortranarray(w), bs, rounding)


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_strided_views(rounding):
    """Row-major, nn.Linear-ordered, reversed, sliced and byte-swapped weights are read in place or converted."""
    w = np.random.default_rng(3).standard_normal((300, 260)).astype(np.float32)
    unaligned = np.frombuffer(b"\0" + w.tobytes(), np.float32, count=w.size, offset=1).reshape(w.shape)
    assert not unaligned.flags.aligned
    views = [w, w.T.copy().T, w[::-1], w[:, ::-1], w[::2, 1::3], w.T[::3].T, w.astype(">f4"), unaligned]
    for view in views:
        assert_weight_equal(view, 64, rounding)
        assert_flat_equal(view, 64, rounding)


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_flat_of_a_transposed_weight_is_read_in_place(rounding):
    """The flat layout of ``W.T`` (rows of whole blocks) comes from the MatMulNF4 path without a copy."""
    w = np.random.default_rng(8).standard_normal((192, 100)).astype(np.float32)
    w[:, 5] = 0
    for bs in (16, 64):
        assert_flat_equal(w.T, bs, rounding)
        assert_flat_equal(w[::-1].T, bs, rounding)
    packed, absmax, sums = native_codec.encode_flat(w.T, 64, rounding, sums=True)
    ref_packed, ref_absmax, ref_sums = native_codec.encode_flat(np.ascontiguousarray(w.T), 64, rounding, sums=True)
    assert np.array_equal(packed, ref_packed) and np.array_equal(absmax, ref_absmax)
    assert sums.squared_error == pytest.approx(ref_sums.squared_error, rel=1e-12)
    assert sums.squared_weight == pytest.approx(ref_sums.squared_weight, rel=1e-12)


@pytest.mark.parametrize("threads", [1, 2, 3, 8, 0])
def test_thread_counts_give_the_same_bytes_and_sums(threads):
    w = np.random.default_rng(11).standard_normal((1500, 700)).astype(np.float32)
    assert_weight_equal(w, 64, "onnxruntime", threads)
    assert_flat_equal(w, 128, "bitsandbytes", threads)
    _, sums1 = quantize_weight_and_error(w, 64, threads=1, backend="native")
    _, sums = quantize_weight_and_error(w, 64, threads=threads, backend="native")
    assert sums == sums1  # bit for bit: the unit split and summation order ignore the thread count


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_subnormal_and_tiny_blocks(rounding):
    """absmax below 2.9e-39 (1/absmax = inf under onnxruntime rounding) and below 1e-38 (bitsandbytes clamp):
    codes 0 / 15 / 7 as the reference, and padding codes always 7."""
    rng = np.random.default_rng(5)
    for scale in (1e-45, 1e-41, 2e-39, 5e-39, 1e-38, 3e-38):
        w = (rng.standard_normal((70, 9)) * scale).astype(np.float32)
        w[3, :] = 0
        for bs in (16, 64):
            assert_weight_equal(w, bs, rounding)
            assert_flat_equal(w, bs, rounding)


def test_empty_and_single_element():
    for rounding in ROUNDINGS:
        assert_flat_equal(np.zeros(0, np.float32), 64, rounding)
        assert_flat_equal(np.array([3.0], np.float32), 64, rounding)
        assert_weight_equal(np.array([[-2.5]], np.float32), 16, rounding)
    q = quantize_weight(np.zeros((0, 4), np.float32), 64, backend="native")
    assert q.packed.shape == (4, 0, 32) and q.absmax.shape == (4, 0)


# ------------------------------------------------------------------------------------------ decision bounds


def _near_bounds(bounds: np.ndarray, ulps: int = 3) -> np.ndarray:
    """Each bound and its ``ulps`` float32 neighbours on both sides."""
    values = []
    for b in bounds.astype(np.float32):
        lo = hi = b
        values.append(b)
        for _ in range(ulps):
            lo, hi = np.nextafter(lo, np.float32(-2)), np.nextafter(hi, np.float32(2))
            values += [lo, hi]
    return np.array(values, np.float32)


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("absmax", [1.0, 3.7, 0.013, 2.0**-20, 123456.0])
def test_values_at_and_next_to_every_bound(rounding, absmax):
    """Scaled values at, and 1-3 ulps around, both sets of bounds, for several scales: x = s * absmax and its
    float32 neighbours, so that fl32(x * fl32(1 / absmax)) falls on and beside each bound."""
    a = np.float32(absmax)
    s = np.concatenate([_near_bounds(NF4_THRESHOLDS), _near_bounds(NF4_MIDPOINTS_BNB), [1, -1, 0, -0.0]])
    x = (s.astype(np.float64) * np.float64(a)).astype(np.float32)
    x = np.concatenate([x, np.nextafter(x, np.float32(np.inf)), np.nextafter(x, np.float32(-np.inf))])
    x = np.clip(x, -a, a)
    for bs in (16, 64, 256):
        # Every block holds +-absmax, so that its scale is exactly `a`; a tail block is left partial on purpose.
        body = x.copy()
        body[::bs] = a
        body[1::bs] = -a
        for n in (body.size, body.size - 5):
            assert_flat_equal(body[:n], bs, rounding)
        k = bs * (body.size // bs)
        assert_weight_equal(body[:k].reshape(-1, bs).T.copy(), bs, rounding)
        assert_weight_equal(body[: k - 8].reshape(-1, 8), bs, rounding)


def test_documented_boundary_values_differ_between_roundings():
    s = np.array([-0.8480963706970215, 0.1202552542090416, 0.5016634464263916, 0.8614784479141235], np.float32)
    block = np.zeros(64, np.float32)
    block[0] = 1
    block[1:5] = s
    ort = quantize_blockwise(block, 64, backend="native")[0]
    bnb = quantize_blockwise(block, 64, rounding="bitsandbytes", backend="native")[0]
    ort_codes = [ort[0] & 0xF, ort[1] >> 4, ort[1] & 0xF, ort[2] >> 4]
    bnb_codes = [bnb[0] & 0xF, bnb[1] >> 4, bnb[1] & 0xF, bnb[2] >> 4]
    assert ort_codes == [1, 8, 13, 15] and bnb_codes == [0, 9, 12, 14]


# ------------------------------------------------------------------------------------------------ fuzz


def _values(draw, size: int) -> np.ndarray:
    kind = draw(st.sampled_from(["normal", "bounds", "mixed", "tiny", "huge"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "normal":
        return rng.standard_normal(size) * draw(st.sampled_from([1e-3, 1.0, 50.0]))
    if kind == "tiny":
        return rng.standard_normal(size) * draw(st.sampled_from([1e-44, 1e-40, 4e-39, 1e-38]))
    if kind == "huge":
        return rng.standard_normal(size) * 1e37
    pool = np.concatenate([_near_bounds(NF4_THRESHOLDS, 2), _near_bounds(NF4_MIDPOINTS_BNB, 2), [0, -0.0, 1, -1]])
    picked = rng.choice(pool, size) * np.float32(draw(st.sampled_from([1.0, 0.37, 1024.0])))
    if kind == "mixed":
        picked[rng.random(size) < 0.5] = 0
    return picked


@st.composite
def fuzz_cases(draw):
    K = draw(st.integers(1, 300))
    N = draw(st.integers(1, 40))
    dtype = draw(st.sampled_from(DTYPES))
    w = _values(draw, K * N).reshape(K, N)
    with np.errstate(over="ignore"):
        w = w.astype(dtype)
    w[~np.isfinite(w.astype(np.float32))] = 0  # huge values beyond float16 / float32
    view = draw(st.sampled_from(["C", "F", "reversed"]))
    if view == "F":
        w = np.asfortranarray(w)
    elif view == "reversed":
        w = w[::-1, ::-1]
    return w, draw(st.sampled_from([16, 32, 64, 128, 256, 4096])), draw(st.sampled_from(ROUNDINGS))


@given(fuzz_cases(), st.sampled_from([1, 2, 0]))
@settings(max_examples=300, **SETTINGS)
def test_fuzz_native_equals_numpy(case, threads):
    w, bs, rounding = case
    assert_weight_equal(w, bs, rounding, threads)
    assert_flat_equal(w, bs, rounding, threads)


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_gives_the_numpy_message(dtype, bad):
    w = np.ones((70, 5), dtype)
    w[33, 2] = bad
    for call in (quantize_blockwise, quantize_weight):
        with pytest.raises(ValueError) as native:
            call(w, 64, name="layers.0.w", backend="native")
        with pytest.raises(ValueError) as ref:
            call(w, 64, name="layers.0.w", backend="numpy")
        assert str(native.value) == str(ref.value) and "layers.0.w" in str(native.value)


def test_float64_beyond_float32_is_not_finite():
    w = np.ones(100)
    w[77] = 1e39
    with pytest.raises(ValueError, match="flat index 77"):
        quantize_blockwise(w, 16, backend="native")


def test_backend_argument():
    w = np.ones(64, np.float32)
    with pytest.raises(ValueError, match="backend"):
        quantize_blockwise(w, 64, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        quantize_weight(w.reshape(8, 8), 16, backend="fast")


@pytest.mark.parametrize("threads", [-1, 1025, 1.5])
def test_bad_thread_count(threads):
    with pytest.raises(ValueError, match="threads"):
        quantize_blockwise(np.ones(64, np.float32), 64, backend="native", threads=threads)
    with pytest.raises(ValueError, match="threads"):
        quantize_weight(np.ones((64, 2), np.float32), 64, backend="native", threads=threads)


def test_native_backend_without_library(monkeypatch):
    monkeypatch.setattr(native_codec, "_library", lambda: None)
    assert not native_codec.available()
    with pytest.raises(native_codec.NativeCodecUnavailableError):
        quantize_blockwise(np.ones(64, np.float32), 64, backend="native")
    packed, _ = quantize_blockwise(np.ones(64, np.float32), 64)  # auto falls back to numpy
    assert packed.size == 32


def _lib():
    return native_codec._library()


def test_c_entry_points_reject_bad_arguments():
    """Invalid arguments give status 1 (never a crash); the status strings are static text."""
    lib = _lib()
    x = np.ones(256, np.float32)
    packed, absmax = np.empty(128, np.uint8), np.empty(16, np.float32)
    p, a, s = x.ctypes.data, packed.ctypes.data, absmax.ctypes.data
    good = (p, 1, 256, 16, 0, 1, a, s, None)
    assert lib.onnx_nf4_encode_flat(*good) == 0
    bad_flat = [
        (p, 2, 256, 16, 0, 1, a, s, None),  # dtype uint8
        (p, 1, -1, 16, 0, 1, a, s, None),  # negative size
        (p, 1, 256, 48, 0, 1, a, s, None),  # block size
        (p, 1, 256, 8192, 0, 1, a, s, None),
        (p, 1, 256, 16, 2, 1, a, s, None),  # rounding
        (p, 1, 256, 16, 0, -1, a, s, None),  # threads
        (None, 1, 256, 16, 0, 1, a, s, None),  # null pointers
        (p, 1, 256, 16, 0, 1, None, s, None),
        (p, 1, 256, 16, 0, 1, a, None, None),
        (p, 1, 2**62, 16, 0, 1, a, s, None),  # byte count overflows
    ]
    for args in bad_flat:
        assert lib.onnx_nf4_encode_flat(*args) == 1, args
    w = (p, 1, 16, 16, 16, 1, 16, 0, 1, a, s, None)
    assert lib.onnx_nf4_encode_weight(*w) == 0
    bad_weight = [
        (p, 1, -16, 16, 16, 1, 16, 0, 1, a, s, None),
        (p, 1, 16, 16, 2**62, 1, 16, 0, 1, a, s, None),  # offsets overflow
        (p, 1, 16, 16, -(2**63), 1, 16, 0, 1, a, s, None),
        (p, 1, 2**40, 2**40, 1, 2**40, 16, 0, 1, a, s, None),
        (None, 1, 16, 16, 16, 1, 16, 0, 1, a, s, None),
    ]
    for args in bad_weight:
        assert lib.onnx_nf4_encode_weight(*args) == 1, args
    assert lib.onnx_nf4_encode_weight(None, 1, 0, 5, 5, 1, 16, 0, 1, None, None, None) == 0  # nothing to do
    for status in range(6):
        assert lib.onnx_nf4_encoder_status_string(status)
    sums = np.full(2, 7.0)
    x[5] = np.nan
    assert lib.onnx_nf4_encode_flat(p, 1, 256, 16, 0, 2, a, s, sums.ctypes.data) == 2


# ------------------------------------------------------------------------------------------- error sums


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_error_sums_match_the_decoded_weight(dtype):
    """The sums of the single pass equal the package's metric on the dequantized weight (float64, any order)."""
    w = np.random.default_rng(2).standard_normal((333, 129)).astype(dtype)
    w[:, 7] = 0
    for bs in (16, 64, 128):
        q, sums = quantize_weight_and_error(w, bs, backend="native")
        ref = nf4_error_sums(w, q)
        assert sums.squared_error == pytest.approx(ref.squared_error, rel=1e-12)
        assert sums.squared_weight == pytest.approx(ref.squared_weight, rel=1e-12)
        assert 0.05 < sums.rel_rms_error < 0.15
    q, sums = quantize_weight_and_error(w, 64, backend="native", double_quant=True)
    assert sums == nf4_error_sums(w, q)  # decoded with the double-quantized scales


def test_error_sums_of_a_zero_weight():
    _, sums = quantize_weight_and_error(np.zeros((64, 4), np.float32), 64, backend="native")
    assert sums.squared_error == sums.squared_weight == 0.0 and sums.rel_rms_error == 0.0


def test_flat_error_sums():
    w = np.random.default_rng(4).standard_normal(1001).astype(np.float32)
    packed, absmax, sums = native_codec.encode_flat(w, 64, sums=True)
    from onnx_nf4.codec.blockwise import dequantize_blockwise

    diff = (w - dequantize_blockwise(packed, absmax, w.shape, 64)).astype(np.float64)
    assert sums.squared_error == pytest.approx(float(diff @ diff), rel=1e-12)
    assert sums.squared_weight == pytest.approx(float(w.astype(np.float64) @ w.astype(np.float64)), rel=1e-12)


# --------------------------------------------------------------------------------------- instruction sets

ISA_SCRIPT = r"""
import json, sys
import numpy as np
sys.path.insert(0, {tests_dir!r})
import test_native_codec as t
from onnx_nf4.codec import native as native_codec
from onnx_nf4.codec.layout import quantize_weight_and_error
rng = np.random.default_rng(0)
for dtype in t.DTYPES:
    for bs in (16, 64, 4096):
        for rounding in t.ROUNDINGS:
            w = rng.standard_normal((300, 45)).astype(dtype)
            w[:, 3] = 0
            t.assert_weight_equal(w, bs, rounding)
            t.assert_weight_equal(np.asfortranarray(w), bs, rounding)
            t.assert_flat_equal(w, bs, rounding)
t.test_values_at_and_next_to_every_bound("onnxruntime", 3.7)
t.test_values_at_and_next_to_every_bound("bitsandbytes", 0.013)
t.test_subnormal_and_tiny_blocks("onnxruntime")
w = rng.standard_normal((1000, 333)).astype(np.float32)
sums = [quantize_weight_and_error(v, 64, backend="native")[1] for v in (w, np.asfortranarray(w))]
print(json.dumps([native_codec.isa()] + [[s.squared_error, s.squared_weight] for s in sums]))
"""


def _isa_run(isa: str | None) -> list:
    env = dict(os.environ)
    env.pop("ONNX_NF4_CPU_ISA", None)
    if isa is not None:
        env["ONNX_NF4_CPU_ISA"] = isa
    script = ISA_SCRIPT.format(tests_dir=str(Path(__file__).resolve().parent))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_instruction_set_gives_the_same_bytes_and_sums():
    """The portable, AVX2 and the best (here AVX-512) modules: same bytes as numpy, and bit-identical sums."""
    best = _isa_run(None)
    portable = _isa_run("portable")
    assert portable[0] == "portable"
    assert portable[1:] == best[1:]
    if best[0] != "portable":
        avx2 = _isa_run("avx2")
        assert avx2[0] == "avx2" and avx2[1:] == best[1:]
        assert _isa_run("avx2vnni")[0] == "avx2"  # the kernels' cap value; the encoder has no VNNI code


def test_isa_name():
    assert native_codec.isa() in ("avx512", "avx2", "portable")


# ------------------------------------------------------------------------------------------------ the pass


@pytest.mark.parametrize("fmt", ["onnx_nf4", "com.microsoft"])
def test_pass_skips_weights_the_encoder_finds_not_finite(fmt):
    """No separate finiteness pass: the encoder's finding skips every node of the weight, with the codec's reason."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from onnx_nf4.passes import QuantizeNF4Pass

    rng = np.random.default_rng(0)
    bad = rng.standard_normal((128, 64)).astype(np.float32)
    bad[7, 9] = np.inf
    good = rng.standard_normal((64, 64)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W_bad"], ["h"], name="first"),
        helper.make_node("MatMul", ["x", "W_bad"], ["h2"], name="second"),
        helper.make_node("MatMul", ["h", "W_good"], ["y"], name="third"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 128])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64]),
         helper.make_tensor_value_info("h2", TensorProto.FLOAT, [2, 64])],
        [numpy_helper.from_array(bad, "W_bad"), numpy_helper.from_array(good, "W_good")],
    )  # fmt: skip
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    result = QuantizeNF4Pass(format=fmt)(model)
    report = result.report
    assert [layer.node for layer in report.layers] == ["third"]
    assert sorted(s.node for s in report.skipped) == ["first", "second"]
    assert all("'W_bad'" in s.reason and "not finite" in s.reason for s in report.skipped)
    proto = ir.serde.serialize_model(result.model)
    assert [n.op_type for n in proto.graph.node][:2] == ["MatMul", "MatMul"]
    assert "W_bad" in {t.name for t in proto.graph.initializer}
    onnx.checker.check_model(proto)


@pytest.mark.parametrize("K", [128, 100])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_pass_error_of_the_bnb4_format(K, dtype):
    """com.microsoft::MatMulBnb4: the error from the encoder's sums (float32) or from the decoded weight with the
    absmax as stored (float16) is the metric of the weight the model holds."""
    from onnx import TensorProto, helper, numpy_helper

    from onnx_nf4.codec.blockwise import dequantize_blockwise
    from onnx_nf4.codec.metrics import rel_rms_error
    from onnx_nf4.passes import QuantizeNF4Pass

    w = np.random.default_rng(K).standard_normal((K, 96)).astype(dtype)
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", elem, [2, K])], [helper.make_tensor_value_info("y", elem, [2, 96])],
        [numpy_helper.from_array(w, "W")],
    )  # fmt: skip
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    report = QuantizeNF4Pass(format="com.microsoft", min_elements=0)(model).report
    packed, absmax = quantize_blockwise(w.T, 64, backend="numpy")
    decoded = dequantize_blockwise(packed, absmax.astype(dtype).astype(np.float32), (96, K), 64).T
    assert report.layers[0].rel_rms_error == pytest.approx(rel_rms_error(w, decoded), rel=1e-9)
