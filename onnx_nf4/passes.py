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

A weight used by several nodes is quantized once and its NF4 initializers are shared (keyed by the weight and
whether it is transposed). Weights that no node uses any more are removed, and so are all initializers that
nothing uses. The op type is ``onnx_nf4::MatMulNF4`` (``format="onnx_nf4"``) or onnxruntime's
``com.microsoft::MatMulBnb4`` (``format="com.microsoft"``, bytes identical to ``MatMulBnb4Quantizer``: blocks
run across the rows of ``W.T``, absmax in the weight's dtype; no bias, no double quantization).

Everything else is left alone, with the reason in ``report.skipped``: a non-constant or overridable (graph
input) ``B``, a ``B`` that is not 2-D, a non-float weight (T must be float32, float16 or bfloat16; MatMul and
Gemm force A, B and Y to share it), a scalar ``A``, an empty weight, a weight holding NaN/Inf, an excluded node or
weight, or one with fewer than ``min_elements`` elements.

Memory: weights are read one at a time. An external (memory-mapped) weight is unmapped once it has been checked
and once it has been quantized, so at most one float weight is resident, besides the NF4 tensors being built.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from .codec import check_block_size, check_finite, dequantize_blockwise, quantize_blockwise
from .layout import QuantizedWeight, error_sums, quantize_weight_and_error
from .report import LayerReport, QuantizationReport, SkippedLayer
from .schema import DOMAIN, MS_DOMAIN, OP_TYPE, OPSET_VERSION

__all__ = [
    "DEFAULT_MIN_ELEMENTS",
    "FORMATS",
    "ProgressCallback",
    "QuantizeNF4Pass",
    "UniqueNames",
    "remove_unused_initializers",
]

logger = logging.getLogger(__name__)

#: Weights with fewer elements are kept in float. 4096 elements (e.g. 64 x 64) is 16 KiB of float32: below it
#: NF4 saves less than 14 KiB per weight, while such small matrices (classifier heads, gates, projections to a
#: handful of outputs) are where the 4-bit error is least diluted; an extra custom op also costs more than the
#: bytes it saves. Every MatMul of a transformer layer is far above it.
DEFAULT_MIN_ELEMENTS = 4096

FORMATS = ("onnx_nf4", "com.microsoft")

#: ``on_progress(done, total, weight_name)``, called after each distinct weight is quantized.
ProgressCallback = Callable[[int, int, str], None]

_ERROR_CHUNK_ELEMENTS = 1 << 20
_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
_BNB4_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)
_ONNX_DOMAINS = ("", "ai.onnx")


class _Skip(Exception):
    """A node that is left alone; the message is the reason."""


@dataclass
class _Gemm:
    """What a ``Gemm`` adds around the product: ``alpha``, ``beta * C`` and ``transA``."""

    trans_a: bool
    alpha: float
    beta: float


@dataclass
class _Plan:
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
    gemm: _Gemm | None = None

    @property
    def key(self) -> tuple[int, bool]:
        return id(self.weight), self.transpose

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


@dataclass
class _Quantized:
    """The NF4 initializers of one weight (shared by every node that uses it)."""

    q: QuantizedWeight | None  # the MatMulNF4 layout (format "onnx_nf4")
    block_size: int
    inputs: list[ir.Value | None]  # op inputs after A: B, absmax[, nested...]
    nbytes: int
    rel_rms_error: float


def _node_label(node: ir.Node) -> str:
    return node.name or f"<{node.op_type} -> {node.outputs[0].name}>"


def constant_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The tensor of an initializer (not a graph input) or of a ``Constant`` node's ``value``, else ``None``."""
    if value is None or value.is_graph_input():
        return None
    if value.is_initializer() and value.const_value is not None:
        return value.const_value
    producer = value.producer()
    if (
        producer is not None
        and producer.op_type == "Constant"
        and producer.domain in _ONNX_DOMAINS
        and "value" in producer.attributes
    ):
        return producer.attributes["value"].as_tensor()
    return None


def _owner_graph(value: ir.Value) -> ir.Graph:
    """The graph where the NF4 initializers replacing ``value`` go (visible wherever ``value`` is)."""
    graph = value.graph if value.is_initializer() else value.producer().graph  # type: ignore[union-attr]
    assert isinstance(graph, ir.Graph)
    return graph


def _float_attr(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else float(attr.as_float())


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.as_int())


def _as_numpy_float(tensor: ir.TensorProtocol) -> np.ndarray:
    """The weight as a numpy array that the codec accepts (float32, float16 or ``ml_dtypes.bfloat16``)."""
    return tensor.numpy()


def _rel_rms_error(w: np.ndarray, wq: np.ndarray) -> float:
    """``rms(w - wq) / rms(w)`` for 2-D arrays (0 for an all-zero ``w``).

    Works on float32 chunks of about a million elements whose squared sums are added in float64, so the extra
    memory stays a few MB whatever the weight's size.
    """
    rows = max(1, _ERROR_CHUNK_ELEMENTS // max(1, w.shape[1]))
    num = den = 0.0
    for start in range(0, w.shape[0], rows):
        ref = w[start : start + rows].astype(np.float32).ravel()
        diff = ref - wq[start : start + rows].astype(np.float32).ravel()
        num += float(np.dot(diff, diff))
        den += float(np.dot(ref, ref))
    return math.sqrt(num / den) if den else 0.0


def _release(tensor: ir.TensorProtocol) -> None:
    """Unmap an external tensor's file: its pages would otherwise count as resident memory until the pass ends.

    The tensor stays usable (it is mapped again when read). A tensor still viewed by a live array stays mapped.
    """
    if isinstance(tensor, ir.ExternalTensor):
        with contextlib.suppress(BufferError):
            tensor.release()


def _nonfinite_reason(tensor: ir.TensorProtocol, name: str) -> str | None:
    """Why ``tensor`` cannot be quantized (it holds NaN or Inf), or ``None``; unmaps an external tensor after.

    An error reading the tensor is raised, not returned: it is no reason to skip a layer.
    """
    tensor.numpy()  # reads or maps it
    try:
        check_finite(tensor.numpy(), name)
    except ValueError as err:
        return str(err)
    finally:
        _release(tensor)
    return None


class UniqueNames:
    """Fresh value names, unique in the whole model (``fresh(base)`` returns ``base`` or ``base_<i>``)."""

    def __init__(self, model: ir.Model):
        self._used: set[str] = set()
        for graph in model.graphs():
            values = [*graph.inputs, *graph.outputs, *graph.initializers.values()]
            values += [out for node in graph for out in node.outputs]
            self._used.update(v.name for v in values if v.name)

    def fresh(self, base: str) -> str:
        name, i = base, 0
        while name in self._used:
            i += 1
            name = f"{base}_{i}"
        self._used.add(name)
        return name


class QuantizeNF4Pass(ir.passes.InPlacePass):
    """Rewrite the float ``MatMul`` / ``Gemm`` weights of a model to NF4, in place (see the module docstring).

    Args:
        block_size: elements per absmax block, a power of two in [16, 4096].
        double_quant: also quantize the absmax to 8 bits (``format="onnx_nf4"`` only).
        format: ``"onnx_nf4"`` (``onnx_nf4::MatMulNF4``) or ``"com.microsoft"`` (``MatMulBnb4``).
        exclude: regular expressions; a node whose name or weight name matches one (``re.search``) is skipped.
        min_elements: weights with fewer elements stay float.
        on_progress: ``on_progress(done, total, weight_name)`` after each distinct weight.
        prequantized: weights to use as given instead of quantizing, keyed by weight initializer name (their
            ``K`` and ``N`` must match the node; for ``com.microsoft`` they need ``K % block_size == 0``, no
            double quantization, and an absmax exactly representable in the weight's dtype).

    After each call, :attr:`report` holds that run's :class:`~onnx_nf4.report.QuantizationReport`.

    Raises:
        ValueError: at construction for invalid settings; during the call for a ``prequantized`` weight that does
            not fit its node.
    """

    def __init__(
        self,
        *,
        block_size: int = 64,
        double_quant: bool = False,
        format: str = "onnx_nf4",
        exclude: Iterable[str] = (),
        min_elements: int = DEFAULT_MIN_ELEMENTS,
        on_progress: ProgressCallback | None = None,
        prequantized: Mapping[str, QuantizedWeight] | None = None,
    ):
        super().__init__()
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
        if double_quant and format == "com.microsoft":
            raise ValueError("double_quant is not supported by com.microsoft::MatMulBnb4; use format='onnx_nf4'")
        if isinstance(exclude, str):
            exclude = [exclude]
        patterns = []
        for pattern in exclude:
            try:
                patterns.append(re.compile(pattern))
            except re.error as err:
                raise ValueError(f"invalid exclude pattern {pattern!r}: {err}") from None
        if int(min_elements) < 0:
            raise ValueError(f"min_elements must be >= 0, got {min_elements}")
        self.block_size = check_block_size(block_size)
        self.double_quant = bool(double_quant)
        self.format = format
        self.exclude: list[re.Pattern[str]] = patterns
        self.min_elements = int(min_elements)
        self.on_progress = on_progress
        self.prequantized: Mapping[str, QuantizedWeight] = dict(prequantized or {})
        self.report: QuantizationReport | None = None
        self._names: UniqueNames | None = None  # per call: fresh names of the model being rewritten
        self._code_tables: dict[tuple[int, bytes], ir.Value] = {}  # per call: shared nested code tables

    # ----------------------------------------------------------------------------------------------- analysis

    def _excluded(self, node: ir.Node, weight_name: str) -> str | None:
        for pattern in self.exclude:
            for label, text in (("node", node.name or ""), ("weight", weight_name)):
                if pattern.search(text):
                    return f"excluded: pattern {pattern.pattern!r} matches {label} name {text!r}"
        return None

    def _weight(self, node: ir.Node, value: ir.Value | None, transpose: bool) -> tuple[ir.TensorProtocol, int, int]:
        """Check the B input; return its tensor and the (K, N) of the weight as the node uses it."""
        if value is not None and value.is_graph_input():
            if value.is_initializer():
                raise _Skip(f"B ({value.name!r}) is an initializer that is also a graph input (overridable)")
            raise _Skip(f"B is not a constant (graph input {value.name!r})")
        tensor = constant_tensor(value)
        if tensor is None:
            raise _Skip("B is not a constant (neither an initializer nor a Constant node)")
        if len(tensor.shape) != 2:
            raise _Skip(f"B is {len(tensor.shape)}-D with shape {list(tensor.shape)}; only a 2-D weight is rewritten")
        supported = _FLOAT_TYPES if self.format == "onnx_nf4" else _BNB4_TYPES
        if tensor.dtype not in supported:
            names = ", ".join(t.name for t in supported)
            raise _Skip(f"dtype {tensor.dtype.name} of the weight and A is not supported by this format ({names})")
        rows, cols = (int(d) for d in tensor.shape)
        K, N = (cols, rows) if transpose else (rows, cols)
        if K == 0 or N == 0:
            raise _Skip(f"weight has no elements (shape {[rows, cols]})")
        assert value is not None and value.name is not None
        reason = self._excluded(node, value.name)
        if reason:
            raise _Skip(reason)
        if self.min_elements > K * N:
            raise _Skip(f"weight has {K * N} elements, fewer than min_elements={self.min_elements}")
        return tensor, K, N

    @staticmethod
    def _check_a(a: ir.Value | None) -> None:
        if a is None:
            raise _Skip("A is missing")
        if a.shape is not None and len(a.shape) < 1:
            raise _Skip("A is a scalar (rank 0)")

    def _fused_add(self, plan: _Plan) -> None:
        """Fuse a following ``Add`` of a constant ``[N]`` vector into ``plan`` when that is valid."""
        out = plan.node.outputs[0]
        uses = list(out.uses())
        if self.format != "onnx_nf4" or out.is_graph_output() or len(uses) != 1:
            return
        add = uses[0].node
        if add.op_type != "Add" or add.domain not in _ONNX_DOMAINS or add.graph is not plan.graph:
            return
        other = add.inputs[1 - uses[0].idx]
        tensor = constant_tensor(other)
        if tensor is None or tensor.dtype != plan.tensor.dtype or tuple(tensor.shape) != (plan.N,):
            return
        plan.bias, plan.add = other, add

    def _plan(self, node: ir.Node) -> _Plan:
        if node.op_type == "MatMul":
            self._check_a(node.inputs[0])
            tensor, K, N = self._weight(node, node.inputs[1], transpose=False)
            plan = _Plan(node, node.inputs[1], tensor, False, K, N)  # type: ignore[arg-type]
            self._fused_add(plan)
            return plan
        trans_b = _int_attr(node, "transB", 0)
        self._check_a(node.inputs[0])
        tensor, K, N = self._weight(node, node.inputs[1], transpose=bool(trans_b))
        gemm = _Gemm(bool(_int_attr(node, "transA", 0)), _float_attr(node, "alpha", 1.0),
                     _float_attr(node, "beta", 1.0))  # fmt: skip
        return _Plan(node, node.inputs[1], tensor, bool(trans_b), K, N, gemm=gemm)  # type: ignore[arg-type]

    # ------------------------------------------------------------------------------------------- quantization

    def _prequantized(self, plan: _Plan, w: np.ndarray) -> QuantizedWeight | None:
        q = self.prequantized.get(plan.weight.name or "")
        if q is None:
            return None
        if (q.K, q.N) != (plan.K, plan.N):
            raise ValueError(
                f"prequantized weight {plan.weight.name!r} has (K, N) = ({q.K}, {q.N}), but node "
                f"{_node_label(plan.node)!r} uses it as ({plan.K}, {plan.N})"
            )
        if self.format == "com.microsoft":
            if q.nested is not None or q.K % q.block_size:
                raise ValueError(
                    f"prequantized weight {plan.weight.name!r} cannot be written as MatMulBnb4: it needs "
                    "K % block_size == 0 and no double quantization"
                )
            if q.absmax.astype(w.dtype).astype(np.float32).tobytes() != q.absmax.astype(np.float32).tobytes():
                raise ValueError(
                    f"prequantized weight {plan.weight.name!r}: its float32 absmax is not exactly representable "
                    f"in the weight's dtype {w.dtype}, which MatMulBnb4 stores it in"
                )
        return q

    def _fresh(self, base: str) -> str:
        assert self._names is not None, "only during call()"
        return self._names.fresh(base)

    def _initializer(self, graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
        name = self._fresh(base)
        tensor = ir.tensor(np.asarray(array, order="C"), name=name)
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
        graph.register_initializer(value)
        return value

    def _nested_code(self, graph: ir.Graph, code: np.ndarray) -> ir.Value:
        """One initializer per graph for each distinct nested code table (they are normally all the same)."""
        key = (id(graph), code.astype(np.float32).tobytes())
        if key not in self._code_tables:
            self._code_tables[key] = self._initializer(graph, "nf4_nested_code", code.astype(np.float32))
        return self._code_tables[key]

    def _quantize(self, plan: _Plan) -> _Quantized:
        """Quantize the plan's weight, then unmap it if it is external (one float weight resident at a time)."""
        try:
            return self._quantize_weight(plan)
        finally:
            _release(plan.tensor)

    def _quantize_weight(self, plan: _Plan) -> _Quantized:
        w = _as_numpy_float(plan.tensor)
        if plan.transpose:
            w = w.T
        name = plan.weight.name or "weight"
        graph = _owner_graph(plan.weight)
        q = self._prequantized(plan, w)
        if self.format == "com.microsoft":
            if q is not None:
                packed, absmax = q.packed.reshape(-1), q.absmax.reshape(-1)
            else:
                packed, absmax = quantize_blockwise(w.T, self.block_size, name=name)
            bs = q.block_size if q is not None else self.block_size
            absmax_t = absmax.astype(w.dtype)
            wq = dequantize_blockwise(packed, absmax_t.astype(np.float32), (plan.N, plan.K), bs).T
            inputs: list[ir.Value | None] = [
                self._initializer(graph, f"{name}_Bnb4", packed),
                self._initializer(graph, f"{name}_absmax", absmax_t),
            ]
            return _Quantized(None, bs, inputs, packed.nbytes + absmax_t.nbytes, _rel_rms_error(w, wq))
        if q is None:
            # The error sums come from the same pass over the weight (no dequantized copy).
            q, sums = quantize_weight_and_error(w, self.block_size, double_quant=self.double_quant, name=name)
        else:
            sums = error_sums(w, q)
        inputs = [
            self._initializer(graph, f"{name}_nf4", q.packed),
            self._initializer(graph, f"{name}_absmax", q.absmax),
        ]
        if q.nested is not None:
            inputs += [
                self._initializer(graph, f"{name}_nested_absmax", q.nested.nested_absmax.astype(np.float32)),
                self._nested_code(graph, q.nested.code),
                self._initializer(graph, f"{name}_absmax_offset", np.array(q.nested.offset, dtype=np.float32)),
            ]
        own_bytes = q.nbytes - (q.nested.code.nbytes if q.nested is not None else 0)  # the code table is shared
        return _Quantized(q, q.block_size, inputs, own_bytes, sums.rel_rms_error)

    # ------------------------------------------------------------------------------------------------ rewrite

    def _scalar(self, graph: ir.Graph, base: str, value: float, dtype: ir.DataType) -> ir.Value:
        return self._initializer(graph, base, np.array(value, dtype=np.float32).astype(dtype.numpy()))

    def _gemm_c(self, plan: _Plan, new_nodes: list[ir.Node]) -> tuple[ir.Value | None, ir.Value | None]:
        """``beta * C`` as ``(fused bias [N], value to Add)``; at most one is set."""
        gemm, graph, dtype, c_value = plan.gemm, plan.graph, plan.tensor.dtype, plan.c
        assert gemm is not None
        if c_value is None or gemm.beta == 0.0:
            return None, None
        tensor = constant_tensor(c_value)
        if tensor is None:
            if gemm.beta == 1.0:
                return None, c_value
            beta = self._scalar(graph, f"{_node_label(plan.node)}_beta", gemm.beta, dtype)
            scaled = ir.Value(name=self._fresh(f"{c_value.name}_scaled"))
            new_nodes.append(ir.node("Mul", [c_value, beta], outputs=[scaled], name=f"{plan.node.name}_beta_c"))
            return None, scaled
        c = tensor.numpy()
        if gemm.beta != 1.0:
            c = (np.float32(gemm.beta) * c.astype(np.float32)).astype(c.dtype)
        row_vector = c.ndim <= 1 or (c.ndim == 2 and c.shape[0] == 1)
        if gemm.alpha == 1.0 and row_vector and self.format == "onnx_nf4" and c.size in (1, plan.N):
            if gemm.beta == 1.0 and tuple(c.shape) == (plan.N,):
                return c_value, None
            return self._initializer(graph, f"{c_value.name}_bias", np.broadcast_to(c.reshape(-1), (plan.N,))), None
        if gemm.beta == 1.0:
            return None, c_value
        return None, self._initializer(graph, f"{c_value.name}_scaled", c)

    def _rewrite(self, plan: _Plan, quantized: _Quantized) -> bool:
        """Replace the plan's node(s); return whether a bias was fused into the op."""
        graph, node = plan.graph, plan.node
        new_nodes: list[ir.Node] = []
        a, bias, add_c = plan.a, plan.bias, None
        if plan.gemm is not None:
            if plan.gemm.trans_a:
                a = ir.Value(name=self._fresh(f"{plan.a.name}_T"))
                new_nodes.append(
                    ir.node("Transpose", [plan.a], {"perm": [1, 0]}, outputs=[a], name=f"{node.name}_transA")
                )
            bias, add_c = self._gemm_c(plan, new_nodes)
        y = ir.Value(name=self._fresh(f"{node.outputs[0].name}_nf4"))
        attributes: dict[str, int] = {"K": plan.K, "N": plan.N}
        if self.format == "com.microsoft":
            attributes.update(block_size=quantized.block_size, quant_type=1)
            new_nodes.append(ir.node("MatMulBnb4", [a, *quantized.inputs], attributes, domain=MS_DOMAIN,
                                     outputs=[y], name=node.name))  # fmt: skip
        else:
            assert quantized.q is not None
            attributes["block_size"] = quantized.q.block_size
            if quantized.q.nested is not None:
                attributes["nested_block_size"] = quantized.q.nested.block_size
            inputs = [a, *quantized.inputs]
            if bias is not None:
                inputs += [None] * (6 - len(inputs)) + [bias]
            new_nodes.append(ir.node(OP_TYPE, inputs, attributes, domain=DOMAIN, outputs=[y], name=node.name))
        dtype = plan.tensor.dtype
        if plan.gemm is not None and plan.gemm.alpha != 1.0:
            alpha = self._scalar(graph, f"{_node_label(node)}_alpha", plan.gemm.alpha, dtype)
            scaled = ir.Value(name=self._fresh(f"{y.name}_alpha"))
            new_nodes.append(ir.node("Mul", [y, alpha], outputs=[scaled], name=f"{node.name}_alpha"))
            y = scaled
        if add_c is not None:
            summed = ir.Value(name=self._fresh(f"{y.name}_c"))
            new_nodes.append(ir.node("Add", [y, add_c], outputs=[summed], name=f"{node.name}_c"))
            y = summed
        old_nodes = [node] if plan.add is None else [node, plan.add]
        old_out = old_nodes[-1].outputs[0]
        y.type, y.shape = old_out.type, old_out.shape
        ir.convenience.replace_nodes_and_values(graph, old_nodes[-1], old_nodes, new_nodes, [old_out], [y])
        return bias is not None

    # ------------------------------------------------------------------------------------------------- driver

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        report = QuantizationReport(self.block_size, self.double_quant, self.format)
        self.report = report
        self._names = UniqueNames(model)
        self._code_tables = {}
        plans: list[_Plan] = []
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if node.op_type not in ("MatMul", "Gemm") or node.domain not in _ONNX_DOMAINS:
                continue
            try:
                plans.append(self._plan(node))
            except _Skip as skip:
                logger.debug("skipping %s %r: %s", node.op_type, _node_label(node), skip)
                report.skipped.append(SkippedLayer(_node_label(node), node.op_type, str(skip)))
        plans = self._drop_nonfinite(plans, report)

        distinct = list({plan.key: plan for plan in plans}.values())
        quantized: dict[tuple[int, bool], _Quantized] = {}
        for done, plan in enumerate(distinct, 1):
            quantized[plan.key] = self._quantize(plan)
            if self.on_progress is not None:
                self.on_progress(done, len(distinct), plan.weight.name or "")

        seen: set[tuple[int, bool]] = set()
        for plan in plans:
            entry = quantized[plan.key]
            fused = self._rewrite(plan, entry)
            logger.debug("rewrote %s %r (weight %r, K=%d, N=%d)", plan.node.op_type, _node_label(plan.node),
                         plan.weight.name, plan.K, plan.N)  # fmt: skip
            report.layers.append(
                LayerReport(
                    node=_node_label(plan.node),
                    weight=plan.weight.name or "",
                    shape=(plan.K, plan.N),
                    bytes_before=plan.K * plan.N * plan.tensor.dtype.itemsize,
                    bytes_after=entry.nbytes,
                    rel_rms_error=entry.rel_rms_error,
                    op_type=plan.node.op_type,
                    fused_bias=fused,
                    shared=plan.key in seen,
                )
            )
            seen.add(plan.key)
        report.shared_bytes = sum(table.const_value.nbytes for table in self._code_tables.values())
        if plans:
            self._remove_unused(model, [plan.weight for plan in plans])
            model.opset_imports[DOMAIN if self.format == "onnx_nf4" else MS_DOMAIN] = OPSET_VERSION
        return ir.passes.PassResult(model, modified=bool(plans))

    def _drop_nonfinite(self, plans: Sequence[_Plan], report: QuantizationReport) -> list[_Plan]:
        """Skip (with a reason) the nodes whose weight holds NaN or Inf (NF4 cannot represent them)."""
        verdict: dict[tuple[int, bool], str | None] = {}
        kept = []
        for plan in plans:
            if plan.key not in verdict:
                verdict[plan.key] = None
                if plan.weight.name not in self.prequantized:
                    verdict[plan.key] = _nonfinite_reason(plan.tensor, plan.weight.name or "weight")
            if verdict[plan.key] is None:
                kept.append(plan)
            else:
                report.skipped.append(SkippedLayer(_node_label(plan.node), plan.node.op_type, verdict[plan.key]))
        return kept

    @staticmethod
    def _remove_unused(model: ir.Model, weights: Sequence[ir.Value]) -> None:
        """Remove the replaced weights' ``Constant`` nodes, then every initializer that nothing uses."""
        for weight in weights:
            producer = weight.producer()
            if producer is not None and not weight.uses() and not weight.is_graph_output() and producer.graph:
                producer.graph.remove(producer, safe=True)
        remove_unused_initializers(model)


def remove_unused_initializers(model: ir.Model) -> None:
    """Delete, in every graph, the initializers that no node uses and that are no graph input or output."""
    for graph in model.graphs():
        for name, value in list(graph.initializers.items()):
            if not value.uses() and not value.is_graph_output() and not value.is_graph_input():
                del graph.initializers[name]
