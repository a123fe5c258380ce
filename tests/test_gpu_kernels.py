"""The CUDA kernels on a GPU against the numpy reference (``onnx_nf4.op.reference.matmul_nf4``).

Three ways in, each on the shape matrix of the CPU op (K not a multiple of the block, K < block, N = 1, M in
{0, 1, 3, 17, 128}, batched 3-D A, float16 and bfloat16 A, bias, double quantization, zero blocks) plus shapes
that exercise split-K, several row tiles and the unaligned load paths:

* the CuPy path (``backend="nvrtc"``: ``matmul_nf4.cu`` compiled by NVRTC);
* the compiled library through its CUDA entry point (``backend="library"``, CuPy device pointers);
* the library through onnxruntime's CUDA execution provider (when onnxruntime-gpu is installed).

Each kernel family is forced in turn (``simt``: CUDA cores, every dtype; ``mma``: tensor cores, 16-bit dtypes).
Skipped without CuPy or without a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_nf4
from onnx_nf4.op import cupy_backend as cb
from onnx_nf4.op.reference import matmul_nf4 as reference_matmul

cupy = pytest.importorskip("cupy")
if not cupy.is_available():
    pytest.skip("no CUDA GPU", allow_module_level=True)
ml_dtypes = pytest.importorskip("ml_dtypes")

pytestmark = pytest.mark.gpu

F32_EPS = 2.0**-23
# Per-term error of the tensor-core path beyond float32 rounding: the two-term split of each NF4 value
# (2^-23.2 relative for float16, 2^-17.5 for bfloat16; docs/gpu.md), rounded up.
SPLIT_ERROR = {"float32": 0.0, "float16": 2.0**-22, "bfloat16": 2.0**-16}
MANTISSA_BITS = {"float32": 23, "float16": 10, "bfloat16": 7}
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}

# (K, N, block_size, A shape, double_quant, zero_blocks, bias)
CASES = [
    (64, 8, 64, [1, 64], False, False, False),
    (100, 7, 32, [3, 100], False, False, True),  # K not a multiple of the block size
    (40, 5, 64, [17, 40], True, False, False),  # K < block size
    (300, 1, 64, [17, 300], False, False, True),  # N = 1
    (256, 96, 16, [20, 256], True, True, False),  # smallest block, zero blocks
    (1000, 33, 128, [128, 1000], False, True, True),
    (520, 70, 4096, [3, 520], True, False, False),  # largest block
    (128, 40, 64, [2, 3, 128], False, False, True),  # batched 3-D A
    (96, 24, 32, [0, 96], False, False, False),  # M = 0
    (72, 50, 16, [5, 72], True, False, True),  # rows of 40 bytes: 8-byte loads
    (37, 19, 32, [9, 37], False, False, True),  # odd K: unaligned activation rows
    (4096, 64, 64, [1, 4096], True, False, False),  # split-K across 8 warps
    (2048, 300, 256, [33, 2048], False, False, True),  # 3 row tiles of 16
]


def _case_id(case) -> str:
    K, N, bs, shape, dq, zero, bias = case
    flags = "".join(f for f, on in (("-dq", dq), ("-zero", zero), ("-bias", bias)) if on)
    return f"K{K}-N{N}-bs{bs}-A{'x'.join(map(str, shape))}{flags}"


def _weight(K: int, N: int, bs: int, dq: bool, zero: bool, seed: int = 0) -> onnx_nf4.QuantizedWeight:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((K, N)) * 0.05).astype(np.float32)
    if zero:
        w[: min(K, bs), :] = 0.0
        w[:, N // 2] = 0.0
    return onnx_nf4.quantize_weight(w, bs, double_quant=dq)


def _weight_arrays(q: onnx_nf4.QuantizedWeight) -> list[np.ndarray | None]:
    n = q.nested
    if n is None:
        return [q.packed, q.absmax, None, None, None]
    return [q.packed, q.absmax, n.nested_absmax, n.code, np.asarray(n.offset, np.float32)]


def _attrs(q: onnx_nf4.QuantizedWeight) -> dict[str, int]:
    nbs = 256 if q.nested is None else q.nested.block_size
    return {"K": q.K, "N": q.N, "block_size": q.block_size, "nested_block_size": nbs}


def _assert_close(y: np.ndarray, ref: np.ndarray, q: onnx_nf4.QuantizedWeight, a: np.ndarray, dtype: str) -> None:
    """Both sides round their float32 results once to T: they may differ by the float32 results' difference
    (bounded by the dot-product error of both plus the split error) and one ulp of T."""
    assert y.shape == ref.shape and y.dtype == ref.dtype
    bound = np.abs(a.astype(np.float64)) @ np.abs(onnx_nf4.dequantize_weight(q).astype(np.float64))
    ref64, y64 = ref.astype(np.float64), y.astype(np.float64)
    ulp = np.abs(ref64) * 2.0 ** -MANTISSA_BITS[dtype] + 1e-30
    tol = (2 * q.K * F32_EPS + 2 * SPLIT_ERROR[dtype]) * bound + (ulp if dtype != "float32" else 0)
    err = np.abs(y64 - ref64)
    assert (err <= tol + 1e-30).all(), (
        f"max error {err.max():.3e}, worst ratio to bound {(err / (tol + 1e-30)).max():.2f}"
    )


def _problem(case, dtype: str, seed: int = 1):
    K, N, bs, shape, dq, zero, with_bias = case
    q = _weight(K, N, bs, dq, zero)
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape).astype(np.float32).astype(DTYPES[dtype])
    bias = (rng.standard_normal(N) * 0.1).astype(np.float32).astype(DTYPES[dtype]) if with_bias else None
    ref = reference_matmul(a, *_weight_arrays(q), bias, **_attrs(q))
    return q, a, bias, ref


def _device(x: np.ndarray | None):
    if x is None:
        return None
    return cupy.asarray(x.view(np.uint16) if x.dtype == ml_dtypes.bfloat16 else x)


def _to_host(y, dtype: str) -> np.ndarray:
    out = cupy.asnumpy(y)
    return out.view(ml_dtypes.bfloat16) if dtype == "bfloat16" else out


KERNELS = [("float32", "simt"), ("float16", "simt"), ("float16", "mma"), ("bfloat16", "simt"), ("bfloat16", "mma")]


@pytest.mark.parametrize("backend", ["nvrtc", "library"])
@pytest.mark.parametrize(("dtype", "algo"), KERNELS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kernels_match_reference(case, dtype, algo, backend):
    if backend == "library":
        try:
            cb._library_entry()
        except (FileNotFoundError, RuntimeError) as exc:
            pytest.skip(str(exc))
    q, a, bias, ref = _problem(case, dtype)
    weights = [_device(v) for v in _weight_arrays(q)]
    y = cb.matmul_nf4(
        _device(a), *weights, _device(bias), **_attrs(q), algo=algo, backend=backend, bfloat16=dtype == "bfloat16"
    )
    cupy.cuda.get_current_stream().synchronize()
    _assert_close(_to_host(y, dtype), ref, q, a, dtype)


def test_auto_picks_a_kernel_per_dtype():
    case = CASES[5]
    for dtype in DTYPES:
        q, a, bias, ref = _problem(case, dtype)
        y = cb.matmul_nf4(_device(a), *[_device(v) for v in _weight_arrays(q)], _device(bias), **_attrs(q),
                          bfloat16=dtype == "bfloat16")  # fmt: skip
        _assert_close(_to_host(y, dtype), ref, q, a, dtype)


def test_torch_tensors_in_and_out():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("this torch has no CUDA")
    q, a, bias, ref = _problem(CASES[7], "bfloat16")
    dev = torch.device("cuda")
    a_t = torch.from_numpy(a.view(np.int16)).to(dev).view(torch.bfloat16)
    weights = [None if v is None else torch.from_numpy(v).to(dev) for v in _weight_arrays(q)]
    bias_t = torch.from_numpy(bias.view(np.int16)).to(dev).view(torch.bfloat16)
    y = cb.matmul_nf4(a_t, *weights, bias_t, **_attrs(q))
    assert isinstance(y, torch.Tensor) and y.dtype == torch.bfloat16 and y.is_cuda
    torch.cuda.synchronize()
    _assert_close(y.view(torch.int16).cpu().numpy().view(ml_dtypes.bfloat16), ref, q, a, "bfloat16")


def test_reference_evaluator_op_runs_on_the_gpu():
    from onnx.reference import ReferenceEvaluator

    q, a, bias, ref = _problem(CASES[1], "float16")
    session = ReferenceEvaluator(_model(q, "float16", bias), new_ops=[cb.MatMulNF4])
    for _ in range(2):  # the second run reuses the device copies of the weights
        (y,) = session.run(None, {"A": a})
        _assert_close(y, ref, q, a, "float16")


def _model(q: onnx_nf4.QuantizedWeight, dtype: str, bias: np.ndarray | None, float32_io: bool = False):
    """One MatMulNF4 node over the weight of q; with float32_io, A and Y are float32 and cast around the node."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(DTYPES[dtype]))
    names = ["B", "absmax", "nested_absmax", "nested_code", "absmax_offset", "bias"]
    values = [*_weight_arrays(q), bias]
    inits = [numpy_helper.from_array(v, n) for n, v in zip(names, values, strict=True) if v is not None]
    inputs = ["A_t" if float32_io else "A"] + [n if v is not None else "" for n, v in zip(names, values, strict=True)]
    while inputs[-1] == "":
        inputs.pop()
    nodes = [helper.make_node("MatMulNF4", inputs, ["Y_t" if float32_io else "Y"], domain="onnx_nf4", **_attrs(q))]
    io = elem
    if float32_io:
        io = TensorProto.FLOAT
        nodes = [
            helper.make_node("Cast", ["A"], ["A_t"], to=elem),
            *nodes,
            helper.make_node("Cast", ["Y_t"], ["Y"], to=io),
        ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("A", io, None)],
        [helper.make_tensor_value_info("Y", io, None)],
        inits,
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("onnx_nf4", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_onnxruntime_cuda_execution_provider(case, dtype):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDA execution provider (install onnxruntime-gpu)")
    from onnx_nf4.runtime import CustomOpLibraryNotFoundError, session_options

    try:
        options = session_options()
    except CustomOpLibraryNotFoundError as exc:
        pytest.skip(str(exc))
    q, a, bias, ref = _problem(case, dtype)
    bf16 = dtype == "bfloat16"  # onnxruntime's Python API cannot feed bfloat16: cast inside the graph
    model = _model(q, dtype, bias, float32_io=bf16)
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CUDAExecutionProvider"])
    (y,) = sess.run(None, {"A": a.astype(np.float32) if bf16 else a})
    _assert_close(y.astype(DTYPES[dtype]) if bf16 else y, ref, q, a, dtype)
