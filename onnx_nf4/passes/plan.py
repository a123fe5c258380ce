"""What the quantize pass will rewrite: one :class:`Plan` per ``MatMul`` / ``Gemm`` / fused ``Attention`` node, or a
:class:`Skip` reason."""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from ..codec.validation import check_finite
from ..model.graph import constant_tensor, float_attr, int_attr, release
from ..op.contract import ONNX_DOMAINS
from .attention import AttentionNotRewritable, AttentionTerms, attention_terms, is_attention
from .options import QuantizeOptions
from .writers import Writer

__all__ = [
    "GemmTerms",
    "Plan",
    "Planner",
    "Skip",
    "WeightSource",
    "is_planned_op",
    "nonfinite_reason",
    "weight_source",
]


class Skip(Exception):
    """A node that is left alone; the message is the reason."""


@dataclass
class GemmTerms:
    """What a ``Gemm`` adds around the product: ``alpha``, ``beta * C`` and ``transA``."""

    trans_a: bool
    alpha: float
    beta: float


@dataclass(frozen=True)
class WeightSource:
    """Where a node's constant operand comes from: ``value`` itself, or the constant that a ``Transpose`` reads.

    Attributes:
        weight: the constant value (an initializer or a ``Constant`` node's output).
        transposed: whether the operand is ``weight.T``, through ``via``.
        via: the default-domain ``Transpose`` (perm ``[1, 0]``) between ``weight`` and the node, or ``None``.
    """

    weight: ir.Value | None
    transposed: bool = False
    via: ir.Node | None = None


def weight_source(value: ir.Value | None) -> WeightSource:
    """The constant behind ``value``: through one 2-D ``Transpose`` of a constant, else ``value`` itself.

    Tied embeddings come in this form (onnxruntime-genai's builder gathers from ``Transpose(lm_head weight)``).
    """
    producer = value.producer() if value is not None else None
    if (
        producer is not None
        and producer.op_type == "Transpose"
        and producer.domain in ONNX_DOMAINS
        and len(producer.inputs) == 1
    ):
        source = producer.inputs[0]
        tensor = constant_tensor(source)
        perm = producer.attributes.get("perm")
        if tensor is not None and len(tensor.shape) == 2 and (perm is None or list(perm.as_ints()) == [1, 0]):
            return WeightSource(source, True, producer)
    return WeightSource(value)


@dataclass
class Plan:
    """One node to rewrite.

    ``A`` and Gemm's ``C`` are read from the node when it is rewritten (:attr:`a`, :attr:`c`), not stored: an
    earlier rewrite may have replaced the value that feeds them (a fused ``Add`` feeding this node).
    """

    node: ir.Node
    weight: ir.Value
    tensor: ir.TensorProtocol
    transpose: bool  # W = B.T (Gemm transB=1)
    K: int
    N: int
    bias: ir.Value | None = None  # a fused [N] bias of dtype T
    add: ir.Node | None = None  # the fused Add
    gemm: GemmTerms | None = None
    via: ir.Node | None = None  # the Transpose between the weight and the node
    #: the key of an equal weight whose tensors this plan uses instead of its own (a tied copy)
    tied: tuple[object, ...] | None = None
    attention: AttentionTerms | None = None  # a fused Attention: W is its packed QKV weight, bias its QKV bias

    @property
    def key(self) -> tuple[object, ...]:
        """Identifies the quantized weight: nodes with the same key share its tensors."""
        return self.tied or (id(self.weight), self.transpose)

    @property
    def a(self) -> ir.Value:
        a = self.node.inputs[0]
        assert a is not None
        return a

    @property
    def c(self) -> ir.Value | None:
        return self.node.inputs[2] if self.gemm is not None and len(self.node.inputs) > 2 else None

    @property
    def graph(self) -> ir.Graph:
        assert self.node.graph is not None
        return self.node.graph  # type: ignore[return-value]


class Planner:
    """Decides, node by node, whether and how a ``MatMul`` / ``Gemm`` is rewritten (:meth:`plan`)."""

    def __init__(self, options: QuantizeOptions, writer: Writer):
        self.options = options
        self.writer = writer
        self._patterns = options.patterns

    def plan(self, node: ir.Node) -> Plan:
        """The plan of a node :func:`is_planned_op` accepts; raises :class:`Skip` with the reason otherwise."""
        self._check_a(node.inputs[0])
        if is_attention(node):
            return self._attention(node)
        source = weight_source(node.inputs[1])
        if node.op_type == "MatMul":
            tensor, K, N = self._weight(node, source.weight, transpose=source.transposed)
            plan = Plan(node, source.weight, tensor, source.transposed, K, N, via=source.via)  # type: ignore[arg-type]
            self._fuse_add(plan)
            return plan
        transpose = bool(int_attr(node, "transB", 0)) != source.transposed
        tensor, K, N = self._weight(node, source.weight, transpose=transpose)
        gemm = GemmTerms(bool(int_attr(node, "transA", 0)), float_attr(node, "alpha", 1.0),
                         float_attr(node, "beta", 1.0))  # fmt: skip
        return Plan(node, source.weight, tensor, transpose, K, N, gemm=gemm, via=source.via)  # type: ignore[arg-type]

    def _attention(self, node: ir.Node) -> Plan:
        """A ``com.microsoft::Attention``: its packed ``[hidden, q + k + v]`` weight (see :mod:`.attention`)."""
        tensor, K, N = self._weight(node, node.inputs[1] if len(node.inputs) > 1 else None, transpose=False)
        try:
            terms = attention_terms(node, N)
        except AttentionNotRewritable as err:
            raise Skip(str(err)) from None
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        return Plan(node, node.inputs[1], tensor, False, K, N, bias=bias, attention=terms)  # type: ignore[arg-type]

    def excluded(self, node: ir.Node, weight_name: str) -> str | None:
        for pattern in self._patterns:
            for label, text in (("node", node.name or ""), ("weight", weight_name)):
                if pattern.search(text):
                    return f"excluded: pattern {pattern.pattern!r} matches {label} name {text!r}"
        return None

    def _weight(self, node: ir.Node, value: ir.Value | None, transpose: bool) -> tuple[ir.TensorProtocol, int, int]:
        """Check the B input; return its tensor and the (K, N) of the weight as the node uses it."""
        if value is not None and value.is_graph_input():
            if value.is_initializer():
                raise Skip(f"B ({value.name!r}) is an initializer that is also a graph input (overridable)")
            raise Skip(f"B is not a constant (graph input {value.name!r})")
        tensor = constant_tensor(value)
        if tensor is None:
            raise Skip("B is not a constant (neither an initializer nor a Constant node)")
        if len(tensor.shape) != 2:
            raise Skip(f"B is {len(tensor.shape)}-D with shape {list(tensor.shape)}; only a 2-D weight is rewritten")
        if tensor.dtype not in self.writer.dtypes:
            names = ", ".join(t.name for t in self.writer.dtypes)
            raise Skip(f"dtype {tensor.dtype.name} of the weight and A is not supported by this format ({names})")
        rows, cols = (int(d) for d in tensor.shape)
        K, N = (cols, rows) if transpose else (rows, cols)
        if K == 0 or N == 0:
            raise Skip(f"weight has no elements (shape {[rows, cols]})")
        assert value is not None and value.name is not None
        reason = self.excluded(node, value.name)
        if reason:
            raise Skip(reason)
        if self.options.min_elements > K * N:
            raise Skip(f"weight has {K * N} elements, fewer than min_elements={self.options.min_elements}")
        return tensor, K, N

    @staticmethod
    def _check_a(a: ir.Value | None) -> None:
        if a is None:
            raise Skip("A is missing")
        if a.shape is not None and len(a.shape) < 1:
            raise Skip("A is a scalar (rank 0)")

    def _fuse_add(self, plan: Plan) -> None:
        """Fuse a following ``Add`` of a constant ``[N]`` vector into ``plan`` when that is valid."""
        out = plan.node.outputs[0]
        uses = list(out.uses())
        if not self.writer.fuses_bias or out.is_graph_output() or len(uses) != 1:
            return
        add = uses[0].node
        if add.op_type != "Add" or add.domain not in ONNX_DOMAINS or add.graph is not plan.graph:
            return
        other = add.inputs[1 - uses[0].idx]
        tensor = constant_tensor(other)
        if tensor is None or tensor.dtype != plan.tensor.dtype or tuple(tensor.shape) != (plan.N,):
            return
        plan.bias, plan.add = other, add


def is_planned_op(node: ir.Node) -> bool:
    """Whether the pass plans ``node``: a default-domain ``MatMul`` / ``Gemm`` or a ``com.microsoft::Attention``."""
    return (node.op_type in ("MatMul", "Gemm") and node.domain in ONNX_DOMAINS) or is_attention(node)


def nonfinite_reason(tensor: ir.TensorProtocol, name: str) -> str | None:
    """Why ``tensor`` cannot be quantized (it holds NaN or Inf), or ``None``; unmaps an external tensor after.

    An error reading the tensor is raised, not returned: it is no reason to skip a layer.
    """
    tensor.numpy()  # reads or maps it
    try:
        check_finite(tensor.numpy(), name)
    except ValueError as err:
        return str(err)
    finally:
        release(tensor)
    return None
