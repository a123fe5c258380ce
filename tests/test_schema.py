"""The MatMulNF4 schema: registration, checker and shape inference."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from models import IR_VERSION, OPSET, tensor_info
from onnx import defs, helper

import onnx_nf4
from onnx_nf4.op import schema


def _model(a_type, a_shape, *, K=100, N=24, block_size=64, b_shape=None, absmax_shape=None, bias_shape=None,
           double_quant=False, **attrs) -> onnx.ModelProto:  # fmt: skip
    k_blocks = -(-K // block_size)
    b_shape = [N, k_blocks, block_size // 2] if b_shape is None else b_shape
    absmax_shape = [N, k_blocks] if absmax_shape is None else absmax_shape
    inputs = [
        tensor_info("A", a_type, a_shape),
        tensor_info("B", np.uint8, b_shape),
        tensor_info("absmax", np.uint8 if double_quant else np.float32, absmax_shape),
    ]
    names = ["A", "B", "absmax"]
    if double_quant:
        inputs += [
            tensor_info("nested_absmax", np.float32, [1]),
            tensor_info("nested_code", np.float32, [256]),
            tensor_info("absmax_offset", np.float32, []),
        ]
        names += ["nested_absmax", "nested_code", "absmax_offset"]
    if bias_shape is not None:
        inputs.append(tensor_info("bias", a_type, bias_shape))
        names += [""] * (6 - len(names)) + ["bias"]
    attributes = {"K": K, "N": N, "block_size": block_size, **attrs}
    node = helper.make_node("MatMulNF4", names, ["Y"], domain="onnx_nf4", name="nf4", **attributes)
    out_shape = None if a_shape is None else [*a_shape[:-1], N]
    graph = helper.make_graph([node], "g", inputs, [tensor_info("Y", a_type, out_shape)])
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("onnx_nf4", 1)],
        ir_version=IR_VERSION,
    )


def _inferred_output(model: onnx.ModelProto) -> onnx.TypeProto:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    return inferred.graph.output[0].type


def _dims(type_proto: onnx.TypeProto) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in type_proto.tensor_type.shape.dim]


def test_registration_is_idempotent():
    assert schema.is_registered()
    schema.register()
    schema.register()
    matches = [s for s in defs.get_all_schemas_with_history() if s.domain == "onnx_nf4" and s.name == "MatMulNF4"]
    assert len(matches) == 1


def test_schema_declares_the_spec():
    op = defs.get_schema("MatMulNF4", 1, "onnx_nf4")
    assert [i.name for i in op.inputs] == [
        "A", "B", "absmax", "nested_absmax", "nested_code", "absmax_offset", "bias",
    ]  # fmt: skip
    assert (op.min_input, op.max_input, op.min_output, op.max_output) == (3, 7, 1, 1)
    constraints = {c.type_param_str: sorted(c.allowed_type_strs) for c in op.type_constraints}
    assert constraints == {
        "T": ["tensor(bfloat16)", "tensor(float)", "tensor(float16)"],
        "T2": ["tensor(float)", "tensor(uint8)"],
    }
    assert {name for name, a in op.attributes.items() if a.required} == {"K", "N", "block_size"}
    assert op.attributes["nested_block_size"].default_value.i == 256
    assert op.attributes["accuracy_level"].default_value.i == 0
    assert op.has_type_and_shape_inference_function


@pytest.mark.parametrize("a_type", [np.float32, np.float16])
def test_shape_inference_keeps_leading_dims_and_type(a_type):
    out = _inferred_output(_model(a_type, ["batch", "seq", 100], bias_shape=[24]))
    assert out.tensor_type.elem_type == helper.np_dtype_to_tensor_dtype(np.dtype(a_type))
    assert _dims(out) == ["batch", "seq", 24]


def test_shape_inference_with_rank_1_a_and_double_quant():
    out = _inferred_output(_model(np.float32, [100], double_quant=True))
    assert _dims(out) == [24]


def test_shape_inference_with_unknown_rank_gives_the_type_only():
    model = _model(np.float32, None)
    out = _inferred_output(model)
    assert out.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert not out.tensor_type.HasField("shape")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"a_shape": ["M", 99]}, "last dimension of 'A' is 99, but K=100"),
        ({"b_shape": [24, 2, 16]}, "input 'B' has shape"),
        ({"absmax_shape": [2, 24]}, "input 'absmax' has shape"),
        ({"bias_shape": [23]}, "input 'bias' has shape"),
        ({"block_size": 48, "b_shape": [24, 3, 24], "absmax_shape": [24, 3]}, "power of two"),
    ],
)
def test_shape_inference_rejects_inconsistent_shapes(kwargs, message):
    kwargs = {"a_shape": ["M", 100], **kwargs}
    model = _model(np.float32, kwargs.pop("a_shape"), **kwargs)
    with pytest.raises(onnx.shape_inference.InferenceError, match=re.escape(message)) as info:
        onnx.shape_inference.infer_shapes(model, strict_mode=True)
    assert "onnx_nf4::MatMulNF4" in str(info.value)


def test_checker_accepts_a_valid_node_and_rejects_a_missing_attribute():
    onnx.checker.check_model(_model(np.float32, ["M", 100], bias_shape=[24]), full_check=True, check_custom_domain=True)
    model = _model(np.float32, ["M", 100])
    del model.graph.node[0].attribute[:]
    model.graph.node[0].attribute.extend([helper.make_attribute("K", 100), helper.make_attribute("N", 24)])
    with pytest.raises(onnx.checker.ValidationError, match="block_size"):
        onnx.checker.check_model(model, full_check=True, check_custom_domain=True)


def test_checker_rejects_a_wrong_activation_type():
    errors = (onnx.checker.ValidationError, onnx.shape_inference.InferenceError)
    with pytest.raises(errors, match="unsupported type: tensor\\(double\\)"):
        onnx.checker.check_model(_model(np.float64, ["M", 100]), full_check=True, check_custom_domain=True)


def test_package_import_registers_the_schema():
    assert onnx_nf4.op.schema.is_registered()
    assert defs.has("MatMulNF4", "onnx_nf4")
