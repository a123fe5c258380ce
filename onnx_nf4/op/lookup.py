"""The NF4 embedding lookup ``onnx_nf4.lookup::GatherNF4``: an ONNX model-local function of standard ops.

``GatherNF4(indices, packed, absmax[, nested_absmax, nested_code, absmax_offset])`` is ``Gather(E, indices)``
(axis 0) for a table ``E[V, H]`` stored in the ``MatMulNF4`` weight layout of ``W = E.T`` (``K = H``, ``N = V``,
see ``docs/MatMulNF4.md``): ``packed`` uint8 ``[V, kb, bs/2]`` with ``kb = ceil(H / bs)`` (each row zero-padded to
``kb * bs``), ``absmax`` ``[V, kb]``. This is bitsandbytes' ``EmbeddingNF4`` layout (blocks along H within a row),
and the bytes of a tied ``MatMulNF4`` weight: one tensor feeds both nodes.

Because it is a function whose body uses only default-domain ops (opset >= 13), every onnxruntime runs it, on
every execution provider, with or without the op library: onnxruntime inlines the body when it loads the model.
The body:

1. ``rows = Gather(packed, indices)`` (``[*I, kb, bs/2]`` for indices of shape ``I``) and
   ``Gather(absmax, indices)``. Negative indices count from the end, and an index outside ``[-V, V)`` is
   onnxruntime's ``Gather`` error: the table is never read outside its bounds.
2. Each byte ``b`` becomes two floats at once: ``Gather(PAIRS, Cast<int32>(b))`` with ``PAIRS[b] =
   (NF4_CODE[b >> 4], NF4_CODE[b & 15])`` (high nibble first, as the codec packs), ``[*I, kb, bs/2, 2]``.
3. ``Mul`` by the float32 absmax ``[*I, kb, 1, 1]``, ``Reshape`` to ``I + [kb * bs]``, ``Slice`` the last axis
   to ``H`` (``row_size``), ``Cast`` to ``to``. (The leading dimensions are never flattened, so an empty
   ``indices`` reshapes too: ``Reshape`` copies a 0 from the same position of its input.)

So each output row is ``fl32(NF4_CODE[code] * absmax)``, bit-identical to
:func:`onnx_nf4.codec.dequantize_blockwise` of that row, then rounded once to the output type ``to`` (the table's
dtype: float32, float16 or bfloat16).

``GatherNF4DQ`` takes double-quantized absmax (uint8 codes ``[V, kb]``, ``nested_absmax`` float32
``[ceil(V * kb / nested_block_size)]``, ``nested_code`` float32 ``[256]``, ``absmax_offset`` float32 scalar) and
decodes the absmax of the looked-up rows exactly as :func:`onnx_nf4.codec.double_quant.dequantize_absmax`:
``fl32(fl32(nested_code[q] * nested_absmax[(v * kb + j) // nested_block_size]) + absmax_offset)`` for row ``v``
(negative ``v`` counted from the end) and block ``j``.

Attributes (of the calling node): ``row_size`` (int, ``H``), ``to`` (int, the ``TensorProto`` type of the output)
and, for ``GatherNF4DQ``, ``nested_block_size`` (int).
"""

from __future__ import annotations

import threading
from enum import IntEnum

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, defs, helper, numpy_helper

from ..codec.codebook import NF4_CODE
from .contract import ONNX_DOMAINS

__all__ = [
    "LOOKUP_DOMAIN",
    "LOOKUP_DQ_OP",
    "LOOKUP_OP",
    "LOOKUP_OPS",
    "MIN_LOOKUP_OPSET",
    "NF4_PAIRS",
    "LookupInput",
    "add_lookup_function",
    "is_lookup",
    "lookup_function",
    "register_lookup_schemas",
]

LOOKUP_DOMAIN = "onnx_nf4.lookup"
LOOKUP_OP = "GatherNF4"
LOOKUP_DQ_OP = "GatherNF4DQ"
LOOKUP_OPS = (LOOKUP_OP, LOOKUP_DQ_OP)
#: The lowest default-domain opset the function bodies are written for (``Constant`` ``value_int``, ``Reshape``
#: and ``Slice`` with inputs, ``Gather`` with negative indices).
MIN_LOOKUP_OPSET = 13

#: float32 ``[256, 2]``: the two NF4 values a packed byte holds, high nibble first.
NF4_PAIRS: np.ndarray = np.stack([NF4_CODE[np.arange(256) >> 4], NF4_CODE[np.arange(256) & 15]], axis=1)
NF4_PAIRS.setflags(write=False)


class LookupInput(IntEnum):
    """Input positions of ``GatherNF4`` / ``GatherNF4DQ``: the weight inputs sit where ``MatMulNF4`` has them."""

    INDICES = 0
    PACKED = 1
    ABSMAX = 2
    NESTED_ABSMAX = 3
    NESTED_CODE = 4
    ABSMAX_OFFSET = 5


def is_lookup(domain: str, op_type: str) -> bool:
    """Whether a node is an NF4 embedding lookup."""
    return domain == LOOKUP_DOMAIN and op_type in LOOKUP_OPS


def _constant(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(array), name))


def _attr_ref(node: onnx.NodeProto, attribute: str) -> onnx.NodeProto:
    """``node`` with its only attribute taken from the calling node's ``attribute``."""
    node.attribute[0].ref_attr_name = attribute
    return node


def _absmax_dq_nodes() -> list[onnx.NodeProto]:
    """``absmax_f32 [*I, kb]`` decoded from the double-quantized absmax of the rows ``indices`` (module doc)."""
    return [
        _attr_ref(helper.make_node("Constant", [], ["nested_bs"], value_int=0), "nested_block_size"),
        _constant("zero", np.array(0, np.int64)),
        _constant("one", np.array(1, np.int64)),
        _constant("scalar", np.zeros(0, np.int64)),
        helper.make_node("Slice", ["packed_shape", "start0", "start1"], ["rows_total"]),  # [V]
        helper.make_node("Reshape", ["kb1", "scalar"], ["kb"]),
        helper.make_node("Cast", ["indices"], ["v"], to=TensorProto.INT64),
        helper.make_node("Less", ["v", "zero"], ["negative"]),
        helper.make_node("Add", ["v", "rows_total"], ["v_wrapped"]),
        helper.make_node("Where", ["negative", "v_wrapped", "v"], ["row"]),
        helper.make_node("Mul", ["row", "kb"], ["first"]),
        helper.make_node("Unsqueeze", ["first", "last"], ["first_col"]),
        helper.make_node("Range", ["zero", "kb", "one"], ["block"]),
        helper.make_node("Add", ["first_col", "block"], ["entry"]),  # [*I, kb]: flat absmax index
        helper.make_node("Div", ["entry", "nested_bs"], ["nested_index"]),
        helper.make_node("Gather", ["nested_absmax", "nested_index"], ["scale"]),
        helper.make_node("Gather", ["absmax", "indices"], ["absmax_codes"]),
        helper.make_node("Cast", ["absmax_codes"], ["absmax_codes_i32"], to=TensorProto.INT32),
        helper.make_node("Gather", ["nested_code", "absmax_codes_i32"], ["code_value"]),
        helper.make_node("Mul", ["code_value", "scale"], ["absmax_scaled"]),
        helper.make_node("Add", ["absmax_scaled", "absmax_offset"], ["absmax_f32"]),
    ]


def lookup_function(double_quant: bool, opset: int) -> onnx.FunctionProto:
    """The ``FunctionProto`` of ``GatherNF4`` (or ``GatherNF4DQ``) for a model importing default opset ``opset``.

    Raises:
        ValueError: ``opset`` is below :data:`MIN_LOOKUP_OPSET`.
    """
    if opset < MIN_LOOKUP_OPSET:
        raise ValueError(f"the NF4 lookup needs default-domain opset >= {MIN_LOOKUP_OPSET}, the model has {opset}")
    nodes = [
        _constant("pairs", NF4_PAIRS),
        _constant("last", np.array([-1], np.int64)),
        _constant("last_two", np.array([-1, -2], np.int64)),
        _constant("start0", np.array([0], np.int64)),
        _constant("start1", np.array([1], np.int64)),
        _constant("start2", np.array([2], np.int64)),
        _constant("start3", np.array([3], np.int64)),
        _attr_ref(helper.make_node("Constant", [], ["row_size0"], value_int=0), "row_size"),
        helper.make_node("Reshape", ["row_size0", "start1"], ["row_size1"]),  # [H]
        helper.make_node("Shape", ["packed"], ["packed_shape"]),
        helper.make_node("Slice", ["packed_shape", "start1", "start2"], ["kb1"]),  # [kb]
        helper.make_node("Slice", ["packed_shape", "start2", "start3"], ["half_block1"]),  # [bs / 2]
        helper.make_node("Mul", ["kb1", "half_block1"], ["padded_half"]),
        helper.make_node("Add", ["padded_half", "padded_half"], ["padded_size"]),  # [kb * bs]
        helper.make_node("Gather", ["packed", "indices"], ["rows"]),  # [*I, kb, bs/2]
        helper.make_node("Cast", ["rows"], ["rows_i32"], to=TensorProto.INT32),
        helper.make_node("Gather", ["pairs", "rows_i32"], ["values"]),  # [*I, kb, bs/2, 2]
    ]
    if double_quant:
        nodes += _absmax_dq_nodes()
    else:
        nodes += [
            helper.make_node("Gather", ["absmax", "indices"], ["absmax_rows"]),
            helper.make_node("Cast", ["absmax_rows"], ["absmax_f32"], to=TensorProto.FLOAT),
        ]
    nodes += [
        helper.make_node("Unsqueeze", ["absmax_f32", "last_two"], ["scales"]),  # [*I, kb, 1, 1]
        helper.make_node("Mul", ["values", "scales"], ["decoded"]),
        helper.make_node("Shape", ["indices"], ["indices_shape"]),
        helper.make_node("Concat", ["indices_shape", "padded_size"], ["padded_shape"], axis=0),
        helper.make_node("Reshape", ["decoded", "padded_shape"], ["padded"]),  # [*I, kb * bs]
        helper.make_node("Slice", ["padded", "start0", "row_size1", "last"], ["output_f32"]),  # [*I, H]
        _attr_ref(helper.make_node("Cast", ["output_f32"], ["output"], to=TensorProto.FLOAT), "to"),
    ]
    inputs = ["indices", "packed", "absmax"]
    attributes = ["row_size", "to"]
    if double_quant:
        inputs += ["nested_absmax", "nested_code", "absmax_offset"]
        attributes.append("nested_block_size")
    name = LOOKUP_DQ_OP if double_quant else LOOKUP_OP
    return helper.make_function(
        LOOKUP_DOMAIN, name, inputs, ["output"], nodes, [helper.make_opsetid("", opset)], attributes=attributes
    )


def add_lookup_function(model: ir.Model, double_quant: bool) -> None:
    """Add the lookup function (and its domain's opset import) to ``model`` unless it has it already.

    Raises:
        ValueError: the model's default-domain opset is below :data:`MIN_LOOKUP_OPSET`.
    """
    name = LOOKUP_DQ_OP if double_quant else LOOKUP_OP
    if (LOOKUP_DOMAIN, name, "") in model.functions:
        return
    opset = next((model.opset_imports[domain] for domain in ONNX_DOMAINS if domain in model.opset_imports), 1)
    function = ir.serde.deserialize_function(lookup_function(double_quant, opset))
    model.functions[function.identifier()] = function
    model.opset_imports[LOOKUP_DOMAIN] = 1


# ----------------------------------------------------------------------------------------------------------------
# onnx.defs schemas, so that onnx.checker (check_custom_domain=True) and onnx shape inference know the nodes: the
# checker does not look a custom-domain node up among the model's functions.

_lock = threading.Lock()


def _infer(ctx) -> None:
    """``output``: element type ``to``, shape ``indices.shape + [row_size]``."""
    to, row_size = ctx.get_attribute("to"), ctx.get_attribute("row_size")
    if to is None or row_size is None:
        return  # the checker reports the missing attribute
    out = onnx.TypeProto()
    out.tensor_type.elem_type = int(to.i)
    indices = ctx.get_input_type(LookupInput.INDICES)
    if indices is not None and indices.tensor_type.HasField("shape"):
        out.tensor_type.shape.SetInParent()
        for dim in indices.tensor_type.shape.dim:
            out.tensor_type.shape.dim.add().CopyFrom(dim)
        out.tensor_type.shape.dim.add().dim_value = int(row_size.i)
    ctx.set_output_type(0, out)


def _schema(double_quant: bool) -> defs.OpSchema:
    param, single = defs.OpSchema.FormalParameter, defs.OpSchema.FormalParameterOption.Single
    int_type = defs.OpSchema.AttrType.INT
    inputs = [
        param("indices", "Tind", "Row indices, any shape (negative: from the end).", param_option=single),
        param("packed", "tensor(uint8)", "NF4 codes [V, kb, bs/2], high nibble first.", param_option=single),
        param("absmax", "T2", "Block scales [V, kb] (float32/float16; uint8 codes with double quant).",
              param_option=single),
    ]  # fmt: skip
    attributes = [
        defs.OpSchema.Attribute("row_size", int_type, "H, the row length.", required=True),
        defs.OpSchema.Attribute("to", int_type, "Output element type (TensorProto).", required=True),
    ]
    if double_quant:
        inputs += [
            param("nested_absmax", "tensor(float)", "Nested block scales.", param_option=single),
            param("nested_code", "tensor(float)", "The 256-entry code table.", param_option=single),
            param("absmax_offset", "tensor(float)", "Offset added back to the absmax.", param_option=single),
        ]
        attributes.append(
            defs.OpSchema.Attribute("nested_block_size", int_type, "Absmax per nested block.", required=True)
        )
    schema = defs.OpSchema(
        LOOKUP_DQ_OP if double_quant else LOOKUP_OP,
        LOOKUP_DOMAIN,
        1,
        "Gather (axis 0) of rows of an NF4 table; see onnx_nf4/op/lookup.py. The model holds it as a function.",
        inputs=inputs,
        outputs=[param("output", "T", "indices.shape + [row_size]", param_option=single)],
        type_constraints=[
            ("Tind", ["tensor(int32)", "tensor(int64)"], "Index type."),
            ("T2", ["tensor(float)", "tensor(float16)", "tensor(uint8)"], "absmax type."),
            ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "Output type (attribute to)."),
        ],
        attributes=attributes,
    )
    schema.set_type_and_shape_inference_function(_infer)
    return schema


def register_lookup_schemas() -> None:
    """Register the ``GatherNF4`` / ``GatherNF4DQ`` schemas with ``onnx.defs`` (idempotent)."""
    with _lock:
        for double_quant in (False, True):
            if not defs.has(LOOKUP_DQ_OP if double_quant else LOOKUP_OP, 1, LOOKUP_DOMAIN):
                defs.register_schema(_schema(double_quant))
