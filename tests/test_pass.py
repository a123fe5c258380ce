"""QuantizeNF4Pass / quantize_model: what is rewritten, what is skipped and why, and that outputs stay right.

The expected output of every rewritten model is computed independently: the original float model with its
weights replaced by ``dequantize_weight(quantize_weight(W))``, run by ``onnx.reference``.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from models import (
    activations,
    chained_model,
    gemm_model,
    if_model,
    loop_model,
    make_model,
    matmul_model,
    matmul_output_reused_model,
    run_reference,
    scan_model,
    shared_weight_model,
    skipped_cases_model,
    tensor_info,
    weight,
)
from onnx import helper, numpy_helper

from onnx_nf4 import QuantizeNF4Pass, quantize_model
from onnx_nf4.codec.blockwise import dequantize_blockwise, quantize_blockwise
from onnx_nf4.codec.layout import dequantize_weight, quantize_weight


def quantize(model: onnx.ModelProto, **kwargs) -> tuple[onnx.ModelProto, object]:
    """``quantize_model`` plus the full checker (custom domains included for the onnx_nf4 format)."""
    q, report = quantize_model(model, **kwargs)
    custom = kwargs.get("format", "onnx_nf4") == "onnx_nf4"
    onnx.checker.check_model(q, full_check=True, check_custom_domain=custom)
    return q, report


def graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                yield from graphs(sub)


def all_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [node for g in graphs(model.graph) for node in g.node]


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for g in graphs(model.graph) for t in g.initializer}


def float_weight(model: onnx.ModelProto, name: str) -> np.ndarray:
    """A weight of the float model, from an initializer or a Constant node of any graph."""
    for g in graphs(model.graph):
        for t in g.initializer:
            if t.name == name:
                return numpy_helper.to_array(t)
        for node in g.node:
            if node.op_type == "Constant" and node.output[0] == name:
                return numpy_helper.to_array(node.attribute[0].t)
    raise KeyError(name)


def with_weights(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` whose named weights (initializers or Constant values) are replaced."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for g in graphs(out.graph):
        for t in g.initializer:
            if t.name in weights:
                t.CopyFrom(numpy_helper.from_array(weights[t.name].astype(numpy_helper.to_array(t).dtype), t.name))
        for node in g.node:
            if node.op_type == "Constant" and node.output[0] in weights:
                node.attribute[0].t.CopyFrom(numpy_helper.from_array(weights[node.output[0]], node.output[0]))
    return out


def nf4_roundtrip(w: np.ndarray, *, transpose: bool = False, **kwargs) -> np.ndarray:
    """``W`` as the NF4 op sees it (``transpose``: the stored tensor is ``W.T``, as for Gemm transB=1)."""
    w32 = w.astype(np.float32)
    deq = dequantize_weight(quantize_weight(w32.T if transpose else w32, **kwargs))
    return deq.T if transpose else deq


def assert_same_outputs(actual: list[np.ndarray], expected: list[np.ndarray], rtol=1e-5, atol=1e-5) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert a.dtype == e.dtype and a.shape == e.shape
        np.testing.assert_allclose(a.astype(np.float64), e.astype(np.float64), rtol=rtol, atol=atol)


def assert_runs_like_nf4_weights(
    q: onnx.ModelProto, model: onnx.ModelProto, feeds: dict[str, np.ndarray], names=("W",), **kwargs
) -> None:
    """``q`` gives the outputs of the float ``model`` whose weights ``names`` are replaced by their NF4 round trip
    (``kwargs``: those of :func:`nf4_roundtrip`), both under the reference runtime."""
    weights = {name: nf4_roundtrip(float_weight(model, name), **kwargs) for name in names}
    assert_same_outputs(run_reference(q, feeds), run_reference(with_weights(model, weights), feeds))


def op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


# ------------------------------------------------------------------------------------------------- MatMul


@pytest.mark.parametrize("constant_node", [False, True], ids=["initializer", "constant-node"])
def test_matmul_weight_is_rewritten(constant_node):
    model = matmul_model(128, 64, constant_node=constant_node)
    q, report = quantize(model)
    assert op_types(q) == ["MatMulNF4"]
    node = q.graph.node[0]
    assert node.domain == "onnx_nf4" and node.name == "mm"
    assert {a.name: a.i for a in node.attribute} == {"K": 128, "N": 64, "block_size": 64}
    inits = initializers(q)
    assert set(inits) == {"W_nf4", "W_absmax"}
    assert inits["W_nf4"].shape == (64, 2, 32) and inits["W_absmax"].dtype == np.float32
    q_expected = quantize_weight(float_weight(model, "W"), 64)
    np.testing.assert_array_equal(inits["W_nf4"], q_expected.packed)
    np.testing.assert_array_equal(inits["W_absmax"], q_expected.absmax)
    (layer,) = report.layers
    assert (layer.node, layer.weight, layer.shape, layer.op_type) == ("mm", "W", (128, 64), "MatMul")
    assert layer.bytes_before == 128 * 64 * 4 and layer.bytes_after == 64 * 64 + 64 * 2 * 4
    assert 0.05 < layer.rel_rms_error < 0.15
    assert not report.skipped
    assert {o.domain: o.version for o in q.opset_import} == {"": 18, "onnx_nf4": 1}
    a = activations((3, 128))
    expected = run_reference(with_weights(model, {"W": nf4_roundtrip(float_weight(model, "W"))}), {"A": a})
    assert_same_outputs(run_reference(q, {"A": a}), expected)


def test_k_not_multiple_of_block_size():
    model = matmul_model(100, 72, a_shape=[2, 3, 100])
    q, report = quantize(model, block_size=32)
    inits = initializers(q)
    assert inits["W_nf4"].shape == (72, 4, 16) and inits["W_absmax"].shape == (72, 4)
    assert_runs_like_nf4_weights(q, model, {"A": activations((2, 3, 100))}, block_size=32)
    assert report.layers[0].shape == (100, 72)


@pytest.mark.parametrize("order", ["add", "add_swapped"])
def test_bias_add_is_fused(order):
    model = matmul_model(128, 64, bias=order)
    q, report = quantize(model)
    assert op_types(q) == ["MatMulNF4"]
    node = q.graph.node[0]
    assert list(node.input) == ["A", "W_nf4", "W_absmax", "", "", "", "b"]
    assert list(node.output) == ["Y"]
    assert report.layers[0].fused_bias
    assert_runs_like_nf4_weights(q, model, {"A": activations((4, 128))})


def test_matmul_output_with_another_consumer_is_not_fused():
    model = matmul_output_reused_model()
    q, report = quantize(model)
    assert op_types(q) == ["MatMulNF4", "Add", "Relu"]
    assert not report.layers[0].fused_bias
    assert_runs_like_nf4_weights(q, model, {"A": activations((3, 128))})


def test_bias_add_of_a_graph_output_is_not_fused():
    model = matmul_model(128, 64, bias="add")
    model.graph.output.append(tensor_info("mm_out", np.float32, ["M", 64]))
    q, report = quantize(model)
    assert op_types(q) == ["MatMulNF4", "Add"]
    assert [o.name for o in q.graph.output] == ["Y", "mm_out"]
    assert q.graph.node[0].output[0] == "mm_out"
    assert not report.layers[0].fused_bias


def test_shared_weight_is_quantized_once():
    model = shared_weight_model()
    calls = []
    q, report = quantize(model, on_progress=lambda *args: calls.append(args))
    assert op_types(q) == ["MatMulNF4", "Add", "MatMulNF4"]
    inits = initializers(q)
    assert set(inits) == {"W_nf4", "W_absmax"}
    nf4_nodes = [n for n in q.graph.node if n.op_type == "MatMulNF4"]
    assert nf4_nodes[0].input[1:] == nf4_nodes[1].input[1:]
    assert [(layer.node, layer.shared) for layer in report.layers] == [("mm1", False), ("mm2", True)]
    assert report.bytes_before == 128 * 64 * 4
    assert calls == [(1, 1, "mm1")]  # named as the report names the layer: its first node
    assert_runs_like_nf4_weights(q, model, {"A": activations((2, 128))})


def test_rewrites_that_feed_each_other():
    model = chained_model()
    q, report = quantize(model)
    assert op_types(q) == ["MatMulNF4", "MatMulNF4", "Mul", "MatMulNF4", "Add"]
    assert [(layer.node, layer.fused_bias) for layer in report.layers] == [
        ("mm1", True), ("mm2", False), ("gemm", False),
    ]  # fmt: skip
    assert_runs_like_nf4_weights(q, model, {"A": activations((4, 128))}, names=("W1", "W2", "W3"))
    # In the IR, every input must be a live value: produced by a node of the graph, an input or an initializer.
    ir_model = ir.serde.deserialize_model(model)
    QuantizeNF4Pass()(ir_model)
    for node in ir_model.graph:
        for value in node.inputs:
            assert (
                value is None
                or value.is_graph_input()
                or value.is_initializer()
                or value.producer() in list(ir_model.graph)
            ), f"{node.name} reads a stale value {value.name!r}"


# --------------------------------------------------------------------------------------------------- Gemm


@pytest.mark.parametrize(
    ("kwargs", "expected_ops", "fused"),
    [
        ({"trans_b": 0}, ["MatMulNF4"], True),
        ({"trans_b": 1, "alpha": 1.0, "beta": 1.0}, ["MatMulNF4"], True),
        ({"trans_b": 1, "alpha": 0.5, "beta": 2.0}, ["MatMulNF4", "Mul", "Add"], False),
        ({"trans_b": 0, "alpha": 1.0, "beta": 0.25, "c_shape": (1, 64)}, ["MatMulNF4"], True),
        ({"trans_b": 1, "alpha": 3.0, "c_shape": None}, ["MatMulNF4", "Mul"], False),
        ({"trans_b": 1, "beta": 2.0, "c_shape": (5, 64)}, ["MatMulNF4", "Add"], False),
        ({"trans_b": 0, "beta": 0.5, "c_shape": (5, 1), "c_input": True}, ["Mul", "MatMulNF4", "Add"], False),
        ({"trans_a": 1, "trans_b": 1, "alpha": 2.0, "beta": 0.0}, ["Transpose", "MatMulNF4", "Mul"], False),
    ],
    ids=["transB0", "transB1", "alpha-beta", "beta-row", "no-C", "full-C", "C-input", "transA-beta0"],
)
def test_gemm_is_rewritten_exactly(kwargs, expected_ops, fused):
    model = gemm_model(128, 64, 5, **kwargs)
    q, report = quantize(model)
    assert op_types(q) == expected_ops
    assert report.layers[0].op_type == "Gemm" and report.layers[0].fused_bias == fused
    assert report.layers[0].shape == (128, 64)
    feeds = {"A": activations((128, 5) if kwargs.get("trans_a") else (5, 128))}
    if kwargs.get("c_input"):
        feeds["C"] = activations((5, 1), seed=9)
    w = nf4_roundtrip(float_weight(model, "W"), transpose=bool(kwargs.get("trans_b")))
    expected = run_reference(with_weights(model, {"W": w}), feeds)
    assert_same_outputs(run_reference(q, feeds), expected)


# ----------------------------------------------------------------------------------------------- subgraphs


def test_if_branches_and_outer_scope_weight():
    model = if_model()
    q, report = quantize(model)
    assert {layer.weight for layer in report.layers} == {"W_outer", "W_else"}
    assert set(initializers(q)) >= {"W_outer_nf4", "W_outer_absmax", "W_else_nf4", "W_else_absmax"}
    assert {t.name for t in q.graph.initializer} == {"W_outer_nf4", "W_outer_absmax"}  # stays in the outer scope
    assert sum(n.op_type == "MatMulNF4" for n in all_nodes(q)) == 2
    assert not any(n.op_type == "MatMul" for n in all_nodes(q))
    w = {name: nf4_roundtrip(float_weight(model, name)) for name in ("W_outer", "W_else")}
    expected_model = with_weights(model, w)
    for cond in (True, False):
        feeds = {"A": activations((3, 128)), "cond": np.array(cond)}
        assert_same_outputs(run_reference(q, feeds), run_reference(expected_model, feeds))


def test_loop_body_weight():
    model = loop_model()
    q, report = quantize(model)
    assert [layer.node for layer in report.layers] == ["mm_loop"]
    assert sum(n.op_type == "MatMulNF4" for n in all_nodes(q)) == 1
    feeds = {"A": activations((2, 128))}
    expected = run_reference(with_weights(model, {"W_loop": nf4_roundtrip(float_weight(model, "W_loop"))}), feeds)
    assert_same_outputs(run_reference(q, feeds), expected, rtol=1e-4, atol=1e-4)


def test_scan_body_constant_weight():
    model = scan_model()
    q, report = quantize(model)
    assert [layer.weight for layer in report.layers] == ["W_scan"]
    assert not any(n.op_type in ("Constant", "MatMul") for n in all_nodes(q))
    feeds = {"A": activations((4, 128))}
    expected = run_reference(with_weights(model, {"W_scan": nf4_roundtrip(float_weight(model, "W_scan"))}), feeds)
    assert_same_outputs(run_reference(q, feeds), expected)


# ----------------------------------------------------------------------------------------- selection, skips


@pytest.mark.parametrize(
    ("pattern", "matched"),
    [("^mm2$", "node name 'mm2'"), ("W_ou", "weight name 'W_outer'")],
    ids=["node-name", "weight-name"],
)
def test_exclude_patterns(pattern, matched):
    model = shared_weight_model() if pattern == "^mm2$" else if_model()
    q, report = quantize(model, exclude=[pattern])
    (skip,) = report.skipped
    assert skip.reason == f"excluded: pattern {pattern!r} matches {matched}"
    assert skip.node == ("mm2" if pattern == "^mm2$" else "mm_then")
    assert len(report.layers) == 1
    assert sum(n.op_type == "MatMul" for n in all_nodes(q)) == 1


def test_min_elements():
    model = matmul_model(64, 32)  # 2048 elements, below the default 4096
    q, report = quantize(model)
    assert op_types(q) == ["MatMul"] and not report.layers
    assert report.skipped[0].reason == "weight has 2048 elements, fewer than min_elements=4096"
    q, report = quantize(model, min_elements=2048)
    assert op_types(q) == ["MatMulNF4"]


def test_skipped_with_reasons():
    q, report = quantize(skipped_cases_model())
    reasons = {skip.node: skip.reason for skip in report.skipped}
    assert reasons == {
        "dynamic": "B is not a constant (graph input 'Bdyn')",
        "batched": "B is 3-D with shape [2, 128, 64]; only a 2-D weight is rewritten",
        "integer": "dtype INT32 of the weight and A is not supported by this format (FLOAT, FLOAT16, BFLOAT16)",
        "double": "dtype DOUBLE of the weight and A is not supported by this format (FLOAT, FLOAT16, BFLOAT16)",
    }
    assert not report.layers
    assert op_types(q) == ["MatMul", "MatMul", "MatMul", "MatMul"]
    assert set(initializers(q)) == {"W3", "Wint", "Wdouble"}


def test_overridable_initializer_and_nonfinite_weight_are_skipped():
    model = matmul_model(128, 64)
    model.graph.input.append(tensor_info("W", np.float32, [128, 64]))
    _, report = quantize(model)
    assert report.skipped[0].reason == "B ('W') is an initializer that is also a graph input (overridable)"
    model = matmul_model(128, 64)
    w = float_weight(model, "W").copy()
    w[3, 5] = np.nan
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "W"))
    q, report = quantize(model)
    assert op_types(q) == ["MatMul"]
    assert "NaN" in report.skipped[0].reason and "'W'" in report.skipped[0].reason


def test_unused_initializers_are_removed():
    model = matmul_model(128, 64, bias="add")
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(3, np.float32), "unused"))
    q, _ = quantize(model)
    assert set(initializers(q)) == {"W_nf4", "W_absmax", "b"}


# ------------------------------------------------------------------------------------------ dtypes, options


def test_float16_model():
    model = matmul_model(256, 64, dtype=np.float16, bias="add")
    q, report = quantize(model)
    assert op_types(q) == ["MatMulNF4"]
    assert initializers(q)["W_absmax"].dtype == np.float32
    assert report.layers[0].bytes_before == 256 * 64 * 2
    a = activations((3, 256), dtype=np.float16)
    w = nf4_roundtrip(float_weight(model, "W")).astype(np.float16)
    (y,) = run_reference(q, {"A": a})
    (expected,) = run_reference(with_weights(model, {"W": w}), {"A": a})
    assert y.dtype == np.float16
    np.testing.assert_allclose(y.astype(np.float32), expected.astype(np.float32), rtol=4e-3, atol=4e-3)


def test_bfloat16_weight():
    bf16 = ml_dtypes.bfloat16
    w = weight((128, 64)).astype(bf16)
    model = make_model(
        [helper.make_node("MatMul", ["A", "W"], ["Y"], name="mm")],
        [tensor_info("A", bf16, ["M", 128])],
        [tensor_info("Y", bf16, ["M", 64])],
        [numpy_helper.from_array(w, "W")],
    )
    q, report = quantize(model)
    assert op_types(q) == ["MatMulNF4"] and report.layers[0].bytes_before == 128 * 64 * 2
    a = activations((3, 128)).astype(bf16)
    (y,) = run_reference(q, {"A": a})
    expected = (a.astype(np.float32) @ nf4_roundtrip(w.astype(np.float32))).astype(bf16)
    assert y.dtype == bf16
    np.testing.assert_allclose(y.astype(np.float32), expected.astype(np.float32), rtol=1e-2, atol=1e-2)


def test_double_quant():
    model = matmul_model(1024, 96, bias="add")
    q, report = quantize(model, double_quant=True, block_size=32)
    node = q.graph.node[0]
    assert list(node.input) == [
        "A", "W_nf4", "W_absmax", "W_nested_absmax", "nf4_nested_code", "W_absmax_offset", "b",
    ]  # fmt: skip
    assert {a.name: a.i for a in node.attribute}["nested_block_size"] == 256
    inits = initializers(q)
    assert inits["W_absmax"].dtype == np.uint8 and inits["W_absmax"].shape == (96, 32)
    assert inits["W_nested_absmax"].shape == (12,) and inits["nf4_nested_code"].shape == (256,)
    assert report.double_quant and report.layers[0].bytes_after < 96 * 1024 // 2 + 96 * 32 * 4
    assert_runs_like_nf4_weights(q, model, {"A": activations((2, 1024))}, block_size=32, double_quant=True)


def test_double_quant_code_table_is_shared_per_graph():
    model = matmul_model(128, 64)
    model.graph.initializer.append(numpy_helper.from_array(weight((64, 64), seed=8), "W2"))
    model.graph.node.append(helper.make_node("MatMul", ["Y", "W2"], ["Z"], name="mm2"))
    model.graph.output[0].CopyFrom(tensor_info("Z", np.float32, ["M", 64]))
    q, _ = quantize(model, double_quant=True)
    codes = [n.input[4] for n in q.graph.node]
    assert codes == ["nf4_nested_code", "nf4_nested_code"]


def test_shape_inference_on_the_rewritten_model():
    model = gemm_model(128, 64, 5, trans_b=1, alpha=0.5)
    q, _ = quantize(model)
    del q.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(q, strict_mode=True)
    shapes = {
        v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
        for v in [*inferred.graph.value_info, *inferred.graph.output]
    }
    nf4_out = q.graph.node[0].output[0]
    assert shapes[nf4_out] == [5, 64] and shapes["Y"] == [5, 64]


def test_prequantized_weight_is_inserted_as_given():
    model = matmul_model(128, 64)
    given = quantize_weight(float_weight(model, "W"), 128, rounding="bitsandbytes")
    q, _ = quantize(model, prequantized={"W": given})
    inits = initializers(q)
    np.testing.assert_array_equal(inits["W_nf4"], given.packed)
    np.testing.assert_array_equal(inits["W_absmax"], given.absmax)
    assert {a.name: a.i for a in q.graph.node[0].attribute}["block_size"] == 128
    wrong = quantize_weight(float_weight(model, "W")[:, :32], 64)
    with pytest.raises(ValueError, match=r"prequantized weight 'W' has \(K, N\) = \(128, 32\)"):
        quantize_model(model, prequantized={"W": wrong})


def test_pass_on_an_ir_model():
    ir_model = ir.serde.deserialize_model(shared_weight_model())
    quantize_pass = QuantizeNF4Pass(block_size=32, min_elements=0)
    result = quantize_pass(ir_model)
    assert result.modified and result.model is ir_model
    assert len(result.report.layers) == 2 and result.report.block_size == 32
    assert not hasattr(quantize_pass, "report")  # nothing of a call stays on the pass
    result = QuantizeNF4Pass()(ir_model)
    assert not result.modified


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"block_size": 48}, "block_size must be a power of two"),
        ({"format": "gguf"}, "format must be one of"),
        ({"format": "com.microsoft", "double_quant": True}, "double_quant is not supported"),
        ({"exclude": ["("]}, "invalid exclude pattern"),
        ({"min_elements": -1}, "min_elements must be >= 0"),
    ],
)
def test_invalid_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantizeNF4Pass(**kwargs)


# ------------------------------------------------------------------------------------ com.microsoft format


def ort_quantizer_initializers(model: onnx.ModelProto, block_size: int) -> dict[str, np.ndarray]:
    from onnxruntime.quantization.matmul_bnb4_quantizer import MatMulBnb4Quantizer

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    quantizer = MatMulBnb4Quantizer(copy, MatMulBnb4Quantizer.NF4, block_size)
    quantizer.process()
    return initializers(quantizer.model.model)


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def nf4_bnb4_roundtrip(w: np.ndarray, block_size: int) -> np.ndarray:
    """``W`` as MatMulBnb4 sees it: blocks running across the rows of ``W.T``."""
    packed, absmax = quantize_blockwise(w.T, block_size)
    return dequantize_blockwise(packed, absmax, w.T.shape, block_size).T


@pytest.mark.parametrize(
    ("K", "N", "block_size", "dtype"),
    [(128, 64, 64, np.float32), (100, 72, 64, np.float32), (96, 80, 128, np.float32), (256, 48, 64, np.float16)],
)
def test_com_microsoft_bytes_match_matmul_bnb4_quantizer_and_run_on_onnxruntime(K, N, block_size, dtype):
    model = matmul_model(K, N, dtype=dtype)
    q, report = quantize(model, format="com.microsoft", block_size=block_size)
    (node,) = q.graph.node
    assert (node.domain, node.op_type) == ("com.microsoft", "MatMulBnb4")
    assert {a.name: a.i for a in node.attribute} == {"K": K, "N": N, "block_size": block_size, "quant_type": 1}
    ours, theirs = initializers(q), ort_quantizer_initializers(model, block_size)
    assert set(ours) == set(theirs) == {"W_Bnb4", "W_absmax"}
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype and ours[name].shape == theirs[name].shape
        assert ours[name].tobytes() == theirs[name].tobytes()
    assert {o.domain: o.version for o in q.opset_import} == {"": 18, "com.microsoft": 1}
    assert report.format == "com.microsoft"

    a = activations((3, K), dtype=dtype)
    w = dequantize_blockwise(ours["W_Bnb4"], ours["W_absmax"].astype(np.float32), (N, K), block_size).T
    (y,) = run_ort(q, {"A": a})
    expected = a.astype(np.float64) @ w.astype(np.float64)
    magnitude = np.abs(a.astype(np.float64)) @ np.abs(w.astype(np.float64))
    eps = 2.0**-24 if dtype == np.float32 else 2.0**-11
    assert y.dtype == dtype
    np.testing.assert_array_less(np.abs(y - expected), (K + 2) * 2.0**-24 * magnitude + eps * np.abs(expected) + 1e-6)


def test_com_microsoft_subgraph_weights_match_the_quantizer():
    model = if_model()
    q, _ = quantize(model, format="com.microsoft")
    ours, theirs = initializers(q), ort_quantizer_initializers(model, 64)
    assert set(ours) == set(theirs)
    assert all(ours[name].tobytes() == theirs[name].tobytes() for name in ours)
    feeds = {"A": activations((2, 128)), "cond": np.array(False)}
    assert_same_outputs(run_ort(q, feeds), run_reference(with_weights(model, {
        "W_else": nf4_bnb4_roundtrip(float_weight(model, "W_else"), 64),
        "W_outer": nf4_bnb4_roundtrip(float_weight(model, "W_outer"), 64),
    }), feeds))  # fmt: skip


def test_com_microsoft_keeps_the_bias_add_and_rewrites_gemm():
    model = matmul_model(128, 64, bias="add")
    q, report = quantize(model, format="com.microsoft")
    assert op_types(q) == ["MatMulBnb4", "Add"] and not report.layers[0].fused_bias
    a = activations((3, 128))
    expected = run_reference(with_weights(model, {"W": nf4_bnb4_roundtrip(float_weight(model, "W"), 64)}), {"A": a})
    assert_same_outputs(run_ort(q, {"A": a}), expected)

    model = gemm_model(128, 64, 5, trans_b=1, alpha=0.5, beta=2.0)
    q, _ = quantize(model, format="com.microsoft")
    assert op_types(q) == ["MatMulBnb4", "Mul", "Add"]
    w = nf4_bnb4_roundtrip(float_weight(model, "W").T, 64).T
    a = activations((5, 128))
    assert_same_outputs(run_ort(q, {"A": a}), run_reference(with_weights(model, {"W": w}), {"A": a}))


def test_com_microsoft_skips_bfloat16():
    bf16 = ml_dtypes.bfloat16
    model = make_model(
        [helper.make_node("MatMul", ["A", "W"], ["Y"], name="mm")],
        [tensor_info("A", bf16, ["M", 128])],
        [tensor_info("Y", bf16, ["M", 64])],
        [numpy_helper.from_array(weight((128, 64)).astype(bf16), "W")],
    )
    _, report = quantize(model, format="com.microsoft")
    assert (
        report.skipped[0].reason
        == "dtype BFLOAT16 of the weight and A is not supported by this format (FLOAT, FLOAT16)"
    )


def test_com_microsoft_prequantized_weight():
    model = matmul_model(128, 64)
    w = float_weight(model, "W")
    given = quantize_weight(w, 64)
    q, _ = quantize(model, format="com.microsoft", prequantized={"W": given})
    np.testing.assert_array_equal(initializers(q)["W_Bnb4"], given.packed.reshape(-1))  # K % bs == 0: same bytes
    np.testing.assert_array_equal(initializers(q)["W_absmax"], given.absmax.reshape(-1))
    for unfit in (quantize_weight(w, 64, double_quant=True), quantize_weight(w[:100], 64)):
        unfit_model = model if unfit.K == 128 else matmul_model(100, 64)
        with pytest.raises(ValueError, match="cannot be written as MatMulBnb4"):
            quantize_model(unfit_model, format="com.microsoft", prequantized={"W": unfit})
