"""The ``onnx_nf4::MatMulNF4`` v1 operator schema, registered with ``onnx.defs``.

Registration happens on ``import onnx_nf4`` (through :func:`register`) and is idempotent. Once registered,
``onnx.checker.check_model(full_check=True)`` validates ``MatMulNF4`` nodes (input/output counts, types,
attributes) and ``onnx.shape_inference.infer_shapes`` infers ``Y``'s type and shape (``A``'s leading dimensions
followed by ``N``), checking ``K`` against ``A``'s last dimension and the static shapes of ``B``, ``absmax`` and
``bias`` when they are known. The normative specification is ``docs/MatMulNF4.md``.
"""

from __future__ import annotations

import threading
from typing import NoReturn

import onnx
from onnx import defs

from .contract import (
    DOMAIN,
    MS_DOMAIN,
    OP_TYPE,
    OPSET_VERSION,
    Attributes,
    ContractError,
    Input,
    a_mismatch,
    expected_shapes,
    shape_mismatch,
)
from .lookup import register_lookup_schemas

__all__ = ["DOMAIN", "MS_DOMAIN", "OPSET_VERSION", "OP_TYPE", "is_registered", "register"]

_FLOAT_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
_lock = threading.Lock()

_DOC = """\
Y = A @ W (+ bias), where the weight W[K, N] is stored as NF4 (4-bit NormalFloat) codes with one float32
absmax per block of `block_size` consecutive elements of a column of W (optionally double-quantized to uint8).
Accumulation is in float32 for every T. See docs/MatMulNF4.md of the onnx_nf4 project for the layout.
"""


def _param(name: str, type_str: str, doc: str, optional: bool = False) -> defs.OpSchema.FormalParameter:
    option = defs.OpSchema.FormalParameterOption.Optional if optional else defs.OpSchema.FormalParameterOption.Single
    return defs.OpSchema.FormalParameter(name, type_str, doc, param_option=option)


def _static_dims(type_proto: onnx.TypeProto) -> list[int | None] | None:
    """The dims of a tensor type (``None`` for a symbolic dim), or ``None`` when the rank is unknown."""
    tensor_type = type_proto.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]


def _fail(message: str) -> NoReturn:
    raise onnx.shape_inference.InferenceError(f"[{DOMAIN}::{OP_TYPE}] {message}")


def _check_input_dims(ctx, index: Input, expected: tuple[int, ...]) -> None:
    """Fail when input ``index`` has a known rank or static dim that differs from ``expected``."""
    if not ctx.has_input(index):
        return
    type_proto = ctx.get_input_type(index)
    if type_proto is None:
        return
    dims = _static_dims(type_proto)
    if dims is None:
        return
    if len(dims) != len(expected) or any(d is not None and d != e for d, e in zip(dims, expected, strict=False)):
        _fail(shape_mismatch(index.label, dims, expected))


def _infer(ctx) -> None:
    """Type and shape inference: ``Y`` has ``A``'s element type and shape ``A.shape[:-1] + [N]``."""
    a_type = ctx.get_input_type(0)
    if a_type is None or not a_type.HasField("tensor_type"):
        return
    attrs = {name: ctx.get_attribute(name) for name in ("K", "N", "block_size")}
    if any(attr is None for attr in attrs.values()):
        return  # the checker reports the missing required attribute
    optional = [ctx.get_attribute(name) for name in ("nested_block_size", "accuracy_level")]
    try:
        contract = Attributes.create(*(int(attrs[name].i) for name in ("K", "N", "block_size")),
                                     *(None if attr is None else int(attr.i) for attr in optional))  # fmt: skip
    except ContractError as err:
        _fail(err.detail)
    shapes = expected_shapes(contract)
    for index in (Input.B, Input.ABSMAX, Input.BIAS):
        _check_input_dims(ctx, index, shapes[index])
    N, K = contract.N, contract.K

    out = onnx.TypeProto()
    out.tensor_type.elem_type = a_type.tensor_type.elem_type
    a_dims = _static_dims(a_type)
    if a_dims is not None:
        if not a_dims:
            _fail("input 'A' must have rank >= 1")
        if a_dims[-1] is not None and a_dims[-1] != K:
            _fail(a_mismatch(a_dims[-1], K))
        out.tensor_type.shape.SetInParent()
        for dim in a_type.tensor_type.shape.dim[:-1]:
            out.tensor_type.shape.dim.add().CopyFrom(dim)
        out.tensor_type.shape.dim.add().dim_value = N
    ctx.set_output_type(0, out)


def _build_schema() -> defs.OpSchema:
    attr = defs.OpSchema.Attribute
    int_type = defs.OpSchema.AttrType.INT
    schema = defs.OpSchema(
        OP_TYPE,
        DOMAIN,
        OPSET_VERSION,
        _DOC,
        inputs=[
            _param("A", "T", "Activations [..., K] (rank >= 1)."),
            _param("B", "tensor(uint8)", "Packed 4-bit codes [N, k_blocks, block_size / 2], high nibble first."),
            _param("absmax", "T2", "Per-block scales [N, k_blocks]: float32, or uint8 when double-quantized."),
            _param("nested_absmax", "tensor(float)", "Double quant: nested block scales.", optional=True),
            _param("nested_code", "tensor(float)", "Double quant: the 256-entry code table.", optional=True),
            _param("absmax_offset", "tensor(float)", "Double quant: offset added back, [] or [1].", optional=True),
            _param("bias", "T", "Bias [N] added to every output row.", optional=True),
        ],
        outputs=[_param("Y", "T", "Output [..., N] (the leading dimensions of A).")],
        type_constraints=[
            ("T", _FLOAT_TYPES, "Activation, bias and output type."),
            ("T2", ["tensor(float)", "tensor(uint8)"], "absmax type: float32 scales or uint8 codes."),
        ],
        attributes=[
            attr("K", int_type, "Reduction size (last dimension of A, rows of W).", required=True),
            attr("N", int_type, "Output features (columns of W).", required=True),
            attr("block_size", int_type, "Elements per absmax block along K (power of two, 16..4096).", required=True),
            attr("nested_block_size", onnx.helper.make_attribute("nested_block_size", 256),
                 "absmax entries per nested block (double quantization)."),
            attr("accuracy_level", onnx.helper.make_attribute("accuracy_level", 0),
                 "0: float32 compute; 4: a kernel may use int8 activations."),
        ],
        node_determinism=defs.OpSchema.NodeDeterminism.Deterministic,
    )  # fmt: skip
    schema.set_type_and_shape_inference_function(_infer)
    return schema


def is_registered() -> bool:
    """Whether ``onnx_nf4::MatMulNF4`` v1 is known to ``onnx.defs``."""
    return defs.has(OP_TYPE, OPSET_VERSION, DOMAIN)


def register() -> None:
    """Register the ``MatMulNF4`` schema, and those of the NF4 embedding lookup (:mod:`.lookup`), with
    ``onnx.defs`` (a no-op when they are already registered)."""
    with _lock:
        if not is_registered():
            defs.register_schema(_build_schema())
    register_lookup_schemas()
