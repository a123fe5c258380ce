"""``QuantizeNF4Pass``: the ``onnx_ir`` pass that rewrites float ``MatMul`` / ``Gemm`` weights to NF4.

What is rewritten (in the main graph and in every ``If`` / ``Loop`` / ``Scan`` body, the weight being an
initializer of any enclosing scope or the output of a ``Constant`` node):

* ``MatMul(A, B)`` with ``B`` a 2-D float constant ``[K, N]``.
* ``MatMul`` followed by ``Add`` of a constant ``[N]`` vector of the same dtype (either operand order), when the
  MatMul output has no other consumer and is not a graph output: the bias is fused into the op
  (``format="onnx_nf4"`` only). The fused op adds the bias in float32 before rounding once to T, which is what
  ``MatMul`` + ``Add`` give for float32 and one rounding fewer for float16 / bfloat16.
* ``Gemm(A, B, C)`` with ``B`` a 2-D float constant (``transB`` 0 or 1): ``transA=1`` becomes a ``Transpose``
  of ``A``; ``alpha != 1`` is applied to the op's output by a ``Mul``. Alpha is never folded into the weight:
  ``quantize(alpha * W) != alpha * quantize(W)`` in general (it is only exact for powers of two), and a folded
  weight could no longer be shared with other nodes. ``beta * C`` is computed once in float32 (rounded to T)
  when ``C`` is a constant, else by a ``Mul``; it is fused as the bias when ``alpha == 1`` and ``C`` is a row
  vector (``[N]``, ``[1, N]``, ``[1]`` or a scalar, broadcast to ``[N]``), otherwise added by an ``Add``.
  ``beta == 0`` drops ``C``.
* ``com.microsoft::Attention`` (fused by onnxruntime's transformer optimizer) with a 2-D float constant packed QKV
  weight: the projection becomes the format's op over the packed weight (its bias fused when the format allows),
  followed by ``Split`` and ``com.microsoft::MultiHeadAttention`` (:mod:`onnx_nf4.passes.attention`, which also
  lists the ``Attention`` forms left fused).

A weight used by several nodes is quantized once and its NF4 initializers are shared (keyed by the weight and
whether it is transposed). Weights that no node uses any more are removed, and so are all initializers that
nothing uses. The node written is the format's (:mod:`onnx_nf4.passes.writers`).

``MatMulNF4`` / ``MatMulBnb4`` nodes already in the model are left as they are and named in
``report.already_quantized``. Every other ``MatMul`` / ``Gemm`` is left alone, with the reason in
``report.skipped``: a non-constant or overridable (graph input) ``B``, a ``B`` that is not 2-D, a non-float weight
(T must be float32, float16 or bfloat16; MatMul and Gemm force A, B and Y to share it), a scalar ``A``, an empty
weight, a weight holding NaN/Inf, an excluded node or weight, or one with fewer than ``min_elements`` elements.

Memory: weights are read one at a time. An external (memory-mapped) weight is unmapped once it has been checked
and once it has been quantized, so at most one float weight is resident, besides the NF4 tensors being built.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import onnx_ir as ir

from ..codec.layout import QuantizedWeight
from ..codec.validation import NonFiniteWeightError
from ..model.graph import (
    Initializers,
    constant_bytes,
    node_label,
    owner_graph,
    release,
    remove_unused_initializers,
)
from ..op.contract import MS_DOMAIN, ONNX_DOMAINS, OPSET_VERSION, is_bnb4, is_matmul_nf4
from .attention import ATTENTION_OP
from .embedding import LookupPlan, is_table_gather, plan_lookup, rewrite_lookup, tie_equal_weights
from .encoding import as_numpy_float
from .options import QuantizeOptions
from .plan import Plan, Planner, Skip, is_planned_op, nonfinite_reason
from .report import FloatWeight, LayerReport, QuantizationReport, SkippedLayer
from .rewrite import Rewriter
from .writers import Encoded, NF4Writer, Writer, writer_for

__all__ = ["ProgressCallback", "QuantizeNF4Pass", "QuantizeResult"]

logger = logging.getLogger(__name__)

#: ``on_progress(done, total, layer)``, called after each distinct weight is quantized; ``layer`` is the first node
#: that uses it, named as in the report.
ProgressCallback = Callable[[int, int, str], None]

#: A node to rewrite: a ``MatMul`` / ``Gemm`` or an embedding ``Gather``.
AnyPlan = Plan | LookupPlan
P = TypeVar("P", Plan, LookupPlan)
#: Identifies one quantized weight (:attr:`Plan.key`).
Key = tuple[object, ...]
_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


@dataclass
class QuantizeResult(ir.passes.PassResult):
    """What :class:`QuantizeNF4Pass` returns: the model, whether it changed, and the run's report."""

    report: QuantizationReport


class QuantizeNF4Pass(ir.passes.InPlacePass):
    """Rewrite the float ``MatMul`` / ``Gemm`` weights of a model to NF4, in place (see the module docstring).

    Args:
        options: the :class:`~onnx_nf4.QuantizeOptions`; or give its fields as keyword arguments
            (``block_size=128, double_quant=True``, ...), not both.
        on_progress: ``on_progress(done, total, layer)`` after each distinct weight (``layer``: the first node
            that uses it).
        prequantized: weights to use as given instead of quantizing, keyed by weight initializer name (their
            ``K`` and ``N`` must match the node; for ``com.microsoft`` they need ``K % block_size == 0``, no
            double quantization, and an absmax exactly representable in the weight's dtype).

    Each call returns a :class:`QuantizeResult` whose ``report`` says what that call did; the pass keeps nothing
    from one call to the next.

    Raises:
        ValueError: at construction for invalid settings; during the call for a ``prequantized`` weight that does
            not fit its node.
    """

    def __init__(
        self,
        options: QuantizeOptions | None = None,
        *,
        on_progress: ProgressCallback | None = None,
        prequantized: Mapping[str, QuantizedWeight] | None = None,
        **settings: Any,
    ):
        super().__init__()
        if options is not None and settings:
            raise TypeError("give QuantizeOptions or its fields as keyword arguments, not both")
        self.options = QuantizeOptions.build(options, **settings)
        self.on_progress = on_progress
        self.prequantized: Mapping[str, QuantizedWeight] = dict(prequantized or {})

    def call(self, model: ir.Model) -> QuantizeResult:
        options = self.options
        report = QuantizationReport(options.block_size, options.double_quant, options.format,
                                    accuracy_level=options.accuracy_level, method=options.method)  # fmt: skip
        report.tensor_bytes_before = constant_bytes(model)
        report.table_block_size = options.table_block_size
        originals = {id(value) for graph in model.graphs() for value in graph.initializers.values()}
        initializers = Initializers(model)
        writer = writer_for(options, initializers)
        table_options = options.replace(block_size=options.table_block_size)
        table_writer = writer_for(table_options, initializers)  # tables and the weights tied to them
        planner = Planner(options, writer)
        matmuls = self._plans(model, planner, report)
        lookups = self._lookups(model, planner, matmuls, table_writer, report)
        plans: list[AnyPlan] = [*matmuls, *lookups]

        distinct: dict[Key, AnyPlan] = {}  # the first node of each distinct weight
        for plan in plans:
            distinct.setdefault(plan.key, plan)
        matmul_keys = {plan.key for plan in matmuls}
        table_keys = {plan.key for plan in lookups}
        row_writer = NF4Writer(table_options, initializers)  # a lookup's own tensors (no MatMul reads them)

        def writer_of(key: Key) -> Writer:
            if key not in table_keys:
                return writer
            return table_writer if key in matmul_keys else row_writer

        encoded: dict[Key, Encoded] = {}
        not_finite: dict[Key, str] = {}
        for done, plan in enumerate(distinct.values(), 1):
            try:
                encoded[plan.key] = self._encode(plan, writer_of(plan.key))
            except NonFiniteWeightError as err:  # found by the encoder itself (see _drop_nonfinite)
                not_finite[plan.key] = str(err)
            if self.on_progress is not None:
                self.on_progress(done, len(distinct), node_label(plan.node))
        if not_finite:
            for plan in plans:
                if plan.key in not_finite:
                    report.skipped.append(SkippedLayer(node_label(plan.node), plan.node.op_type, not_finite[plan.key]))
            plans = [plan for plan in plans if plan.key not in not_finite]

        rewriter = Rewriter(writer, initializers, model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1)))
        seen: set[Key] = set()
        fused = False
        for plan in plans:
            entry = encoded[plan.key]
            if isinstance(plan, LookupPlan):
                rewrite_lookup(plan, entry, initializers, model)
            else:
                fused = rewriter.rewrite(plan, entry)
            logger.debug("rewrote %s %r (weight %r, K=%d, N=%d)", plan.node.op_type, node_label(plan.node),
                         plan.weight.name, plan.K, plan.N)  # fmt: skip
            report.layers.append(_layer_report(plan, entry, fused, shared=plan.key in seen))
            seen.add(plan.key)
        report.shared_bytes = initializers.shared_bytes
        if plans:
            _remove_replaced(model, plans)
            if any(not isinstance(plan, LookupPlan) for plan in plans):
                model.opset_imports[writer.domain] = OPSET_VERSION
        report.kept_float = _kept_float(plans)
        report.left_float = _left_float(model, options.min_elements, originals)
        report.tensor_bytes_after = constant_bytes(model)
        return QuantizeResult(model, modified=bool(plans), report=report)

    def _lookups(
        self,
        model: ir.Model,
        planner: Planner,
        matmuls: Sequence[Plan],
        table_writer: Writer,
        report: QuantizationReport,
    ) -> list[LookupPlan]:
        """The embedding lookups to rewrite (:mod:`onnx_nf4.passes.embedding`), tied to equal ``matmuls`` weights;
        every other ``Gather`` over a constant float table goes to ``report.skipped`` with its reason."""
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        lookups: list[LookupPlan] = []
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if not is_table_gather(node):
                continue
            try:
                lookups.append(plan_lookup(node, planner, opset))
            except Skip as skip:
                report.skipped.append(SkippedLayer(node_label(node), node.op_type, str(skip)))
        tie_equal_weights(lookups, matmuls)
        matmul_keys = {plan.key for plan in matmuls}
        kept = []
        for lookup in lookups:
            if lookup.key in matmul_keys and not table_writer.row_blocks(lookup.K):
                lookup.tied = (id(lookup.weight), lookup.transpose, "rows")  # MatMulBnb4's flat blocks span rows
            elif lookup.few_rows and lookup.key not in matmul_keys and lookup.weight.name not in self.prequantized:
                reason = (
                    f"table has {lookup.N} rows, fewer than embedding_min_rows={self.options.embedding_min_rows} "
                    "(a position or type table; tables tied to a quantized weight are taken whatever their size)"
                )
                report.skipped.append(SkippedLayer(node_label(lookup.node), lookup.node.op_type, reason))
                continue
            kept.append(lookup)
        return self._drop_nonfinite(kept, report)

    def planned_weights(self, model: ir.Model) -> list[tuple[str, bool, int, int]]:
        """``(weight name, transposed, K, N)`` of each distinct weight a call would quantize; only reads ``model``."""
        planner = Planner(self.options, writer_for(self.options, Initializers(model)))
        plans = self._plans(model, planner, QuantizationReport(self.options.block_size, False, self.options.format))
        distinct = {plan.key: plan for plan in plans}.values()
        return [(plan.weight.name or "", plan.transpose, plan.K, plan.N) for plan in distinct]

    def _plans(self, model: ir.Model, planner: Planner, report: QuantizationReport) -> list[Plan]:
        """The nodes to rewrite; every other ``MatMul`` / ``Gemm`` goes to ``report.skipped`` with its reason."""
        plans: list[Plan] = []
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if is_matmul_nf4(node.domain, node.op_type) or is_bnb4(node.domain, node.op_type):
                report.already_quantized.append(node_label(node))
            if not is_planned_op(node):
                continue
            try:
                plans.append(planner.plan(node))
            except Skip as skip:
                logger.debug("skipping %s %r: %s", node.op_type, node_label(node), skip)
                report.skipped.append(SkippedLayer(node_label(node), node.op_type, str(skip)))
        return self._drop_nonfinite(plans, report)

    def _drop_nonfinite(self, plans: Sequence[P], report: QuantizationReport) -> list[P]:
        """Skip (with a reason) the nodes whose weight holds NaN or Inf (NF4 cannot represent them).

        Round-to-nearest encoding finds such a weight itself in its one pass over the data (a
        :class:`~onnx_nf4.codec.blockwise.NonFiniteWeightError`, handled in :meth:`call`): it needs no separate check.
        """
        if self.options.method == "rtn":
            return list(plans)
        verdict: dict[Key, str | None] = {}
        kept = []
        for plan in plans:
            if plan.key not in verdict:
                verdict[plan.key] = None
                if plan.weight.name not in self.prequantized:
                    verdict[plan.key] = nonfinite_reason(plan.tensor, plan.weight.name or "weight")
            reason = verdict[plan.key]
            if reason is None:
                kept.append(plan)
            else:
                report.skipped.append(SkippedLayer(node_label(plan.node), plan.node.op_type, reason))
        return kept

    def _encode(self, plan: AnyPlan, writer: Writer) -> Encoded:
        """Quantize the plan's weight, then unmap it if it is external (one float weight resident at a time)."""
        try:
            return self._encode_weight(plan, writer)
        finally:
            release(plan.tensor)  # after _encode_weight returned: no array views the mapping any more

    def _encode_weight(self, plan: AnyPlan, writer: Writer) -> Encoded:
        w = as_numpy_float(plan.tensor)
        if plan.transpose:
            w = w.T
        given = self._prequantized(plan, w, writer)
        return writer.encode(w, owner_graph(plan.weight), plan.weight.name or "weight", given)

    def _prequantized(self, plan: AnyPlan, w: Any, writer: Writer) -> QuantizedWeight | None:
        q = self.prequantized.get(plan.weight.name or "")
        if q is None:
            return None
        if (q.K, q.N) != (plan.K, plan.N):
            raise ValueError(
                f"prequantized weight {plan.weight.name!r} has (K, N) = ({q.K}, {q.N}), but node "
                f"{node_label(plan.node)!r} uses it as ({plan.K}, {plan.N})"
            )
        writer.check_prequantized(q, w, plan.weight.name or "")
        return q


def _layer_report(plan: AnyPlan, encoded: Encoded, fused: bool, *, shared: bool) -> LayerReport:
    return LayerReport(
        node=node_label(plan.node),
        weight=plan.weight.name or "",
        shape=(plan.K, plan.N),
        bytes_before=plan.K * plan.N * plan.tensor.dtype.itemsize,
        bytes_after=encoded.nbytes,
        rel_rms_error=encoded.rel_rms_error,
        op_type=plan.node.op_type,
        fused_bias=fused and not isinstance(plan, LookupPlan),
        shared=shared,
    )


def _remove_replaced(model: ir.Model, plans: Sequence[AnyPlan]) -> None:
    """Remove the ``Transpose`` nodes and ``Constant`` nodes of the replaced weights that nothing reads any more,
    then every initializer that nothing uses."""
    for plan in plans:
        for node in (plan.via, plan.weight.producer()):
            if node is None or node.graph is None:
                continue
            out = node.outputs[0]
            if not out.uses() and not out.is_graph_output():
                node.graph.remove(node, safe=True)
    remove_unused_initializers(model)


def _kept_float(plans: Sequence[AnyPlan]) -> list[FloatWeight]:
    """The replaced weights that stay in the model because a node that was not rewritten still reads them."""
    kept: dict[int, FloatWeight] = {}
    for plan in plans:
        weight = plan.weight
        users = [use.node for use in weight.uses()]
        if id(weight) in kept or not (users or weight.is_graph_output()):
            continue
        readers = ", ".join(sorted({node_label(node) for node in users})) or "a graph output"
        kept[id(weight)] = FloatWeight(weight.name or "", tuple(plan.tensor.shape), plan.tensor.nbytes,
                                       f"also read by {readers}")  # fmt: skip
    return list(kept.values())


#: The ops whose float constant inputs the pass decides about (quantizes or lists in ``report.skipped``).
_PLANNED_OPS = ("MatMul", "Gemm", "Gather", "Transpose")


def _planned_reader(domain: str, op_type: str) -> bool:
    return (domain in ONNX_DOMAINS and op_type in _PLANNED_OPS) or (domain, op_type) == (MS_DOMAIN, ATTENTION_OP)


def _left_float(model: ir.Model, min_elements: int, originals: set[int]) -> list[FloatWeight]:
    """Float initializers of the input (``originals``: their ids) of at least ``min_elements`` elements that no
    ``MatMul`` / ``Gemm`` / ``Gather`` / ``com.microsoft::Attention`` reads."""
    left = []
    for graph in model.graphs():
        for name, value in graph.initializers.items():
            tensor = value.const_value
            if id(value) not in originals or tensor is None or tensor.dtype not in _FLOAT_TYPES:
                continue
            if tensor.size < max(min_elements, 1):
                continue
            readers = {(use.node.domain, use.node.op_type) for use in value.uses()}
            if not readers or any(_planned_reader(domain, op) for domain, op in readers):
                continue
            ops = ", ".join(sorted(f"{domain}::{op}" if domain not in ONNX_DOMAINS else op for domain, op in readers))
            reason = f"read by {ops}, not by a MatMul, Gemm, Gather or com.microsoft::Attention"
            left.append(FloatWeight(name, tuple(tensor.shape), tensor.nbytes, reason))
    return left
