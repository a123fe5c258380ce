"""``DequantizeNF4Pass``: every ``MatMulNF4`` / ``MatMulBnb4`` node back to a float ``MatMul`` (+ ``Add`` of its bias),
every NF4 embedding lookup (``onnx_nf4.lookup::GatherNF4``) back to a ``Gather`` over the decoded table (in the
lookup's output type ``to``; a table shared with a ``MatMul`` weight becomes two float tensors again).

The weight is the decoded NF4 weight (``NF4[code] * absmax`` in float32) stored in the op's T (found from the
absmax of ``MatMulBnb4``, the bias, ``A``'s type, or shape inference; when it stays unknown, the float32 weight
goes through a ``CastLike`` to ``A``). NF4 tensors shared by several nodes give one shared float weight. Every
node is checked against the op's contract first (:mod:`onnx_nf4.op.contract`): an inconsistent (crafted or corrupt)
node raises ``ValueError`` naming it. Unused NF4 initializers are removed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from ..codec.blockwise import dequantize_blockwise
from ..codec.double_quant import NestedAbsmax
from ..codec.layout import QuantizedWeight, dequantize_weight
from ..model.graph import Initializers, node_label, remove_unused_initializers
from ..op.contract import Attributes, Input, TensorInfo, check_bnb4_inputs, check_weight_inputs, is_bnb4, is_matmul_nf4
from ..op.lookup import LOOKUP_DOMAIN, LookupInput, is_lookup

__all__ = ["DequantizeNF4Pass", "DequantizeResult"]


@dataclass
class DequantizeResult(ir.passes.PassResult):
    """What :class:`DequantizeNF4Pass` returns: the model, whether it changed, and the nodes it replaced."""

    layers: list[str] = field(default_factory=list)


def _attr(node: ir.Node, name: str) -> int | None:
    attr = node.attributes.get(name)
    return None if attr is None else int(attr.as_int())


def _const(node: ir.Node, index: int) -> np.ndarray | None:
    value = node.inputs[index] if index < len(node.inputs) else None
    if value is None:
        return None
    if value.const_value is None:
        raise ValueError(f"{node.op_type} node {node.name!r}: input {index} ({value.name!r}) is not an initializer")
    return value.const_value.numpy()


def _info(array: np.ndarray | None) -> TensorInfo | None:
    return None if array is None else TensorInfo(array.dtype.name, tuple(array.shape))


def _attributes(node: ir.Node) -> Attributes:
    values = {name: _attr(node, name) for name in ("K", "N", "block_size", "nested_block_size")}
    for name in ("K", "N", "block_size"):
        if values[name] is None:
            raise ValueError(f"{node.op_type} node {node.name!r} has no attribute {name!r}")
    return Attributes.create(**values, node=node.name or "", op_type=node.op_type)  # type: ignore[arg-type]


def decoded_weight(node: ir.Node) -> np.ndarray:
    """The float32 ``W[K, N]`` of a ``MatMulNF4`` or ``MatMulBnb4`` node, after checking it against the contract."""
    attrs = _attributes(node)
    K, N, bs = attrs.K, attrs.N, attrs.block_size
    if is_bnb4(node.domain, node.op_type):
        packed, absmax = _const(node, Input.B), _const(node, Input.ABSMAX)
        if packed is None or absmax is None:
            raise ValueError(f"{node.op_type} node {node.name!r}: input B and absmax are required")
        check_bnb4_inputs(K, N, bs, _info(packed), _info(absmax), node=node.name or "")  # type: ignore[arg-type]
        return dequantize_blockwise(packed, absmax.astype(np.float32), (N, K), bs).T
    arrays = {position: _const(node, position) for position in Input if position not in (Input.A, Input.BIAS)}
    infos = [None if position in (Input.A, Input.BIAS) else _info(arrays[position]) for position in Input]
    double_quant = check_weight_inputs(attrs, infos)
    packed, absmax = arrays[Input.B], arrays[Input.ABSMAX]
    nested = None
    if double_quant:
        offset = np.float32(arrays[Input.ABSMAX_OFFSET].reshape(()))  # type: ignore[union-attr]
        nested = NestedAbsmax(arrays[Input.NESTED_ABSMAX], arrays[Input.NESTED_CODE], offset, attrs.nested_block_size)
    return dequantize_weight(QuantizedWeight(K, N, bs, packed, absmax, nested))  # type: ignore[arg-type]


def _source(value: ir.Value | None) -> ir.Value:
    """``value``, or the input of the ``Reshape`` that produces it (a lookup reading ``MatMulBnb4``'s flat bytes)."""
    assert value is not None
    producer = value.producer()
    if producer is not None and producer.op_type == "Reshape" and producer.inputs[0] is not None:
        return producer.inputs[0]
    return value


def _owner(value: ir.Value | None, node: ir.Node) -> ir.Graph:
    source = _source(value)
    graph = source.graph if isinstance(source.graph, ir.Graph) else node.graph
    assert isinstance(graph, ir.Graph)
    return graph


def decoded_table(node: ir.Node) -> np.ndarray:
    """The float32 table ``E[V, H]`` of a ``GatherNF4`` / ``GatherNF4DQ`` node."""
    arrays = []
    for position in list(LookupInput)[1:]:
        value = node.inputs[position] if position < len(node.inputs) else None
        if value is None:
            arrays.append(None)
            continue
        source = _source(value)
        if source.const_value is None:
            raise ValueError(f"{node.op_type} node {node.name!r}: input {position} ({value.name!r}) is not a constant")
        arrays.append(source.const_value.numpy())
    packed, absmax, nested_absmax, nested_code, offset = arrays + [None] * (5 - len(arrays))
    if packed is None or absmax is None or "row_size" not in node.attributes:
        raise ValueError(f"{node.op_type} node {node.name!r}: packed, absmax and row_size are required")
    H = int(node.attributes["row_size"].as_int())
    bs = 2 * packed.size // max(absmax.size, 1)  # bs / 2 bytes per block (also for MatMulBnb4's flat tensors)
    kb = -(-H // bs) if bs else 0
    if not bs or not kb or absmax.size % kb or packed.size != absmax.size * bs // 2:
        raise ValueError(f"{node.op_type} node {node.name!r}: packed and absmax do not hold a table of rows of {H}")
    V = absmax.size // kb
    nested = None
    if nested_absmax is not None:
        nbs = int(node.attributes["nested_block_size"].as_int())
        nested = NestedAbsmax(nested_absmax, nested_code, np.float32(offset.reshape(())), nbs)  # type: ignore[union-attr]
    q = QuantizedWeight(H, V, bs, packed.reshape(V, kb, bs // 2), absmax.reshape(V, kb), nested)
    if nested is None:
        q = QuantizedWeight(H, V, bs, q.packed, q.absmax.astype(np.float32))
    return dequantize_weight(q).T


def _remove_unused_reshapes(model: ir.Model) -> None:
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
        out = node.outputs[0]
        if node.op_type == "Reshape" and node.inputs[0] is not None and node.inputs[0].is_initializer() \
                and not out.uses() and not out.is_graph_output():  # fmt: skip
            assert node.graph is not None
            node.graph.remove(node, safe=True)


def _activation_dtype(node: ir.Node) -> ir.DataType | None:
    """The T of a ``MatMulNF4`` / ``MatMulBnb4`` node, when the graph tells it."""
    if is_bnb4(node.domain, node.op_type):
        absmax = node.inputs[Input.ABSMAX]
        return absmax.dtype if absmax is not None else None  # MatMulBnb4's absmax is of type T
    bias = node.inputs[Input.BIAS] if len(node.inputs) > Input.BIAS else None
    if bias is not None and bias.dtype is not None:
        return bias.dtype
    return node.inputs[Input.A].dtype if node.inputs[Input.A] is not None else None


class DequantizeNF4Pass(ir.passes.InPlacePass):
    """Replace every ``MatMulNF4`` / ``MatMulBnb4`` node by a float ``MatMul`` (see the module docstring).

    Returns a :class:`DequantizeResult` listing the replaced nodes (empty for a float model).

    Raises:
        ValueError: a node that breaks the op's contract (the message names it).
    """

    def call(self, model: ir.Model) -> DequantizeResult:
        targets = [
            node
            for node in ir.traversal.RecursiveGraphIterator(model.graph)
            if is_matmul_nf4(node.domain, node.op_type) or is_bnb4(node.domain, node.op_type)
        ]
        if any(_activation_dtype(node) is None for node in targets):
            ShapeInferencePass(strict_mode=False)(model)  # leaves the model unchanged if inference fails
        initializers = Initializers(model)
        decoded: dict[tuple[int, int, ir.DataType | None], ir.Value] = {}
        for node in targets:
            dtype = _activation_dtype(node)
            packed, absmax = node.inputs[Input.B], node.inputs[Input.ABSMAX]
            key = (id(packed), id(absmax), dtype)
            if key not in decoded:
                decoded[key] = self._weight_value(node, dtype, initializers)
            self._replace(node, decoded[key], dtype, initializers)
        lookups = [
            node for node in ir.traversal.RecursiveGraphIterator(model.graph) if is_lookup(node.domain, node.op_type)
        ]
        tables: dict[tuple[int, int, int], ir.Value] = {}
        for node in lookups:
            packed, absmax = node.inputs[LookupInput.PACKED], node.inputs[LookupInput.ABSMAX]
            to = int(node.attributes["to"].as_int()) if "to" in node.attributes else int(ir.DataType.FLOAT)
            key = (id(packed), id(absmax), to)
            if key not in tables:
                table = decoded_table(node).astype(ir.DataType(to).numpy())
                tables[key] = initializers.add(_owner(packed, node), f"{_source(packed).name}_table", table)
            out = node.outputs[0]
            y = initializers.value(f"{out.name}_gather")
            y.type, y.shape = out.type, out.shape
            gather = ir.node("Gather", [tables[key], node.inputs[LookupInput.INDICES]], outputs=[y], name=node.name)
            assert isinstance(node.graph, ir.Graph)
            ir.convenience.replace_nodes_and_values(node.graph, node, [node], [gather], [out], [y])
        if lookups:
            _remove_unused_reshapes(model)
            for identifier in [key for key in model.functions if key[0] == LOOKUP_DOMAIN]:
                del model.functions[identifier]
            model.opset_imports.pop(LOOKUP_DOMAIN, None)
        if targets or lookups:
            remove_unused_initializers(model)
        layers = [node_label(node) for node in [*targets, *lookups]]
        return DequantizeResult(model, modified=bool(layers), layers=layers)

    @staticmethod
    def _weight_value(node: ir.Node, dtype: ir.DataType | None, initializers: Initializers) -> ir.Value:
        """The decoded weight as an initializer of T (float32 when T is unknown), visible wherever B is."""
        packed = node.inputs[Input.B]
        assert packed is not None
        weight = decoded_weight(node)
        weight = weight if dtype is None else weight.astype(dtype.numpy())
        graph = node.graph
        owner = packed.graph if isinstance(packed.graph, ir.Graph) else graph
        assert isinstance(owner, ir.Graph)
        return initializers.add(owner, f"{packed.name}_dequantized", weight)

    @staticmethod
    def _replace(node: ir.Node, weight: ir.Value, dtype: ir.DataType | None, initializers: Initializers) -> None:
        graph, a, out = node.graph, node.inputs[Input.A], node.outputs[0]
        assert isinstance(graph, ir.Graph) and a is not None
        new_nodes: list[ir.Node] = []
        if dtype is None:
            cast = initializers.value(f"{weight.name}_cast")
            new_nodes.append(ir.node("CastLike", [weight, a], outputs=[cast], name=f"{node.name}_cast"))
            weight = cast
        y = initializers.value(f"{out.name}_matmul")
        new_nodes.append(ir.node("MatMul", [a, weight], outputs=[y], name=node.name))
        bias = node.inputs[Input.BIAS] if is_matmul_nf4(node.domain, node.op_type) and len(node.inputs) > 6 else None
        if bias is not None:
            summed = initializers.value(f"{out.name}_bias")
            new_nodes.append(ir.node("Add", [y, bias], outputs=[summed], name=f"{node.name}_bias"))
            y = summed
        ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, [out], [y])
