"""Embedding tables to NF4: planning a ``Gather`` over a constant table, and writing its ``GatherNF4`` lookup.

A ``Gather`` (axis 0) over a constant 2-D float table ``E[V, H]`` (an initializer, a ``Constant`` node, or the
``Transpose`` of a constant ``C[H, V]`` as onnxruntime-genai's builder writes a tied embedding) becomes
``onnx_nf4.lookup::GatherNF4`` (:mod:`onnx_nf4.op.lookup`, a model-local function of standard ops). The table is
quantized as the ``MatMul`` weight ``W = E.T`` (``K = H``, ``N = V``): so a tied ``lm_head`` (``MatMul(x, E.T)``,
``Gemm(x, E, transB=1)``, ``MatMul(x, C)``) has the same key, and one NF4 tensor (and one absmax) feeds both nodes.
A separate initializer holding the same values (exporters fold ``E.T`` into a new one) is found by value
(:func:`tie_equal_weights`).

Which tables are taken (:class:`~onnx_nf4.QuantizeOptions`): those with at least ``embedding_min_rows`` rows (the
vocabulary, not position or token-type tables) and ``min_elements`` elements, and any table tied to a quantized
weight; ``exclude`` matches the ``Gather`` node's name or the table's name.

With format ``com.microsoft`` a tied table shares ``MatMulBnb4``'s flat bytes when ``H % block_size == 0`` (flat
blocks then are row blocks; the lookup reads them through two ``Reshape`` nodes); otherwise the lookup gets its own
row-padded NF4 tensors and the report says that the weight is stored twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ..model.graph import Initializers, constant_tensor, int_attr, release
from ..op.contract import ONNX_DOMAINS
from ..op.lookup import LOOKUP_DOMAIN, LOOKUP_DQ_OP, LOOKUP_OP, MIN_LOOKUP_OPSET, add_lookup_function
from .encoding import as_numpy_float
from .plan import Plan, Planner, Skip, weight_source
from .writers import Encoded

__all__ = ["LookupPlan", "is_table_gather", "plan_lookup", "rewrite_lookup", "tie_equal_weights"]

_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


@dataclass
class LookupPlan:
    """One ``Gather`` over an embedding table to rewrite; the weight it stands for is ``W[K=H, N=V] = E.T``.

    Attributes:
        node: the ``Gather``.
        weight: the constant holding the values (``E``, or ``C = E.T`` under a ``Transpose``).
        tensor: its tensor.
        transpose: whether ``W = weight.T`` (``weight`` is ``E``); ``False`` when ``weight`` is ``C``.
        K, N: ``H`` and ``V``.
        via: the ``Transpose`` between ``weight`` and the ``Gather``, or ``None``.
        few_rows: the table has fewer than ``embedding_min_rows`` rows: it is rewritten only when tied.
        tied: the key of an equal ``MatMul`` / ``Gemm`` weight whose tensors the lookup uses.
    """

    node: ir.Node
    weight: ir.Value
    tensor: ir.TensorProtocol
    transpose: bool
    K: int
    N: int
    via: ir.Node | None = None
    few_rows: bool = False
    tied: tuple[object, ...] | None = None

    @property
    def key(self) -> tuple[object, ...]:
        """As :attr:`onnx_nf4.passes.plan.Plan.key`: equal for a tied ``MatMul`` / ``Gemm`` weight."""
        return self.tied or (id(self.weight), self.transpose)

    @property
    def graph(self) -> ir.Graph:
        assert self.node.graph is not None
        return self.node.graph  # type: ignore[return-value]


def is_table_gather(node: ir.Node) -> bool:
    """Whether ``node`` is a default-domain ``Gather`` whose data is a constant 2-D float table."""
    if node.op_type != "Gather" or node.domain not in ONNX_DOMAINS or not node.inputs:
        return False
    source = weight_source(node.inputs[0])
    tensor = constant_tensor(source.weight)
    return tensor is not None and len(tensor.shape) == 2 and tensor.dtype in _FLOAT_TYPES


def plan_lookup(node: ir.Node, planner: Planner, opset: int) -> LookupPlan:
    """The plan of a :func:`is_table_gather` node; raises :class:`~onnx_nf4.passes.plan.Skip` with the reason."""
    source = weight_source(node.inputs[0])
    value = source.weight
    assert value is not None and value.name is not None
    if value.is_graph_input():
        raise Skip(f"the table ({value.name!r}) is an initializer that is also a graph input (overridable)")
    tensor = constant_tensor(value)
    assert tensor is not None
    rows, cols = (int(d) for d in tensor.shape)
    V, H = (cols, rows) if source.transposed else (rows, cols)
    axis = int_attr(node, "axis", 0)
    if axis not in (0, -2):
        raise Skip(f"Gather on axis {axis}; only a lookup of rows (axis 0) is rewritten")
    if opset < MIN_LOOKUP_OPSET:
        raise Skip(f"the model's opset {opset} is below {MIN_LOOKUP_OPSET}, which the NF4 lookup is written for")
    if V * H == 0:
        raise Skip(f"the table has no elements (shape {[V, H]})")
    reason = planner.excluded(node, value.name)
    if reason:
        raise Skip(reason)
    if planner.options.min_elements > V * H:
        raise Skip(f"table has {V * H} elements, fewer than min_elements={planner.options.min_elements}")
    few_rows = planner.options.embedding_min_rows > V
    return LookupPlan(node, value, tensor, not source.transposed, H, V, source.via, few_rows)


def _values(plan: Plan | LookupPlan) -> np.ndarray:
    """The weight ``W[K, N]`` a plan stands for (a view of the tensor's data)."""
    w = as_numpy_float(plan.tensor)
    return w.T if plan.transpose else w


def tie_equal_weights(lookups: Sequence[LookupPlan], plans: Sequence[Plan]) -> None:
    """Give a ``MatMul`` / ``Gemm`` plan whose weight equals a lookup's ``E.T`` (a separate initializer with the
    same values, as exporters fold a tied ``lm_head``) the lookup's key, so that both use one NF4 tensor.

    Only weights of the same shape and dtype are compared (first a row, then in full); each is read once.
    """
    for lookup in lookups:
        candidates = [
            plan
            for plan in plans
            if plan.key != lookup.key
            and (plan.K, plan.N) == (lookup.K, lookup.N)
            and plan.tensor.dtype == lookup.tensor.dtype
        ]
        if not candidates:
            continue
        table = _values(lookup)
        for plan in candidates:
            if plan.tied is not None:
                continue
            other = _values(plan)
            if np.array_equal(other[:, 0], table[:, 0]) and np.array_equal(other, table):
                for same in plans:
                    if same.key == plan.key and same is not plan:
                        same.tied = lookup.key
                plan.tied = lookup.key
            release(plan.tensor)
        release(lookup.tensor)


def rewrite_lookup(plan: LookupPlan, encoded: Encoded, initializers: Initializers, model: ir.Model) -> None:
    """Replace the plan's ``Gather`` by a ``GatherNF4`` (``GatherNF4DQ``) node reading ``encoded``'s tensors.

    ``MatMulBnb4``'s flat tensors (``[V * H / 2]``, ``[V * H / bs]``, only shared when ``H % bs == 0``) are read
    through ``Reshape`` nodes to ``[V, kb, bs/2]`` and ``[V, kb]``.
    """
    node, graph = plan.node, plan.graph
    double_quant = len(encoded.inputs) > 2
    add_lookup_function(model, double_quant)
    bs = encoded.attributes["block_size"]
    kb = -(-plan.K // bs)
    new_nodes: list[ir.Node] = []
    inputs = list(encoded.inputs)
    for position, shape in ((0, [plan.N, kb, bs // 2]), (1, [plan.N, kb])):  # codes, absmax
        value = inputs[position]
        assert value is not None and value.shape is not None
        if len(value.shape) != len(shape):
            target = initializers.add(graph, f"{value.name}_shape", np.array(shape, dtype=np.int64))
            reshaped = initializers.value(f"{value.name}_rows")
            reshaped.type, reshaped.shape = value.type, ir.Shape(shape)
            new_nodes.append(ir.node("Reshape", [value, target], outputs=[reshaped], name=f"{reshaped.name}_reshape"))
            inputs[position] = reshaped
    attributes = {"row_size": plan.K, "to": int(plan.tensor.dtype)}
    if double_quant:
        attributes["nested_block_size"] = encoded.attributes["nested_block_size"]
    old_out = node.outputs[0]
    y = initializers.value(f"{old_out.name}_nf4")
    y.type, y.shape = old_out.type, old_out.shape
    op_type = LOOKUP_DQ_OP if double_quant else LOOKUP_OP
    new_nodes.append(
        ir.node(op_type, [node.inputs[1], *inputs], attributes, domain=LOOKUP_DOMAIN, outputs=[y], name=node.name)
    )
    ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, [old_out], [y])
