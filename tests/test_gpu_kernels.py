"""The CUDA kernels on a GPU against the numpy reference (``onnx_nf4.op.reference.matmul_nf4``).

Three ways in, each on the shape matrix of the CPU op (K not a multiple of the block, K < block, N = 1, M in
{0, 1, 3, 17, 128}, batched 3-D A, float16 and bfloat16 A, bias, double quantization, zero blocks) plus shapes
that exercise split-K, several row tiles and the unaligned load paths:

* the CuPy path (``backend="nvrtc"``: ``matmul_nf4.cu`` compiled by NVRTC);
* the compiled library through its CUDA entry point (``backend="library"``, CuPy device pointers);
* the library through onnxruntime's CUDA execution provider (when onnxruntime-gpu is installed).

Each kernel family is forced in turn (``simt``: CUDA cores, every dtype; ``mma``: tensor cores, 16-bit dtypes).
Skipped without CuPy or without a GPU; tests/test_cuda_emu_kernels.py runs the same matrix on the CPU under the
CUDA emulation in every test run.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from gpu_cases import CASES, DTYPES, KERNELS, assert_close, attrs, case_id, problem, weight_arrays
from onnx import TensorProto, helper, numpy_helper

import onnx_nf4
from onnx_nf4.op import cupy_backend as cb

cupy = pytest.importorskip("cupy")
if not cupy.is_available():
    pytest.skip("no CUDA GPU", allow_module_level=True)

pytestmark = pytest.mark.gpu


def _device(x: np.ndarray | None):
    if x is None:
        return None
    return cupy.asarray(x.view(np.uint16) if x.dtype == ml_dtypes.bfloat16 else x)


def _to_host(y, dtype: str) -> np.ndarray:
    out = cupy.asnumpy(y)
    return out.view(ml_dtypes.bfloat16) if dtype == "bfloat16" else out


@pytest.mark.parametrize("backend", ["nvrtc", "library"])
@pytest.mark.parametrize(("dtype", "algo"), KERNELS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_kernels_match_reference(case, dtype, algo, backend):
    if backend == "library":
        try:
            cb._library_entry()
        except (FileNotFoundError, RuntimeError) as exc:
            pytest.skip(str(exc))
    q, a, bias, ref = problem(case, dtype)
    weights = [_device(v) for v in weight_arrays(q)]
    y = cb.matmul_nf4(
        _device(a), *weights, _device(bias), **attrs(q), algo=algo, backend=backend, bfloat16=dtype == "bfloat16"
    )
    cupy.cuda.get_current_stream().synchronize()
    assert_close(_to_host(y, dtype), ref, q, a, dtype)


def test_auto_picks_a_kernel_per_dtype():
    case = CASES[5]
    for dtype in DTYPES:
        q, a, bias, ref = problem(case, dtype)
        y = cb.matmul_nf4(_device(a), *[_device(v) for v in weight_arrays(q)], _device(bias), **attrs(q),
                          bfloat16=dtype == "bfloat16")  # fmt: skip
        assert_close(_to_host(y, dtype), ref, q, a, dtype)


def test_torch_tensors_in_and_out():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("this torch has no CUDA")
    q, a, bias, ref = problem(CASES[7], "bfloat16")
    dev = torch.device("cuda")
    a_t = torch.from_numpy(a.view(np.int16)).to(dev).view(torch.bfloat16)
    weights = [None if v is None else torch.from_numpy(v).to(dev) for v in weight_arrays(q)]
    bias_t = torch.from_numpy(bias.view(np.int16)).to(dev).view(torch.bfloat16)
    y = cb.matmul_nf4(a_t, *weights, bias_t, **attrs(q))
    assert isinstance(y, torch.Tensor) and y.dtype == torch.bfloat16 and y.is_cuda
    torch.cuda.synchronize()
    assert_close(y.view(torch.int16).cpu().numpy().view(ml_dtypes.bfloat16), ref, q, a, "bfloat16")


def test_reference_evaluator_op_runs_on_the_gpu():
    from onnx.reference import ReferenceEvaluator

    q, a, bias, ref = problem(CASES[1], "float16")
    session = ReferenceEvaluator(_model(q, "float16", bias), new_ops=[cb.MatMulNF4])
    for _ in range(2):  # the second run reuses the device copies of the weights
        (y,) = session.run(None, {"A": a})
        assert_close(y, ref, q, a, "float16")


def _model(q: onnx_nf4.QuantizedWeight, dtype: str, bias: np.ndarray | None, float32_io: bool = False):
    """One MatMulNF4 node over the weight of q; with float32_io, A and Y are float32 and cast around the node."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(DTYPES[dtype]))
    names = ["B", "absmax", "nested_absmax", "nested_code", "absmax_offset", "bias"]
    values = [*weight_arrays(q), bias]
    inits = [numpy_helper.from_array(v, n) for n, v in zip(names, values, strict=True) if v is not None]
    inputs = ["A_t" if float32_io else "A"] + [n if v is not None else "" for n, v in zip(names, values, strict=True)]
    while inputs[-1] == "":
        inputs.pop()
    nodes = [helper.make_node("MatMulNF4", inputs, ["Y_t" if float32_io else "Y"], domain="onnx_nf4", **attrs(q))]
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
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_onnxruntime_cuda_execution_provider(case, dtype):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDA execution provider (install onnxruntime-gpu)")
    from onnx_nf4.runtime import CustomOpLibraryNotFoundError, session_options

    try:
        options = session_options()
    except CustomOpLibraryNotFoundError as exc:
        pytest.skip(str(exc))
    q, a, bias, ref = problem(case, dtype)
    bf16 = dtype == "bfloat16"  # onnxruntime's Python API cannot feed bfloat16: cast inside the graph
    model = _model(q, dtype, bias, float32_io=bf16)
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CUDAExecutionProvider"])
    (y,) = sess.run(None, {"A": a.astype(np.float32) if bf16 else a})
    assert_close(y.astype(DTYPES[dtype]) if bf16 else y, ref, q, a, dtype)
