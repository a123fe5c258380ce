"""Bad input to the C++ ``MatMulNF4`` CPU op: a clear onnxruntime error, never a crash or an out-of-bounds read.

Each case builds one node from raw tensors (so that sizes can disagree with the attributes) and checks the
error names the op, the node and the mismatch. Skipped without the compiled library.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper

import onnx_nf4
from onnx_nf4.runtime import CustomOpLibraryNotFoundError, custom_op_library, session_options

ort = pytest.importorskip("onnxruntime")
try:
    custom_op_library()
except CustomOpLibraryNotFoundError as exc:  # pragma: no cover - depends on the build
    pytest.skip(str(exc), allow_module_level=True)

from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state  # noqa: E402

# What onnxruntime raises for a failed session creation or run (each its own class, all plain Exceptions).
ORT_ERRORS = (
    _ort_state.Fail,
    _ort_state.InvalidArgument,
    _ort_state.InvalidGraph,
    _ort_state.NotImplemented,
    _ort_state.RuntimeException,
)

K, N, BS = 96, 8, 32
KB = K // BS


def _weight(double_quant: bool = False) -> onnx_nf4.QuantizedWeight:
    w = (np.random.default_rng(0).standard_normal((K, N)) * 0.05).astype(np.float32)
    return onnx_nf4.quantize_weight(w, BS, double_quant=double_quant)


def build(tensors: dict[str, np.ndarray | None], a_dtype=np.float32, a_shape=("M", "K"), **attrs) -> bytes:
    """A ``MatMulNF4`` node ``nf4`` whose inputs after ``A`` are the given initializers (``None``: omitted)."""
    order = ["B", "absmax", "nested_absmax", "nested_code", "absmax_offset", "bias"]
    given = [name for name in order if tensors.get(name) is not None]
    last = max((order.index(n) for n in given), default=-1)
    inputs = ["A"] + [name if tensors.get(name) is not None else "" for name in order[: last + 1]]
    inits = [numpy_helper.from_array(np.asarray(tensors[name]), name) for name in given]
    node_attrs = {"K": K, "N": N, "block_size": BS}
    node_attrs.update(attrs)
    node_attrs = {k: v for k, v in node_attrs.items() if v is not None}
    node = helper.make_node("MatMulNF4", inputs, ["Y"], domain="onnx_nf4", name="nf4", **node_attrs)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(a_dtype))
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("A", elem, None if a_shape is None else list(a_shape))],
        [helper.make_tensor_value_info("Y", elem, None)],
        inits,
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("onnx_nf4", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString()


def valid_tensors(double_quant: bool = False) -> dict[str, np.ndarray | None]:
    q = _weight(double_quant)
    t: dict[str, np.ndarray | None] = {"B": q.packed, "absmax": q.absmax}
    if q.nested is not None:
        t["nested_absmax"] = q.nested.nested_absmax
        t["nested_code"] = q.nested.code
        t["absmax_offset"] = np.asarray(q.nested.offset, dtype=np.float32)
    return t


def run(model: bytes, a: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model, session_options(intra_op_num_threads=1), providers=["CPUExecutionProvider"])
    return sess.run(None, {"A": a})[0]


def expect_error(model: bytes, a: np.ndarray, *fragments: str) -> None:
    with pytest.raises(ORT_ERRORS) as info:
        run(model, a)
    message = str(info.value)
    assert "MatMulNF4 node 'nf4'" in message, message
    for fragment in fragments:
        assert fragment in message, message


A = np.ones((2, K), dtype=np.float32)


def test_valid_models_run():
    """The baselines the cases below break: both absmax forms run."""
    for dq in (False, True):
        assert run(build(valid_tensors(dq)), A).shape == (2, N)


def test_a_last_dimension_differs_from_K():
    expect_error(build(valid_tensors()), np.ones((2, K + 1), dtype=np.float32), "last dimension 97", "K is 96")


def test_a_scalar():
    expect_error(build(valid_tensors(), a_shape=None), np.array(1.0, dtype=np.float32), "rank >= 1")


def test_b_wrong_dtype():
    t = valid_tensors()
    t["B"] = t["B"].astype(np.int8)
    expect_error(build(t), A, "input B must be uint8, got int8")


@pytest.mark.parametrize(
    "shape",
    [(N, KB, BS // 2 - 1), (N, KB - 1, BS // 2), (N + 1, KB, BS // 2), (N * KB * BS // 2,), (N, KB * BS // 2)],
)
def test_b_wrong_shape(shape):
    t = valid_tensors()
    t["B"] = np.zeros(shape, dtype=np.uint8)
    expect_error(build(t), A, "input B has shape", "expected [N, k_blocks, block_size / 2] = [8, 3, 16]")


@pytest.mark.parametrize("shape", [(N, KB - 1), (N * KB,), (N + 1, KB)])
def test_absmax_wrong_shape(shape):
    t = valid_tensors()
    t["absmax"] = np.ones(shape, dtype=np.float32)
    expect_error(build(t), A, "input absmax has shape", "[8, 3]")


def test_absmax_wrong_dtype():
    t = valid_tensors()
    t["absmax"] = t["absmax"].astype(np.float64)
    expect_error(build(t), A, "input absmax must be float or uint8, got double")


def test_uint8_absmax_without_nested_inputs():
    t = valid_tensors(double_quant=True)
    t["nested_code"] = None
    expect_error(build(t), A, "nested_absmax, nested_code and absmax_offset are not all given")


def test_float_absmax_with_nested_inputs():
    t = valid_tensors()
    t.update({k: v for k, v in valid_tensors(double_quant=True).items() if k.startswith(("nested", "absmax_"))})
    expect_error(build(t), A, "must be omitted")


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("nested_absmax", np.ones(2, dtype=np.float32), "input nested_absmax has shape [2], expected [1]"),
        ("nested_code", np.ones(255, dtype=np.float32), "input nested_code has shape [255], expected [256]"),
        ("nested_code", np.ones(256, dtype=np.float16), "input nested_code must be float, got float16"),
        ("absmax_offset", np.ones(2, dtype=np.float32), "input absmax_offset has shape [2], expected [1]"),
    ],
)
def test_nested_inputs_wrong(name, value, fragment):
    t = valid_tensors(double_quant=True)
    t[name] = value
    expect_error(build(t), A, fragment)


def test_nested_block_size_changes_expected_size():
    # 24 absmax entries in nested blocks of 16: 2 nested scales expected, the model holds 1
    expect_error(build(valid_tensors(double_quant=True), nested_block_size=16), A, "expected [2]")


def test_bias_wrong_shape_and_dtype():
    t = valid_tensors()
    t["bias"] = np.ones(N + 1, dtype=np.float32)
    expect_error(build(t), A, "input bias has shape [9], expected [N] = [8]")
    t["bias"] = np.ones(N, dtype=np.float16)
    with pytest.raises(ORT_ERRORS):  # T differs between A and bias: no kernel matches in onnxruntime
        run(build(t), A)


@pytest.mark.parametrize(
    ("attrs", "fragment"),
    [
        ({"block_size": 48}, "block_size must be a power of two in [16, 4096], got 48"),
        ({"block_size": 8}, "got 8"),
        ({"block_size": 8192}, "got 8192"),
        ({"K": 0}, "attribute K must be in [1, 2^31], got 0"),
        ({"N": -3}, "attribute N must be in [1, 2^31], got -3"),
        ({"K": None}, "missing required int attribute 'K'"),
        ({"nested_block_size": 100}, "nested_block_size must be a power of two >= 16, got 100"),
        ({"accuracy_level": 5}, "accuracy_level must be in [0, 4], got 5"),
    ],
)
def test_bad_attributes_fail_at_session_creation(attrs, fragment):
    model = build(valid_tensors(), **attrs)
    with pytest.raises(ORT_ERRORS) as info:
        ort.InferenceSession(model, session_options(), providers=["CPUExecutionProvider"])
    assert "MatMulNF4 node 'nf4'" in str(info.value) and fragment in str(info.value), str(info.value)


def test_unsupported_activation_type_is_an_error():
    model = build(valid_tensors(), a_dtype=np.float64)
    with pytest.raises(ORT_ERRORS):  # no MatMulNF4 kernel for double: onnxruntime refuses the model
        run(model, A.astype(np.float64))


def test_zero_rows():
    y = run(build(valid_tensors(double_quant=True)), np.zeros((0, K), dtype=np.float32))
    assert y.shape == (0, N)
