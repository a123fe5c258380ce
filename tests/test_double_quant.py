"""Double quantization of the absmax, byte for byte against bitsandbytes (CPU) run in the test."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_nf4.codec.blockwise import dequantize_blockwise, quantize_blockwise
from onnx_nf4.codec.double_quant import (
    DYNAMIC_CODE,
    NestedAbsmax,
    _lut_codes,
    create_dynamic_map,
    dequantize_absmax,
    quantize_absmax,
    torch_mean_f32,
)


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def bnb_f(torch):
    return pytest.importorskip("bitsandbytes.functional")


def _bits(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32)).reshape(-1).view(np.uint32)


def _assert_same_f32(got, expected, what: str) -> None:
    got, expected = _bits(got), _bits(expected)
    assert got.shape == expected.shape, what
    bad = np.flatnonzero(got != expected)
    assert bad.size == 0, f"{what}: {bad.size} differ, first at {bad[:5]}"


def _bnb_nested(bnb_f, torch, absmax: np.ndarray, block_size: int):
    """What quantize_4bit(compress_statistics=True) does with its absmax, with a chosen nested block size."""
    t = torch.from_numpy(absmax)
    offset = t.mean()
    q, state2 = bnb_f.quantize_blockwise(t - offset, blocksize=block_size)
    decoded = bnb_f.dequantize_blockwise(q, state2) + offset
    return q.numpy(), state2, offset.numpy(), decoded.numpy()


def _offset_like_torch(torch, absmax: np.ndarray) -> np.float32:
    return torch_mean_f32(absmax, threads=torch.get_num_threads())


# ---------------------------------------------------------------------------------------------------------
# the code table and the mean


def test_dynamic_map_matches_bitsandbytes(bnb_f):
    _assert_same_f32(create_dynamic_map(), bnb_f.create_dynamic_map().numpy(), "create_dynamic_map")
    _assert_same_f32(DYNAMIC_CODE, bnb_f.create_dynamic_map().numpy(), "DYNAMIC_CODE")
    assert not DYNAMIC_CODE.flags.writeable


_MEAN_SIZES = [1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 129, 255, 256, 257, 1000, 4097,
               32767, 32768, 32769, 65537, 100003, 2**19 + 1, 2**20 + 7]  # fmt: skip


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("n", _MEAN_SIZES)
def test_torch_mean_f32_matches_torch(torch, n, threads):
    rng = np.random.default_rng(n * 7 + threads)
    x = (np.abs(rng.standard_normal(n)) * rng.uniform(0.01, 100)).astype(np.float32)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        expected = torch.from_numpy(x).mean().numpy()
    finally:
        torch.set_num_threads(saved)
    _assert_same_f32(torch_mean_f32(x, threads=threads), expected, f"mean of {n}")


def test_torch_mean_f32_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        torch_mean_f32(np.zeros(0, np.float32))
    with pytest.raises(ValueError, match="positive"):
        torch_mean_f32(np.ones(4, np.float32), threads=0)


# ---------------------------------------------------------------------------------------------------------
# end to end: quantize_4bit(compress_statistics=True)

_WEIGHTS = [
    # (rows, cols, NF4 block size): absmax counts 1, 5, 256, 257, 1000, 9216, 32769, 100000, ...
    (1, 64, 64),
    (3, 100, 64),
    (64, 256, 64),
    (1, 16448, 64),
    (125, 512, 128),
    (384, 1536, 64),
    (96, 768, 256),
    (4, 4096, 4096),
    (33, 4096, 4096),
    (1, 2097216, 64),
    (2000, 3200, 64),
]


@pytest.mark.parametrize(("rows", "cols", "bs"), _WEIGHTS, ids=[f"{r}x{c}-bs{b}" for r, c, b in _WEIGHTS])
def test_quantize_4bit_compress_statistics(bnb_f, torch, rows, cols, bs):
    rng = np.random.default_rng(rows * cols + bs)
    w = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    w[0, : min(cols, bs)] = 0  # an all-zero NF4 block: absmax 0
    packed_ref, state = bnb_f.quantize_4bit(
        torch.from_numpy(w), blocksize=bs, quant_type="nf4", compress_statistics=True
    )

    packed, absmax = quantize_blockwise(w, bs, rounding="bitsandbytes")
    assert np.array_equal(packed, packed_ref.numpy().reshape(-1))
    codes, nested = quantize_absmax(absmax, offset=_offset_like_torch(torch, absmax))

    assert np.array_equal(codes, state.absmax.numpy())
    _assert_same_f32(nested.nested_absmax, state.state2.absmax.numpy(), "nested absmax")
    _assert_same_f32(nested.offset, state.offset.numpy(), "offset")
    _assert_same_f32(nested.code, state.state2.code.numpy(), "nested code")
    assert nested.block_size == state.state2.blocksize == 256

    decoded = dequantize_absmax(codes, nested)
    expected = bnb_f.dequantize_blockwise(state.absmax, state.state2) + state.offset
    _assert_same_f32(decoded, expected.numpy(), "dequantized absmax")
    _assert_same_f32(
        dequantize_blockwise(packed, decoded, w.shape, bs),
        bnb_f.dequantize_4bit(packed_ref, state).numpy(),
        "dequantized weight",
    )


def test_default_offset_is_single_thread_torch_mean(torch):
    absmax = np.abs(np.random.default_rng(3).standard_normal(70000)).astype(np.float32)
    _, nested = quantize_absmax(absmax)
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = torch.from_numpy(absmax).mean().numpy()
    finally:
        torch.set_num_threads(saved)
    _assert_same_f32(nested.offset, expected, "default offset")


# ---------------------------------------------------------------------------------------------------------
# the nested quantizer alone, every nested block size, crafted absmax


def _crafted_absmax(kind: str, n: int) -> np.ndarray:
    rng = np.random.default_rng(n)
    if kind == "normal":
        return (np.abs(rng.standard_normal(n)) * 0.05).astype(np.float32)
    if kind == "constant":  # every entry equals the mean: all nested blocks are zero
        return np.full(n, 0.5, np.float32)
    if kind == "one_constant_block":
        a = (np.abs(rng.standard_normal(n)) * 0.05).astype(np.float32)
        a[: min(n, 256)] = 0.0
        return a
    if kind == "wide_range":
        return (10.0 ** rng.uniform(-6, 2, n)).astype(np.float32)
    raise AssertionError(kind)


_NESTED = [
    (kind, n, bs)
    for kind in ("normal", "constant", "one_constant_block", "wide_range")
    for n, bs in ((1, 256), (5, 64), (256, 256), (300, 128), (1000, 256), (4097, 4096), (20000, 64))
]


@pytest.mark.parametrize(("kind", "n", "bs"), _NESTED, ids=[f"{k}-{n}-nbs{b}" for k, n, b in _NESTED])
def test_quantize_absmax_matches_bitsandbytes(bnb_f, torch, kind, n, bs):
    absmax = _crafted_absmax(kind, n)
    q_ref, state2, offset_ref, decoded_ref = _bnb_nested(bnb_f, torch, absmax, bs)
    codes, nested = quantize_absmax(absmax, bs, offset=_offset_like_torch(torch, absmax))
    assert codes.dtype == np.uint8 and codes.shape == (n,)
    assert np.array_equal(codes, q_ref)
    _assert_same_f32(nested.nested_absmax, state2.absmax.numpy(), "nested absmax")
    _assert_same_f32(nested.offset, offset_ref, "offset")
    _assert_same_f32(dequantize_absmax(codes, nested), decoded_ref, "dequantized absmax")
    if kind == "constant":
        assert not nested.nested_absmax.any() and not codes.any()


def test_every_lookup_bin_matches_bitsandbytes(bnb_f, torch):
    """Feed each of the 65536 bin centres and the float32 neighbours of every bin edge and code midpoint."""
    f32 = np.float32
    centres = f32(-1) + (f32(2) * np.arange(65536, dtype=f32)) / f32(65535)
    edges = ((np.arange(65535) + 0.5) / 65535 * 2 - 1).astype(f32)
    mids = f32(0.5) * (DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:])
    values = [centres]
    for v in (edges, mids):
        values += [v, np.nextafter(v, f32(2)), np.nextafter(v, f32(-2))]
    values = np.clip(np.concatenate(values), f32(-1), f32(1))
    # blocks of 4096 that each start with 1.0, so every block's absmax is 1 and the scaled value is exact;
    # the last block is partial (its tail runs through bitsandbytes' scalar path)
    body = [values[k : k + 4095] for k in range(0, values.size, 4095)]
    x = np.concatenate([np.concatenate([[f32(1)], part]) for part in body]).astype(f32)
    assert x.size % 4096 % 8 != 0
    q_ref, state = bnb_f.quantize_blockwise(torch.from_numpy(x), blocksize=4096)
    assert np.all(state.absmax.numpy() == 1)
    assert np.array_equal(_lut_codes(x, np.ones_like(x)), q_ref.numpy())


# ---------------------------------------------------------------------------------------------------------
# API and errors (no bitsandbytes needed)


def test_dequantize_is_multiply_then_add():
    nested = NestedAbsmax(np.array([3.0, 0.5], np.float32), DYNAMIC_CODE.copy(), np.float32(0.1), 16)
    codes = np.arange(0, 255, 15, dtype=np.uint8)[:17]
    got = dequantize_absmax(codes, nested)
    scale = np.where(np.arange(codes.size) < 16, np.float32(3.0), np.float32(0.5)).astype(np.float32)
    expected = (DYNAMIC_CODE[codes] * scale).astype(np.float32) + np.float32(0.1)
    assert got.dtype == np.float32
    _assert_same_f32(got, expected, "decode")


def test_roundtrip_error_is_small():
    absmax = (np.abs(np.random.default_rng(0).standard_normal(5000)) * 0.03).astype(np.float32)
    codes, nested = quantize_absmax(absmax)
    err = np.abs(dequantize_absmax(codes, nested) - absmax)
    spread = np.abs(absmax - nested.offset).max()
    assert err.max() <= 0.01 * spread
    assert nested.nested_absmax.shape == (20,) and nested.code.shape == (256,)
    assert nested.nbytes == 20 * 4 + 256 * 4 + 4


@pytest.mark.parametrize("bad", [np.zeros(0, np.float32), np.array([1.0, np.nan], np.float32), np.array([np.inf])])
def test_quantize_absmax_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        quantize_absmax(bad)


def test_quantize_absmax_rejects_non_float():
    with pytest.raises(TypeError):
        quantize_absmax(np.arange(10, dtype=np.int32))


@pytest.mark.parametrize("bs", [0, 8, 100, 255])
def test_quantize_absmax_rejects_bad_block_size(bs):
    with pytest.raises(ValueError, match="block_size"):
        quantize_absmax(np.ones(10, np.float32), bs)


def test_dequantize_absmax_checks_inputs():
    codes, nested = quantize_absmax(np.linspace(0.1, 1, 600, dtype=np.float32))
    with pytest.raises(TypeError):
        dequantize_absmax(codes.astype(np.int16), nested)
    with pytest.raises(ValueError, match="nested_absmax"):
        dequantize_absmax(codes[:200], nested)
    short = NestedAbsmax(nested.nested_absmax, nested.code[:128], nested.offset, nested.block_size)
    with pytest.raises(ValueError, match="256"):
        dequantize_absmax(codes, short)


def test_lut_codes_match_float32_arithmetic_without_overflowing():
    """Scales whose float32 reciprocal overflows (zero, subnormal) give the codes float32 arithmetic gives."""
    import warnings

    from onnx_nf4.codec.double_quant import _DYNAMIC_LUT, _LUT_BINS, _lut_codes

    f32 = np.float32
    rng = np.random.default_rng(7)
    edge = np.float32(1) / np.finfo(np.float32).max  # around the smallest scale with a finite reciprocal
    near = [np.nextafter(edge, f32(0)), edge, np.nextafter(edge, f32(1)), np.nextafter(np.nextafter(edge, 1), 1)]
    scales = np.concatenate(
        [
            rng.standard_normal(4000).astype(f32) ** 2,
            (rng.random(4000) * 1e-38).astype(f32),  # subnormal
            np.array([0, 1e-45, 3e38, *near], dtype=f32),
        ]
    )
    centered = (rng.uniform(-1, 1, scales.size).astype(f32) * scales).astype(f32)
    centered[::5] = 0
    centered[1::7] = scales[1::7]
    centered[2::7] = -scales[2::7]
    with np.errstate(all="ignore"):  # the float32 computation as bitsandbytes does it
        s = np.clip(centered * (f32(1) / scales), f32(-1), f32(1))
        t = (s + f32(1)) * f32(0.5) * f32(_LUT_BINS - 1) + f32(0.5)
        expected = _DYNAMIC_LUT[np.nan_to_num(t, nan=0.0).astype(np.int32)]
    expected[scales == 0] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(_lut_codes(centered, scales), expected)


def test_mean_of_values_near_the_float32_limit():
    import warnings

    from onnx_nf4.codec.double_quant import quantize_absmax, torch_mean_f32

    x = np.full(1000, 3e38, np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch_mean_f32(x) == np.float32(3e38)  # torch's float32 sum overflows to inf here
        _, nested = quantize_absmax(x)
    assert nested.offset == np.float32(3e38) and np.isfinite(nested.nested_absmax).all()
