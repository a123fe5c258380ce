"""quantize_model / dequantize_model: return convention, files, inputs left intact, round trips, a real model."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from models import activations, gemm_model, if_model, matmul_model, run_reference, shared_weight_model
from onnx import numpy_helper

from onnx_nf4 import QuantizationReport, dequantize_model, quantize_model
from onnx_nf4.model.io import ModelLoadError


def graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            yield from graphs(attr.g) if attr.type == onnx.AttributeProto.GRAPH else ()


def nf4_tensors(model: onnx.ModelProto, skip_double_quant_absmax: bool) -> list[bytes]:
    """The codes (and float absmax) of every NF4 node, whatever the initializers are called."""
    arrays = {t.name: numpy_helper.to_array(t) for g in graphs(model.graph) for t in g.initializer}
    inputs = [n.input[1:2] if skip_double_quant_absmax else n.input[1:3] for g in graphs(model.graph) for n in g.node
              if n.op_type in ("MatMulNF4", "MatMulBnb4")]  # fmt: skip
    return sorted(arrays[name].tobytes() for names in inputs for name in names)


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """onnxruntime (CPU) for a com.microsoft model, the reference evaluator otherwise."""
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        return run_reference(model, feeds)
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_returns_the_model_and_the_report():
    model = matmul_model(128, 64, bias="add")
    before = model.SerializeToString()
    q, report = quantize_model(model)
    assert isinstance(q, onnx.ModelProto) and isinstance(report, QuantizationReport)
    assert model.SerializeToString() == before  # the input is not modified
    assert [n.op_type for n in q.graph.node] == ["MatMulNF4"]
    assert (report.block_size, report.double_quant, report.format) == (64, False, "onnx_nf4")
    assert report.size_ratio == report.bytes_after / report.bytes_before < 0.2
    assert report.bits_per_weight == 8 * report.bytes_after / (128 * 64)


def test_writes_the_model_when_given_an_output_path(tmp_path):
    src = tmp_path / "in.onnx"
    onnx.save(matmul_model(128, 64), src)
    before = src.read_bytes()
    q, report = quantize_model(src, tmp_path / "out.onnx")
    assert q is None and len(report.layers) == 1
    assert src.read_bytes() == before
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)
    assert [n.op_type for n in onnx.load(tmp_path / "out.onnx").graph.node] == ["MatMulNF4"]


def test_external_data_on_request(tmp_path):
    q, _ = quantize_model(matmul_model(128, 64), tmp_path / "out.onnx", external_data=True)
    assert q is None and (tmp_path / "out.onnx.data").stat().st_size == 64 * 64 + 64 * 2 * 4
    dequantize_model(tmp_path / "out.onnx", tmp_path / "deq.onnx", external_data=True)
    assert (tmp_path / "deq.onnx.data").stat().st_size == 128 * 64 * 4
    with pytest.raises(ValueError, match="give output_path too"):
        quantize_model(matmul_model(128, 64), external_data=True)


def test_output_path_may_be_the_input_path(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(matmul_model(128, 64), path)
    quantize_model(path, path)
    assert [n.op_type for n in onnx.load(path).graph.node] == ["MatMulNF4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_an_ir_model_is_rewritten_in_place():
    ir_model = ir.serde.deserialize_model(matmul_model(128, 64))
    q, _ = quantize_model(ir_model)
    assert [n.op_type for n in ir_model.graph] == ["MatMulNF4"]
    assert [n.op_type for n in q.graph.node] == ["MatMulNF4"]


def test_progress_is_reported_per_distinct_weight():
    calls = []
    quantize_model(if_model(), on_progress=lambda *args: calls.append(args))
    assert [(done, total) for done, total, _ in calls] == [(1, 2), (2, 2)]
    assert {name for *_, name in calls} == {"mm_then", "mm_else"}  # the first node of each weight


def test_bad_input_file_raises_model_load_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    with pytest.raises(ModelLoadError, match=r"bad\.onnx"):
        quantize_model(bad)
    with pytest.raises(ModelLoadError, match="no such file"):
        dequantize_model(tmp_path / "absent.onnx")


@pytest.mark.parametrize(
    ("builder", "kwargs", "feeds"),
    [
        (lambda: matmul_model(100, 72, bias="add"), {"block_size": 32}, {"A": (3, 100)}),
        (lambda: matmul_model(1024, 96, bias="add_swapped"), {"double_quant": True}, {"A": (2, 1024)}),
        (lambda: gemm_model(128, 64, 5, trans_b=1, alpha=0.5, beta=2.0), {}, {"A": (5, 128)}),
        (lambda: matmul_model(100, 72), {"format": "com.microsoft"}, {"A": (3, 100)}),
        (lambda: shared_weight_model(), {"format": "com.microsoft", "block_size": 128}, {"A": (2, 128)}),
        (lambda: if_model(), {}, {"A": (2, 128), "cond": None}),
    ],
    ids=["bias-K%bs", "double-quant", "gemm", "bnb4", "bnb4-shared", "if"],
)
def test_dequantize_roundtrip(builder, kwargs, feeds):
    feeds = {k: np.array(True) if shape is None else activations(shape) for k, shape in feeds.items()}
    q, _ = quantize_model(builder(), **kwargs)
    d = dequantize_model(q)
    onnx.checker.check_model(d, full_check=True)
    ops = [(n.domain, n.op_type) for n in d.graph.node]
    assert not any(domain for domain, _ in ops)
    for y_q, y_d in zip(run(q, feeds), run_reference(d, feeds), strict=True):
        np.testing.assert_allclose(y_d, y_q, rtol=1e-5, atol=1e-5)
    # NF4 codes survive decode + re-encode: quantizing the dequantized model gives the same codes and absmax
    # (with double quantization the decoded absmax is re-quantized around a new mean, so only codes compare).
    again, _ = quantize_model(d, **kwargs)
    double_quant = kwargs.get("double_quant", False)
    assert nf4_tensors(q, double_quant) and nf4_tensors(again, double_quant) == nf4_tensors(q, double_quant)


def test_dequantize_writes_to_a_path(tmp_path):
    q, _ = quantize_model(matmul_model(128, 64, bias="add"))
    onnx.save(q, tmp_path / "q.onnx")
    assert dequantize_model(tmp_path / "q.onnx", tmp_path / "d.onnx") is None
    d = onnx.load(tmp_path / "d.onnx")
    assert [n.op_type for n in d.graph.node] == ["MatMul", "Add"]
    assert {t.name for t in d.graph.initializer} == {"W_nf4_dequantized", "b"}


@pytest.mark.slow
def test_minilm_end_to_end(minilm_fp32_path, minilm_inputs, tmp_path):
    import onnxruntime as ort

    q_path = tmp_path / "minilm_bnb4.onnx"
    _, report = quantize_model(minilm_fp32_path, q_path, format="com.microsoft")
    assert [layer.op_type for layer in report.layers].count("MatMul") == 36
    assert [(layer.op_type, layer.shape) for layer in report.layers if layer.op_type == "Gather"] == [
        ("Gather", (384, 30522))  # the word embedding; position (512 rows) and token-type tables stay float
    ]
    reasons = {s.reason.split(",")[0].split(" (")[0] for s in report.skipped}
    assert reasons == {"B is not a constant", "table has 512 rows", "table has 768 elements"}
    block = {"MatMul": 64, "Gather": 32}  # the word embedding: the embedding block size, min(64, 32)
    nf4_bytes = sum(k * n * (0.5 + 4 / block[layer.op_type]) for layer in report.layers for k, n in [layer.shape])
    float_bytes = sum(4 * k * n for layer in report.layers for k, n in [layer.shape])
    assert report.size_ratio == pytest.approx(nf4_bytes / float_bytes)  # 4 bits + a float32 absmax per block
    _, nf4_report = quantize_model(minilm_fp32_path, tmp_path / "minilm_nf4.onnx")
    matmuls = [layer for layer in nf4_report.layers if layer.op_type == "MatMul"]
    assert len(matmuls) == 36 and all(layer.fused_bias for layer in matmuls)
    onnx.checker.check_model(str(tmp_path / "minilm_nf4.onnx"), full_check=True, check_custom_domain=True)

    def run(path):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        return session.run(None, {k: v for k, v in minilm_inputs.items() if k in names})[0]

    dequantize_model(q_path, tmp_path / "minilm_deq.onnx")
    y_q, y_deq, y_fp32 = run(q_path), run(tmp_path / "minilm_deq.onnx"), run(minilm_fp32_path)
    np.testing.assert_allclose(y_q, y_deq, rtol=1e-4, atol=1e-4)
    cosine = np.sum(y_q * y_fp32, -1) / (np.linalg.norm(y_q, axis=-1) * np.linalg.norm(y_fp32, axis=-1))
    assert cosine.mean() > 0.95  # token-level hidden states; 0.973 measured
