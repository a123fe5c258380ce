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
The constant float weights (rank >= 2) of other fused (non-default-domain) ops, such as the tables of
``com.microsoft::EmbedLayerNormalization``, are listed in ``report.skipped`` too, one entry per weight.

Memory: weights are read one at a time. An external (memory-mapped) weight is unmapped once it has been checked
and once it has been quantized, so at most one float weight is resident, besides the NF4 tensors being built.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import onnx_ir as ir

from ..codec.layout import QuantizedWeight
from ..codec.validation import NonFiniteWeightError
from ..model.graph import Initializers, node_label, owner_graph, release, remove_unused_initializers
from ..op.contract import OPSET_VERSION, is_bnb4, is_matmul_nf4
from .encoding import as_numpy_float
from .options import QuantizeOptions
from .plan import Plan, Planner, Skip, float_weights, is_planned_op, nonfinite_reason
from .report import LayerReport, QuantizationReport, SkippedLayer
from .rewrite import Rewriter
from .writers import Encoded, Writer, writer_for

__all__ = ["ProgressCallback", "QuantizeNF4Pass", "QuantizeResult"]

logger = logging.getLogger(__name__)

#: ``on_progress(done, total, layer)``, called after each distinct weight is quantized; ``layer`` is the first node
#: that uses it, named as in the report.
ProgressCallback = Callable[[int, int, str], None]


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
        initializers = Initializers(model)
        writer = writer_for(options, initializers)
        plans = self._plans(model, Planner(options, writer), report)

        distinct: dict[tuple[int, bool], Plan] = {}  # the first node of each distinct weight
        for plan in plans:
            distinct.setdefault(plan.key, plan)
        encoded: dict[tuple[int, bool], Encoded] = {}
        not_finite: dict[tuple[int, bool], str] = {}
        for done, plan in enumerate(distinct.values(), 1):
            try:
                encoded[plan.key] = self._encode(plan, writer)
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
        seen: set[tuple[int, bool]] = set()
        for plan in plans:
            entry = encoded[plan.key]
            fused = rewriter.rewrite(plan, entry)
            logger.debug("rewrote %s %r (weight %r, K=%d, N=%d)", plan.node.op_type, node_label(plan.node),
                         plan.weight.name, plan.K, plan.N)  # fmt: skip
            report.layers.append(_layer_report(plan, entry, fused, shared=plan.key in seen))
            seen.add(plan.key)
        report.shared_bytes = initializers.shared_bytes
        if plans:
            _remove_replaced(model, [plan.weight for plan in plans])
            model.opset_imports[writer.domain] = OPSET_VERSION
        return QuantizeResult(model, modified=bool(plans), report=report)

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
                report.skipped.extend(SkippedLayer(node_label(node), node.op_type, why) for why in float_weights(node))
                continue
            try:
                plans.append(planner.plan(node))
            except Skip as skip:
                logger.debug("skipping %s %r: %s", node.op_type, node_label(node), skip)
                report.skipped.append(SkippedLayer(node_label(node), node.op_type, str(skip)))
        return self._drop_nonfinite(plans, report)

    def _drop_nonfinite(self, plans: Sequence[Plan], report: QuantizationReport) -> list[Plan]:
        """Skip (with a reason) the nodes whose weight holds NaN or Inf (NF4 cannot represent them).

        Round-to-nearest encoding finds such a weight itself in its one pass over the data (a
        :class:`~onnx_nf4.codec.blockwise.NonFiniteWeightError`, handled in :meth:`call`): it needs no separate check.
        """
        if self.options.method == "rtn":
            return list(plans)
        verdict: dict[tuple[int, bool], str | None] = {}
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

    def _encode(self, plan: Plan, writer: Writer) -> Encoded:
        """Quantize the plan's weight, then unmap it if it is external (one float weight resident at a time)."""
        try:
            return self._encode_weight(plan, writer)
        finally:
            release(plan.tensor)  # after _encode_weight returned: no array views the mapping any more

    def _encode_weight(self, plan: Plan, writer: Writer) -> Encoded:
        w = as_numpy_float(plan.tensor)
        if plan.transpose:
            w = w.T
        given = self._prequantized(plan, w, writer)
        return writer.encode(w, owner_graph(plan.weight), plan.weight.name or "weight", given)

    def _prequantized(self, plan: Plan, w: Any, writer: Writer) -> QuantizedWeight | None:
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


def _layer_report(plan: Plan, encoded: Encoded, fused: bool, *, shared: bool) -> LayerReport:
    return LayerReport(
        node=node_label(plan.node),
        weight=plan.weight.name or "",
        shape=(plan.K, plan.N),
        bytes_before=plan.K * plan.N * plan.tensor.dtype.itemsize,
        bytes_after=encoded.nbytes,
        rel_rms_error=encoded.rel_rms_error,
        op_type=plan.node.op_type,
        fused_bias=fused,
        shared=shared,
    )


def _remove_replaced(model: ir.Model, weights: Sequence[ir.Value]) -> None:
    """Remove the replaced weights' ``Constant`` nodes, then every initializer that nothing uses."""
    for weight in weights:
        producer = weight.producer()
        if producer is not None and not weight.uses() and not weight.is_graph_output() and producer.graph:
            producer.graph.remove(producer, safe=True)
    remove_unused_initializers(model)
