"""onnx_nf4.model.proto_writer.write_model writes the same ModelProto as onnx_ir.save, streaming large tensors."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_nf4.model import proto_writer
from onnx_nf4.model.proto_writer import write_model


def _canonical(proto: onnx.ModelProto) -> bytes:
    """The model's bytes with the main graph's initializers sorted by name (their order carries no meaning)."""
    inits = sorted(proto.graph.initializer, key=lambda t: t.name)
    proto.graph.ClearField("initializer")
    proto.graph.initializer.extend(inits)
    return proto.SerializeToString(deterministic=True)


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    big = rng.standard_normal((300, 200)).astype(np.float32)
    inits = [
        numpy_helper.from_array(big, "w_big"),
        numpy_helper.from_array(rng.standard_normal((200, 130)).astype(np.float16), "w_half"),
        numpy_helper.from_array(rng.integers(0, 255, 70000, dtype=np.uint8), "packed"),
        numpy_helper.from_array(np.arange(4, dtype=np.int64), "small"),
        numpy_helper.from_array(np.array(0, dtype=np.int64), "zero_d"),
    ]
    bf16_bytes = rng.standard_normal((256, 256)).astype(ml_dtypes.bfloat16).tobytes()
    bf16 = helper.make_tensor("w_bf16", TensorProto.BFLOAT16, [256, 256], vals=bf16_bytes, raw=True)
    inits.append(bf16)
    then_graph = helper.make_graph(
        [helper.make_node("Identity", ["inner"], ["then_out"])], "then", [],
        [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, [300, 200])],
        [numpy_helper.from_array(big * 2, "inner")],
    )  # fmt: skip
    else_graph = helper.make_graph(
        [helper.make_node("Identity", ["w_big"], ["else_out"])], "else", [],
        [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, [300, 200])],
    )  # fmt: skip
    nodes = [
        helper.make_node("MatMul", ["x", "w_big"], ["y"], name="mm"),
        helper.make_node("If", ["cond"], ["z"], then_branch=then_graph, else_branch=else_graph),
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(big[:100], "c_value")),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 300]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 200]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [300, 200]),
         helper.make_tensor_value_info("c", TensorProto.FLOAT, [100, 200])],
        inits, doc_string="a graph",
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="test")
    helper.set_model_props(model, {"key": "value"})
    return model


@pytest.mark.parametrize("stream_min_bytes", [1 << 16, 1])
def test_same_model_as_onnx_ir_save(tmp_path, monkeypatch, stream_min_bytes):
    monkeypatch.setattr(proto_writer, "STREAM_MIN_BYTES", stream_min_bytes)
    model = ir.serde.deserialize_model(_model())
    write_model(model, tmp_path / "ours.onnx")
    ir.save(model, tmp_path / "ref.onnx")
    ours, ref = onnx.load(tmp_path / "ours.onnx"), onnx.load(tmp_path / "ref.onnx")
    assert _canonical(ours) == _canonical(ref)
    onnx.checker.check_model(ours)
    # The model is unchanged: saving it again gives the same file.
    write_model(model, tmp_path / "again.onnx")
    assert (tmp_path / "again.onnx").read_bytes() == (tmp_path / "ours.onnx").read_bytes()


def test_large_tensors_are_not_copied_whole(tmp_path):
    """The big initializers' bytes (numpy-backed, as the pass makes them) reach the file from their own buffers."""
    model = ir.serde.deserialize_model(_model())
    for value in model.graph.initializers.values():
        value.const_value = ir.Tensor(value.const_value.numpy(), name=value.name)
    write_model(model, tmp_path / "ours.onnx")
    assert _canonical(onnx.load(tmp_path / "ours.onnx")) == _canonical(ir.serde.serialize_model(model))
    chunks = list(proto_writer._chunks(model))
    views = [c for c in chunks if isinstance(c, memoryview)]
    assert {v.nbytes for v in views} == {300 * 200 * 4, 70000, 256 * 256 * 2}  # the float16 one is small
    tail = model.graph.initializers["w_big"].const_value.numpy().tobytes()[-1000:]  # not in the Constant's rows
    assert not any(tail in c for c in chunks if isinstance(c, bytes))  # the big data only in views


def test_external_tensors_keep_their_references(tmp_path):
    proto = _model()
    onnx.save(proto, tmp_path / "src.onnx", save_as_external_data=True, location="src.data", size_threshold=1024)
    model = ir.load(tmp_path / "src.onnx")
    write_model(model, tmp_path / "out.onnx")
    out = onnx.load(tmp_path / "out.onnx", load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in out.graph.initializer)
    ref = ir.serde.serialize_model(model)
    assert _canonical(out) == _canonical(ref)


def test_inline_external_writes_the_data_and_keeps_the_model(tmp_path):
    """``inline_external``: the file holds the data of every external initializer, as load_to_model + ir.save,
    while the model keeps its external tensors (unmapped after writing)."""
    proto = _model()
    onnx.save(proto, tmp_path / "src.onnx", save_as_external_data=True, location="src.data", size_threshold=1024)
    model = ir.load(tmp_path / "src.onnx")
    write_model(model, tmp_path / "inline.onnx", inline_external=True)
    assert isinstance(model.graph.initializers["w_big"].const_value, ir.ExternalTensor)
    ours = onnx.load(tmp_path / "inline.onnx", load_external_data=False)
    assert all(t.data_location != TensorProto.EXTERNAL for t in ours.graph.initializer)
    reference = ir.load(tmp_path / "src.onnx")
    ir.external_data.load_to_model(reference)
    assert _canonical(ours) == _canonical(ir.serde.serialize_model(reference))
