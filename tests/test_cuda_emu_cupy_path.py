"""The CuPy path (``onnx_nf4.op.cupy_backend.matmul_nf4`` and its ``MatMulNF4`` for the reference evaluator) end to
end under the CUDA emulation: the real argument validation, planning and kernel-argument marshalling of both
backends (``nvrtc``: ``RawModule`` launches with the arguments ``_launch_nvrtc`` packs; ``library``: the
``onnx_nf4_cuda_matmul`` entry point ``_launch_library`` calls), with the kernels run by the emulator on host
memory standing for device memory (tests/cuda_emu.py's ``EmulatedCupy``), against the numpy reference. Only NVRTC
itself is not exercised (tests/test_cuda_source.py compiles the source with it)."""

from __future__ import annotations

import sys

import ml_dtypes
import numpy as np
import pytest
from cuda_emu import EmulatedCupy, emulator, host
from gpu_cases import CASES, KERNELS, assert_close, attrs, case_id, problem, weight_arrays
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnx_nf4.op import cupy_backend as cb


@pytest.fixture
def cupy(monkeypatch):
    fake = EmulatedCupy(emulator())
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(cb, "_modules", {})
    monkeypatch.setattr(cb, "_sm_counts", {})
    monkeypatch.setattr(cb, "_library_entry", fake.library_entry)
    return fake


def _storage(x: np.ndarray | None):
    """A device-array stand-in; bfloat16 as its uint16 bit patterns (CuPy has no bfloat16)."""
    if x is None:
        return None
    return host(x.view(np.uint16) if x.dtype == ml_dtypes.bfloat16 else x)


@pytest.mark.parametrize("backend", ["nvrtc", "library"])
@pytest.mark.parametrize(("dtype", "algo"), KERNELS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cupy_path_matches_reference(cupy, case, dtype, algo, backend):
    q, a, bias, ref = problem(case, dtype)
    bf16 = dtype == "bfloat16"
    y = cb.matmul_nf4(_storage(a), *[_storage(w) for w in weight_arrays(q)], _storage(bias), **attrs(q), algo=algo,
                      backend=backend, bfloat16=bf16)  # fmt: skip
    y = np.asarray(y).view(ml_dtypes.bfloat16) if bf16 else np.asarray(y)
    assert_close(y.view(np.ndarray), ref, q, a, dtype)
    M = int(np.prod(a.shape[:-1]))
    plan = cb.plan_launches(dtype, M, q.K, q.N, q.block_size, algo=algo, sm_count=cupy.sm_count)
    assert cupy.kernels == [launch.kernel for launch in plan]


def test_reference_evaluator_op_runs_the_kernels(cupy):
    q, a, bias, ref = problem(CASES[1], "float16")
    names = ["B", "absmax", "nested_absmax", "nested_code", "absmax_offset", "bias"]
    values = [*weight_arrays(q), bias]
    inits = [numpy_helper.from_array(v, n) for n, v in zip(names, values, strict=True) if v is not None]
    node = helper.make_node("MatMulNF4", ["A", "B", "absmax", "", "", "", "bias"], ["Y"], domain="onnx_nf4", **attrs(q))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", 10, None)],
                              [helper.make_tensor_value_info("Y", 10, None)], inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("onnx_nf4", 1)])
    (y,) = ReferenceEvaluator(model, new_ops=[cb.MatMulNF4]).run(None, {"A": a})
    assert_close(y, ref, q, a, "float16")
    assert cupy.kernels == ["onnx_nf4::gpu::nf4_gemv_mma<onnx_nf4::gpu::f16, 8>"]
