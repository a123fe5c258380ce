"""Tiny ONNX model builders shared by the tests (every weight is seeded, so every model is deterministic).

Each builder returns an ``onnx.ModelProto`` at opset 18 (IR 10) with a float activation input ``"A"`` of shape
``["M", K]`` (``["M", K]`` or a given shape), and names its weights and nodes so that tests can refer to them.
:func:`run_reference` evaluates a model with ``onnx.reference`` and the ``MatMulNF4`` reference op;
:func:`reference_matmul` is the reference product with a :class:`~onnx_nf4.codec.layout.QuantizedWeight`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_nf4.codec.layout import QuantizedWeight, dequantize_weight

OPSET = 18
IR_VERSION = 10


def weight(shape: Sequence[int], *, seed: int = 0, dtype: type = np.float32) -> np.ndarray:
    """A normal(0, 0.05) weight of ``shape`` (as the linear layers of a trained model roughly look)."""
    return (np.random.default_rng(seed).standard_normal(shape) * 0.05).astype(dtype)


def activations(shape: Sequence[int], *, seed: int = 1, dtype: type = np.float32) -> np.ndarray:
    """A normal(0, 1) activation tensor of ``shape``."""
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _elem_type(dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: Sequence[onnx.TensorProto] = (),
    *,
    opsets: Sequence[tuple[str, int]] = (),
) -> onnx.ModelProto:
    """A model of one graph named ``"g"``, checked with ``onnx.checker.check_model(full_check=True)``."""
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), list(initializers))
    opset_imports = [helper.make_opsetid("", OPSET)] + [helper.make_opsetid(d, v) for d, v in opsets]
    model = helper.make_model(graph, opset_imports=opset_imports, ir_version=IR_VERSION)
    onnx.checker.check_model(model, full_check=True)
    return model


def tensor_info(name: str, dtype, shape: Sequence[int | str | None] | None) -> onnx.ValueInfoProto:
    """A tensor value info (``shape=None``: unknown rank)."""
    return helper.make_tensor_value_info(name, _elem_type(dtype), None if shape is None else list(shape))


def matmul_model(
    K: int = 128,
    N: int = 64,
    *,
    dtype: type = np.float32,
    a_shape: Sequence[int | str] | None = None,
    constant_node: bool = False,
    bias: str | None = None,
    seed: int = 0,
) -> onnx.ModelProto:
    """``Y = A @ W`` with ``W[K, N]`` named ``"W"`` (an initializer, or a ``Constant`` node's output).

    ``bias``: ``None``; ``"add"`` adds ``Add(MatMul, b)``; ``"add_swapped"`` adds ``Add(b, MatMul)``
    (``b`` is the ``[N]`` initializer ``"b"``). The MatMul node is ``"mm"``, the Add node ``"add"``.
    """
    a_shape = ["M", K] if a_shape is None else list(a_shape)
    w = weight((K, N), seed=seed, dtype=dtype)
    inits, nodes = [], []
    if constant_node:
        nodes.append(helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w, "W"), name="const_W"))
    else:
        inits.append(numpy_helper.from_array(w, "W"))
    out_shape = [*a_shape[:-1], N]
    if bias is None:
        nodes.append(helper.make_node("MatMul", ["A", "W"], ["Y"], name="mm"))
    else:
        inits.append(numpy_helper.from_array(weight((N,), seed=seed + 100, dtype=dtype), "b"))
        nodes.append(helper.make_node("MatMul", ["A", "W"], ["mm_out"], name="mm"))
        operands = ["mm_out", "b"] if bias == "add" else ["b", "mm_out"]
        nodes.append(helper.make_node("Add", operands, ["Y"], name="add"))
    return make_model(nodes, [tensor_info("A", dtype, a_shape)], [tensor_info("Y", dtype, out_shape)], inits)


def gemm_model(
    K: int = 128,
    N: int = 64,
    M: int = 5,
    *,
    trans_a: int = 0,
    trans_b: int = 0,
    alpha: float = 1.0,
    beta: float = 1.0,
    c_shape: Sequence[int] | None = (64,),
    c_input: bool = False,
    seed: int = 0,
) -> onnx.ModelProto:
    """``Y = alpha * A' @ B' + beta * C`` (node ``"gemm"``, weight ``"W"``).

    ``B`` is ``[K, N]`` (``trans_b=0``) or ``[N, K]`` (``trans_b=1``); ``A`` is ``[M, K]`` or ``[K, M]``
    (``trans_a=1``). ``C`` is the initializer ``"C"`` of ``c_shape`` (``None``: no C), or the graph input
    ``"C"`` when ``c_input``.
    """
    w = weight((N, K) if trans_b else (K, N), seed=seed)
    inits = [numpy_helper.from_array(w, "W")]
    inputs = [tensor_info("A", np.float32, [K, M] if trans_a else [M, K])]
    node_inputs = ["A", "W"]
    if c_shape is not None:
        if c_input:
            inputs.append(tensor_info("C", np.float32, list(c_shape)))
        else:
            inits.append(numpy_helper.from_array(weight(c_shape, seed=seed + 100), "C"))
        node_inputs.append("C")
    node = helper.make_node(
        "Gemm", node_inputs, ["Y"], name="gemm", transA=trans_a, transB=trans_b, alpha=alpha, beta=beta
    )
    return make_model([node], inputs, [tensor_info("Y", np.float32, [M, N])], inits)


def shared_weight_model(K: int = 128, N: int = 64) -> onnx.ModelProto:
    """Two MatMuls ``"mm1"``, ``"mm2"`` of one weight ``"W"``: ``Y1 = A @ W``, ``Y2 = (A * 2) @ W``."""
    nodes = [
        helper.make_node("MatMul", ["A", "W"], ["Y1"], name="mm1"),
        helper.make_node("Add", ["A", "A"], ["A2"], name="double"),
        helper.make_node("MatMul", ["A2", "W"], ["Y2"], name="mm2"),
    ]
    outputs = [tensor_info("Y1", np.float32, ["M", N]), tensor_info("Y2", np.float32, ["M", N])]
    inits = [numpy_helper.from_array(weight((K, N)), "W")]
    return make_model(nodes, [tensor_info("A", np.float32, ["M", K])], outputs, inits)


def matmul_output_reused_model(K: int = 128, N: int = 64) -> onnx.ModelProto:
    """``mm_out = A @ W`` is both added to ``b`` (``Y``) and a graph output itself (``Z = mm_out`` via Relu)."""
    nodes = [
        helper.make_node("MatMul", ["A", "W"], ["mm_out"], name="mm"),
        helper.make_node("Add", ["mm_out", "b"], ["Y"], name="add"),
        helper.make_node("Relu", ["mm_out"], ["Z"], name="relu"),
    ]
    inits = [numpy_helper.from_array(weight((K, N)), "W"), numpy_helper.from_array(weight((N,), seed=5), "b")]
    outputs = [tensor_info("Y", np.float32, ["M", N]), tensor_info("Z", np.float32, ["M", N])]
    return make_model(nodes, [tensor_info("A", np.float32, ["M", K])], outputs, inits)


def skipped_cases_model(K: int = 128, N: int = 64) -> onnx.ModelProto:
    """Four MatMuls that must be left alone: ``"dynamic"`` (B is the graph input ``"Bdyn"``), ``"batched"``
    (B is the 3-D initializer ``"W3"``), ``"integer"`` (int32 A and weight ``"Wint"``) and ``"double"``
    (float64 A and weight ``"Wdouble"``)."""
    nodes = [
        helper.make_node("MatMul", ["A", "Bdyn"], ["Y1"], name="dynamic"),
        helper.make_node("MatMul", ["A", "W3"], ["Y2"], name="batched"),
        helper.make_node("MatMul", ["Aint", "Wint"], ["Y3"], name="integer"),
        helper.make_node("MatMul", ["Adouble", "Wdouble"], ["Y4"], name="double"),
    ]
    inits = [
        numpy_helper.from_array(weight((2, K, N)), "W3"),
        numpy_helper.from_array(np.arange(K * N, dtype=np.int32).reshape(K, N) % 7, "Wint"),
        numpy_helper.from_array(weight((K, N), dtype=np.float64), "Wdouble"),
    ]
    inputs = [
        tensor_info("A", np.float32, ["M", K]),
        tensor_info("Bdyn", np.float32, [K, N]),
        tensor_info("Aint", np.int32, ["M", K]),
        tensor_info("Adouble", np.float64, ["M", K]),
    ]
    outputs = [
        tensor_info("Y1", np.float32, ["M", N]),
        tensor_info("Y2", np.float32, [2, "M", N]),
        tensor_info("Y3", np.int32, ["M", N]),
        tensor_info("Y4", np.float64, ["M", N]),
    ]
    return make_model(nodes, inputs, outputs, inits)


def chained_model(K: int = 128) -> onnx.ModelProto:
    """Rewrites that feed each other: ``h = A @ W1 + b1`` (a fusable Add) is the A of ``g = h @ W2`` and the C of
    ``Y = Gemm(g, W3, C=h)``."""
    nodes = [
        helper.make_node("MatMul", ["A", "W1"], ["mm1_out"], name="mm1"),
        helper.make_node("Add", ["mm1_out", "b1"], ["h"], name="add1"),
        helper.make_node("MatMul", ["h", "W2"], ["g"], name="mm2"),
        helper.make_node("Gemm", ["g", "W3", "h"], ["Y"], name="gemm", beta=0.5),
    ]
    inits = [
        numpy_helper.from_array(weight((K, K), seed=1), "W1"),
        numpy_helper.from_array(weight((K,), seed=2), "b1"),
        numpy_helper.from_array(weight((K, K), seed=3), "W2"),
        numpy_helper.from_array(weight((K, K), seed=4), "W3"),
    ]
    return make_model(nodes, [tensor_info("A", np.float32, [4, K])], [tensor_info("Y", np.float32, [4, K])], inits)


def _body_graph(name: str, nodes, inputs, outputs, inits=()) -> onnx.GraphProto:
    return helper.make_graph(list(nodes), name, list(inputs), list(outputs), list(inits))


def if_model(K: int = 128, N: int = 64) -> onnx.ModelProto:
    """``If(cond)``: the then-branch uses the outer initializer ``"W_outer"``, the else-branch its own
    initializer ``"W_else"``."""
    then_branch = _body_graph(
        "then",
        [helper.make_node("MatMul", ["A", "W_outer"], ["y_then"], name="mm_then")],
        [],
        [tensor_info("y_then", np.float32, ["M", N])],
    )
    else_branch = _body_graph(
        "else",
        [helper.make_node("MatMul", ["A", "W_else"], ["y_else"], name="mm_else")],
        [],
        [tensor_info("y_else", np.float32, ["M", N])],
        [numpy_helper.from_array(weight((K, N), seed=2), "W_else")],
    )
    node = helper.make_node("If", ["cond"], ["Y"], name="if", then_branch=then_branch, else_branch=else_branch)
    inputs = [tensor_info("A", np.float32, ["M", K]), tensor_info("cond", np.bool_, [])]
    inits = [numpy_helper.from_array(weight((K, N), seed=1), "W_outer")]
    return make_model([node], inputs, [tensor_info("Y", np.float32, ["M", N])], inits)


def loop_model(K: int = 128, trip_count: int = 3) -> onnx.ModelProto:
    """``Loop`` of ``trip_count`` iterations over ``x <- x @ W_loop`` (``W_loop[K, K]`` initializer of the body)."""
    body = _body_graph(
        "loop_body",
        [
            helper.make_node("MatMul", ["x_in", "W_loop"], ["x_out"], name="mm_loop"),
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="cond_pass"),
        ],
        [
            tensor_info("iter", np.int64, []),
            tensor_info("cond_in", np.bool_, []),
            tensor_info("x_in", np.float32, ["M", K]),
        ],
        [tensor_info("cond_out", np.bool_, []), tensor_info("x_out", np.float32, ["M", K])],
        [numpy_helper.from_array(weight((K, K), seed=3) * np.float32(2.0), "W_loop")],
    )
    nodes = [helper.make_node("Loop", ["trip", "keep_going", "A"], ["Y"], name="loop", body=body)]
    inits = [
        numpy_helper.from_array(np.array(trip_count, np.int64), "trip"),
        numpy_helper.from_array(np.array(True), "keep_going"),
    ]
    return make_model(nodes, [tensor_info("A", np.float32, ["M", K])], [tensor_info("Y", np.float32, ["M", K])], inits)


def scan_model(K: int = 128, N: int = 64) -> onnx.ModelProto:
    """``Scan`` over the rows of ``A[S, K]``: each ``row @ W_scan`` (a ``Constant`` node inside the body)
    is a scan output ``Y[S, N]``; the state ``acc[N]`` sums the rows' products."""
    w = weight((K, N), seed=4)
    body = _body_graph(
        "scan_body",
        [
            helper.make_node("Constant", [], ["W_scan"], value=numpy_helper.from_array(w, "W_scan"), name="const"),
            helper.make_node("MatMul", ["row", "W_scan"], ["prod"], name="mm_scan"),
            helper.make_node("Add", ["acc_in", "prod"], ["acc_out"], name="acc"),
            helper.make_node("Identity", ["prod"], ["prod_out"], name="emit"),
        ],
        [tensor_info("acc_in", np.float32, [N]), tensor_info("row", np.float32, [K])],
        [tensor_info("acc_out", np.float32, [N]), tensor_info("prod_out", np.float32, [N])],
    )
    nodes = [helper.make_node("Scan", ["acc0", "A"], ["acc", "Y"], name="scan", body=body, num_scan_inputs=1)]
    inits = [numpy_helper.from_array(np.zeros(N, np.float32), "acc0")]
    outputs = [tensor_info("acc", np.float32, [N]), tensor_info("Y", np.float32, ["S", N])]
    return make_model(nodes, [tensor_info("A", np.float32, ["S", K])], outputs, inits)


def run_reference(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """All outputs of ``model`` under ``onnx.reference.ReferenceEvaluator`` with the ``MatMulNF4`` op."""
    from onnx.reference import ReferenceEvaluator

    from onnx_nf4.op.reference import MatMulNF4

    return ReferenceEvaluator(model, new_ops=[MatMulNF4]).run(None, feeds)


def reference_matmul(q: QuantizedWeight, a: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """``onnx_nf4.op.reference.matmul_nf4`` of ``a`` with the NF4 weight ``q`` (``Y`` of ``a``'s dtype)."""
    from onnx_nf4.op.reference import matmul_nf4

    nested = q.nested
    return matmul_nf4(
        a,
        q.packed,
        q.absmax,
        None if nested is None else nested.nested_absmax,
        None if nested is None else nested.code,
        None if nested is None else np.asarray(nested.offset, np.float32).reshape(1),
        bias,
        K=q.K,
        N=q.N,
        block_size=q.block_size,
        nested_block_size=256 if nested is None else nested.block_size,
    )


F32_EPS = 2.0**-23  # float32 machine epsilon
F32_TINY = 2.0**-149  # float32's smallest subnormal: the step of its grid below 2^-126


def float32_tolerance(q: QuantizedWeight, a: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """The bound of ``docs/MatMulNF4.md`` on ``|Y - Y_ref|`` for float32 compute, in float64, shaped like ``Y``:
    ``2 K 2^-23 (|A| @ |W| + |bias|) + 2^-149 (K (1 + max_b |s[n, b]|) + sum_k |A[m, k]|)`` (reordered float32
    sums; products that fall below float32's normal range keep only their 2^-149 grid, a kernel that scales a
    block's sum of ``A * NF4[q]`` multiplies that rounding by the block's scale, and a weight ``W = fl32(NF4[q] *
    s)`` that is itself subnormal carries the reference's rounding of it times ``|A|``)."""
    a64 = np.abs(a.astype(np.float64)).reshape(-1, q.K)
    bound = a64 @ np.abs(dequantize_weight(q).astype(np.float64))
    if bias is not None:
        bound = bound + np.abs(bias.astype(np.float64))
    scale = np.abs(q.float_absmax().astype(np.float64)).max(axis=1)
    underflow = q.K * (1 + scale)[None, :] + a64.sum(axis=1, keepdims=True)
    return (2 * q.K * F32_EPS * bound + F32_TINY * underflow).reshape(*a.shape[:-1], q.N)
