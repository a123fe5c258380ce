"""Replacing a planned ``MatMul`` / ``Gemm`` (and its fused ``Add``) by the format's node."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..model.graph import Initializers, constant_tensor, node_label
from .attention import SPLIT_SIZES_INPUT_OPSET, mha_nodes
from .plan import Plan
from .writers import Encoded, Writer

__all__ = ["Rewriter"]


class Rewriter:
    """Rewrites the nodes of one model with one writer (created per pass call)."""

    def __init__(self, writer: Writer, initializers: Initializers, opset: int):
        self.writer = writer
        self.initializers = initializers
        self.opset = opset  # the model's default-domain opset (the form of the Split written for an Attention)

    def rewrite(self, plan: Plan, encoded: Encoded) -> bool:
        """Replace the plan's node(s); return whether a bias was fused into the op."""
        if plan.attention is not None:
            return self._attention(plan, encoded)
        graph, node, fresh = plan.graph, plan.node, self.initializers.value
        new_nodes: list[ir.Node] = []
        a, bias, add_c = plan.a, plan.bias, None
        if plan.gemm is not None:
            if plan.gemm.trans_a:
                a = fresh(f"{plan.a.name}_T")
                new_nodes.append(
                    ir.node("Transpose", [plan.a], {"perm": [1, 0]}, outputs=[a], name=f"{node.name}_transA")
                )
            bias, add_c = self._gemm_c(plan, new_nodes)
        y = fresh(f"{node.outputs[0].name}_nf4")
        new_nodes.append(self.writer.node(a, encoded, plan.K, plan.N, bias, y, node.name))
        if plan.gemm is not None and plan.gemm.alpha != 1.0:
            alpha = self.initializers.scalar(graph, f"{node_label(node)}_alpha", plan.gemm.alpha, plan.tensor.dtype)
            scaled = fresh(f"{y.name}_alpha")
            new_nodes.append(ir.node("Mul", [y, alpha], outputs=[scaled], name=f"{node.name}_alpha"))
            y = scaled
        if add_c is not None:
            summed = fresh(f"{y.name}_c")
            new_nodes.append(ir.node("Add", [y, add_c], outputs=[summed], name=f"{node.name}_c"))
            y = summed
        old_nodes = [node] if plan.add is None else [node, plan.add]
        old_out = old_nodes[-1].outputs[0]
        y.type, y.shape = old_out.type, old_out.shape
        ir.convenience.replace_nodes_and_values(graph, old_nodes[-1], old_nodes, new_nodes, [old_out], [y])
        return bias is not None

    def _attention(self, plan: Plan, encoded: Encoded) -> bool:
        """A fused ``Attention``: the format's op over the packed QKV weight, ``Split``, ``MultiHeadAttention``."""
        graph, node, terms = plan.graph, plan.node, plan.attention
        assert terms is not None
        fused = self.writer.fuses_bias and plan.bias is not None
        qkv = self.initializers.value(f"{node_label(node)}_qkv")
        projection = self.writer.node(plan.a, encoded, plan.K, plan.N, plan.bias if fused else None, qkv,
                                      f"{node_label(node)}_qkv")  # fmt: skip
        sizes = None
        if self.opset >= SPLIT_SIZES_INPUT_OPSET:
            sizes = self.initializers.add(graph, f"{node_label(node)}_qkv_sizes", np.array(terms.sizes, np.int64))
        tail, y = mha_nodes(node, terms, qkv, None if fused else plan.bias, sizes, self.initializers.value)
        old_out = node.outputs[0]
        y.type, y.shape = old_out.type, old_out.shape
        ir.convenience.replace_nodes_and_values(graph, node, [node], [projection, *tail], [old_out], [y])
        return fused

    def _gemm_c(self, plan: Plan, new_nodes: list[ir.Node]) -> tuple[ir.Value | None, ir.Value | None]:
        """``beta * C`` as ``(fused bias [N], value to Add)``; at most one is set."""
        gemm, graph, dtype, c_value = plan.gemm, plan.graph, plan.tensor.dtype, plan.c
        assert gemm is not None
        if c_value is None or gemm.beta == 0.0:
            return None, None
        tensor = constant_tensor(c_value)
        if tensor is None:
            if gemm.beta == 1.0:
                return None, c_value
            beta = self.initializers.scalar(graph, f"{node_label(plan.node)}_beta", gemm.beta, dtype)
            scaled = self.initializers.value(f"{c_value.name}_scaled")
            new_nodes.append(ir.node("Mul", [c_value, beta], outputs=[scaled], name=f"{plan.node.name}_beta_c"))
            return None, scaled
        c = tensor.numpy()
        if gemm.beta != 1.0:
            c = (np.float32(gemm.beta) * c.astype(np.float32)).astype(c.dtype)
        row_vector = c.ndim <= 1 or (c.ndim == 2 and c.shape[0] == 1)
        if gemm.alpha == 1.0 and row_vector and self.writer.fuses_bias and c.size in (1, plan.N):
            if gemm.beta == 1.0 and tuple(c.shape) == (plan.N,):
                return c_value, None
            bias = np.broadcast_to(c.reshape(-1), (plan.N,))
            return self.initializers.add(graph, f"{c_value.name}_bias", bias), None
        if gemm.beta == 1.0:
            return None, c_value
        return None, self.initializers.add(graph, f"{c_value.name}_scaled", c)
