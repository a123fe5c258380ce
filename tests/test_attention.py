"""NF4 on transformer-optimized graphs: ``com.microsoft::Attention``'s packed QKV weight (onnx_nf4.passes.attention).

Small seeded ``Attention`` graphs whose weight is exactly NF4-representable (so the rewrite must reproduce the fused
node's output up to float summation order), the ``Attention`` forms left fused with their reason, and the real
MiniLM after onnxruntime's transformer optimizer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_nf4

ort = pytest.importorskip("onnxruntime")

B, S, HIDDEN, HEADS = 2, 5, 64, 4
LINEAR_LAYERS = 36  # MiniLM: 6 layers x (query, key, value, attention output, intermediate, output)


def nf4_exact(shape: tuple[int, int], seed: int) -> np.ndarray:
    """A float32 weight that NF4 (block 64, round to nearest) stores exactly: the decoding of a random weight."""
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.1
    return onnx_nf4.dequantize_weight(onnx_nf4.quantize_weight(w, 64, backend="numpy"))


def attention_model(
    v_hidden: int = HIDDEN, mask: str | None = "lengths", attention_bias: bool = False, **attributes
) -> onnx.ModelProto:
    """``Attention(x, W[HIDDEN, 2 * HIDDEN + v_hidden], bias, mask)`` with a seeded NF4-exact weight."""
    n = 2 * HIDDEN + v_hidden
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(nf4_exact((HIDDEN, n), 0), "qkv_weight"),
        numpy_helper.from_array(rng.standard_normal(n).astype(np.float32) * 0.1, "qkv_bias"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", HIDDEN])]
    names = ["x", "qkv_weight", "qkv_bias"]
    before: list[onnx.NodeProto] = []  # the nodes computing the mask
    if mask == "lengths":  # [B] sequence lengths, as EmbedLayerNormalization's mask_index output gives them
        inputs.append(helper.make_tensor_value_info("ids", TensorProto.INT32, ["batch", "seq"]))
        inputs.append(helper.make_tensor_value_info("m", TensorProto.INT32, ["batch", "seq"]))
        table = numpy_helper.from_array(rng.standard_normal((16, HIDDEN)).astype(np.float32), "table")
        gamma = numpy_helper.from_array(np.ones(HIDDEN, np.float32), "gamma")
        beta = numpy_helper.from_array(np.zeros(HIDDEN, np.float32), "beta")
        inits += [table, gamma, beta]
        before = [helper.make_node("EmbedLayerNormalization", ["ids", "", "table", "table", "", "gamma", "beta", "m"],
                                 ["emb", "mask_index"], domain="com.microsoft", name="embed")]  # fmt: skip
        names = ["emb", "qkv_weight", "qkv_bias", "mask_index"]
        inputs = inputs[1:]
    elif mask == "rowsum":  # [B] lengths as Optimum's ORTOptimizer computes them: ReduceSum(Cast(mask), [1])
        inputs.append(helper.make_tensor_value_info("m", TensorProto.INT64, ["batch", "seq"]))
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "axes"))
        before = [
            helper.make_node("Cast", ["m"], ["m32"], to=TensorProto.INT32),
            helper.make_node("ReduceSum", ["m32", "axes"], ["lengths"], keepdims=0),
        ]
        names.append("lengths")
    elif mask is not None:  # a raw [B, T] mask ("2d") or a [B, S, T] mask ("3d")
        dims = ["batch", "seq"] if mask == "2d" else ["batch", "seq", "seq"]
        inputs.append(helper.make_tensor_value_info("m", TensorProto.INT32, dims))
        names.append("m")
    if attention_bias:
        inputs.append(helper.make_tensor_value_info("ab", TensorProto.FLOAT, [1, HEADS, "seq", "seq"]))
        names += [""] * (5 - len(names)) + ["ab"]
    if v_hidden != HIDDEN:
        attributes["qkv_hidden_sizes"] = [HIDDEN, HIDDEN, v_hidden]
    attention = helper.make_node("Attention", names, ["y"], domain="com.microsoft", name="attn", num_heads=HEADS,
                                 **attributes)  # fmt: skip
    nodes = [*before, attention]
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "attention", inputs, [output], inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def feeds(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2)
    lengths = np.array([S, 3])
    out = {}
    for value in model.graph.input:
        if value.name == "x":
            out["x"] = rng.standard_normal((B, S, HIDDEN)).astype(np.float32)
        elif value.name == "ids":
            out["ids"] = rng.integers(0, 16, (B, S)).astype(np.int32)
        elif value.name == "m":
            rank = len(value.type.tensor_type.shape.dim)
            raw = (np.arange(S)[None, :] < lengths[:, None]).astype(np.int32)
            out["m"] = raw if rank == 2 else np.repeat(raw[:, None, :], S, axis=1)
            if value.type.tensor_type.elem_type == TensorProto.INT64:
                out["m"] = out["m"].astype(np.int64)
        elif value.name == "ab":
            out["ab"] = rng.standard_normal((1, HEADS, S, S)).astype(np.float32)
    return out


def run(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), onnx_nf4.session_options(),
                                   providers=["CPUExecutionProvider"])  # fmt: skip
    return session.run(None, inputs)[0]


def op_types(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


@pytest.mark.parametrize("fmt", ["onnx_nf4", "com.microsoft"])
@pytest.mark.parametrize(
    "case",
    [
        {},
        {"mask": "2d"},
        {"mask": "rowsum"},
        {"mask": None},
        {"v_hidden": 32},
        {"unidirectional": 1, "mask": None},
        {"scale": 0.3, "mask_filter_value": -1000.0},
        {"attention_bias": True, "mask": "2d"},
    ],
    ids=[
        "lengths",
        "raw_mask",
        "row_sum_lengths",
        "no_mask",
        "v_narrower",
        "unidirectional",
        "scale",
        "attention_bias",
    ],
)
def test_attention_becomes_nf4_projection_and_multihead_attention(case: dict, fmt: str) -> None:
    model = attention_model(**case)
    expected = run(model, feeds(model))
    quantized, report = onnx_nf4.quantize_model(model, format=fmt)
    assert [layer.op_type for layer in report.layers] == ["Attention"]
    assert report.layers[0].shape == (HIDDEN, 2 * HIDDEN + case.get("v_hidden", HIDDEN))
    assert report.layers[0].fused_bias == (fmt == "onnx_nf4")  # MatMulBnb4 has no bias: MultiHeadAttention adds it
    projection = "MatMulNF4" if fmt == "onnx_nf4" else "MatMulBnb4"
    types = op_types(quantized)
    assert "Attention" not in types
    assert types[-3:] == [projection, "Split", "MultiHeadAttention"]
    assert "qkv_weight" not in {init.name for init in quantized.graph.initializer}
    np.testing.assert_allclose(run(quantized, feeds(model)), expected, rtol=1e-4, atol=1e-5)


def test_the_embedding_tables_are_listed_as_left_float() -> None:
    _, report = onnx_nf4.quantize_model(attention_model(), min_elements=0)
    assert [layer.op_type for layer in report.layers] == ["Attention"] and report.skipped == []
    left = {entry.name: entry.reason for entry in report.left_float}
    assert "qkv_weight" not in left  # quantized
    assert "com.microsoft::EmbedLayerNormalization" in left["table"]  # the word and position table, read twice


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ({"mask": "3d"}, "mask_index"),
        ({"do_rotary": 1, "mask": None}, "do_rotary"),
        ({"mask": None, "min": True}, "min_elements"),
    ],
    ids=["mask_3d", "rotary", "small"],
)
def test_attention_that_stays_fused_is_reported_with_the_reason(case: dict, reason: str) -> None:
    small = case.pop("min", False)
    model = attention_model(**case)
    quantized, report = onnx_nf4.quantize_model(model, min_elements=10**6 if small else None)
    assert report.layers == []
    assert [(entry.node, entry.op_type) for entry in report.skipped] == [("attn", "Attention")]
    assert reason in report.skipped[0].reason
    assert "Attention" in op_types(quantized)


def test_past_state_stays_fused() -> None:
    model = attention_model(mask=None)
    past = helper.make_tensor_value_info("past", TensorProto.FLOAT, [2, B, HEADS, "past_seq", HIDDEN // HEADS])
    model.graph.input.append(past)
    node = model.graph.node[0]
    node.input.extend(["", "past"])
    _, report = onnx_nf4.quantize_model(model)
    assert report.layers == [] and "past" in report.skipped[0].reason


@pytest.fixture(scope="module")
def minilm_optimized_path(minilm_fp32_path: Path, tmp_path_factory) -> Path:
    """MiniLM after onnxruntime's transformer optimizer (Attention, EmbedLayerNormalization, ... fused)."""
    from onnxruntime.transformers.optimizer import optimize_model

    path = tmp_path_factory.mktemp("minilm_opt") / "minilm_opt.onnx"
    optimize_model(str(minilm_fp32_path), "bert", num_heads=12, hidden_size=384).save_model_to_file(str(path))
    return path


def test_minilm_optimized_then_quantized_has_all_36_linear_layers_in_nf4(
    minilm, minilm_fp32_path: Path, minilm_optimized_path: Path, minilm_inputs, tmp_path: Path
) -> None:
    assert op_types(onnx.load(minilm_optimized_path)).count("Attention") == 6
    nf4_opt, nf4 = tmp_path / "nf4_opt.onnx", tmp_path / "nf4.onnx"
    _, report_opt = onnx_nf4.quantize_model(minilm_optimized_path, nf4_opt)
    _, report = onnx_nf4.quantize_model(minilm_fp32_path, nf4)
    # Every float weight element of the 36 layers is in NF4: 18 MatMul + 6 packed QKV weights of 3 layers each.
    linear = [layer for layer in report.layers if layer.op_type == "MatMul"]  # the Gather lookups left out
    assert len(linear) == LINEAR_LAYERS
    elements = sum(layer.shape[0] * layer.shape[1] for layer in report_opt.layers)
    assert elements == sum(layer.shape[0] * layer.shape[1] for layer in linear)
    assert sorted({layer.op_type for layer in report_opt.layers}) == ["Attention", "MatMul"]
    assert sum(layer.op_type == "Attention" for layer in report_opt.layers) == 6
    assert report_opt.skipped == []
    left = {entry.name: entry.reason for entry in report_opt.left_float}
    for table in ("word", "position"):  # token_type ([2, 384]) is under min_elements
        assert "com.microsoft::EmbedLayerNormalization" in left[f"bert.embeddings.{table}_embeddings.weight"]
    types = op_types(onnx.load(nf4_opt))
    assert types.count("MultiHeadAttention") == 6 and "Attention" not in types

    def embeddings(path: Path) -> np.ndarray:
        session = ort.InferenceSession(str(path), onnx_nf4.session_options(), providers=["CPUExecutionProvider"])
        return minilm.mean_pool(session.run(None, minilm_inputs)[0], minilm_inputs["attention_mask"])

    fp32 = embeddings(minilm_fp32_path)
    cos_opt = minilm.cosine(embeddings(nf4_opt), fp32)
    cos = minilm.cosine(embeddings(nf4), fp32)
    print(f"\nMiniLM NF4 cosine vs fp32: optimized {cos_opt.mean():.5f} (min {cos_opt.min():.5f}), "
          f"un-optimized {cos.mean():.5f} (min {cos.min():.5f})")  # fmt: skip
    assert abs(cos_opt.mean() - cos.mean()) <= 0.002 and abs(cos_opt.min() - cos.min()) <= 0.002


def test_gptq_calibrates_the_packed_qkv_weight() -> None:
    model = attention_model(mask="2d")
    _, report = onnx_nf4.quantize_model(model, method="gptq", calibration=[feeds(model)])
    assert [layer.op_type for layer in report.layers] == ["Attention"]
    assert report.layers[0].output_error is not None  # calibrated, not the "mse" fallback


def test_an_nf4_model_is_optimized_through_dequantize_and_quantized_again_to_the_same_bytes(
    minilm_fp32_path: Path, minilm_optimized_path: Path, tmp_path: Path
) -> None:
    """The documented other order (docs/transformer_optimizer.md): ``dequantize`` -> optimizer -> ``quantize``.

    Round-to-nearest re-encodes decoded NF4 weights to the same codes and scales, so the result holds the bytes of
    "optimize, then quantize" (only initializer names differ).
    """
    from onnxruntime.transformers.optimizer import optimize_model

    nf4, float_again, optimized = tmp_path / "nf4.onnx", tmp_path / "deq.onnx", tmp_path / "deq_opt.onnx"
    onnx_nf4.quantize_model(minilm_fp32_path, nf4)
    onnx_nf4.dequantize_model(nf4, float_again)
    optimize_model(str(float_again), "bert", num_heads=12, hidden_size=384).save_model_to_file(str(optimized))
    requantized, _ = onnx_nf4.quantize_model(optimized)
    direct, _ = onnx_nf4.quantize_model(minilm_optimized_path)

    def nf4_bytes(model: onnx.ModelProto) -> list[tuple[str, bytes, bytes]]:
        inits = {init.name: init.raw_data for init in model.graph.initializer}
        return [(n.name, inits[n.input[1]], inits[n.input[2]]) for n in model.graph.node if n.op_type == "MatMulNF4"]

    got, expected = nf4_bytes(requantized), nf4_bytes(direct)
    assert len(got) == 24 and got == expected
