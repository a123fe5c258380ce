"""What is quantized in an ONNX model: NF4 layers (both formats), float MatMul/Gemm, block sizes, bits per weight.

:func:`summarize_model` reads only the graph structure and the tensors' shapes and types, never their data, so it is
cheap on large models and works on a model loaded without its external data. Bytes are computed from shapes
(``prod(dims) * itemsize``), a tensor used by several nodes is counted once: per layer, a tensor shared by several
weights (the nested code table) is left out and counted in the totals only, as ``quantize`` reports it.

Recognized nodes (in the main graph and in control-flow subgraphs):

* ``onnx_nf4::MatMulNF4`` (``docs/MatMulNF4.md``): weight ``[K, N]`` stored in inputs 1..5 (codes, absmax and the
  optional double-quantization statistics); the optional bias (input 6) is not counted as weight storage.
* ``com.microsoft::MatMulBnb4`` (onnxruntime's contrib op): codes ``B`` and ``absmax`` (inputs 1 and 2), attributes
  ``K``, ``N``, ``block_size``, ``quant_type`` (1 = NF4, 0 = FP4).
* ``onnx_nf4.lookup::GatherNF4`` / ``GatherNF4DQ`` (:mod:`onnx_nf4.op.lookup`, an NF4 embedding table ``E[V, H]``):
  shown as the weight ``[K = H, N = V]`` it stores (a tied ``MatMulNF4`` / ``MatMulBnb4`` reads the same tensors,
  counted once); tensors read through a ``Reshape`` (``MatMulBnb4``'s flat bytes) are those of the ``Reshape``'s input.
* ``MatMul`` / ``Gemm`` of the default domain, left in float: with their weight's shape when ``B`` is a constant
  in the sense of :mod:`onnx_nf4.passes.quantize` (an initializer that is not a graph input, or a ``Constant`` node).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir

from ..op.contract import (
    BNB4_OP_TYPE,
    BNB4_WEIGHT_INPUTS,
    DOMAIN,
    MS_DOMAIN,
    ONNX_DOMAINS,
    OP_TYPE,
    WEIGHT_INPUTS,
    Input,
    is_bnb4,
    is_matmul_nf4,
)
from ..op.lookup import LookupInput, is_lookup
from .graph import constant_tensor

__all__ = ["FloatLayer", "ModelSummary", "QuantizedLayer", "summarize_model"]

BNB4_QUANT_TYPES = {0: "FP4", 1: "NF4"}


@dataclass(frozen=True)
class QuantizedLayer:
    """One node with a 4-bit weight.

    Attributes:
        node: node name (``"<op_type>#<index>"`` when the node has none).
        op: ``"onnx_nf4::MatMulNF4"``, ``"com.microsoft::MatMulBnb4"`` or ``"onnx_nf4.lookup::GatherNF4"`` (``DQ``).
        K: reduction size (rows of the equivalent ``MatMul`` weight ``W[K, N]``).
        N: output features (columns of ``W``).
        block_size: weight elements per absmax block.
        quant_type: ``"NF4"`` (or ``"FP4"`` for a ``MatMulBnb4`` with ``quant_type=0``).
        double_quant: whether the absmax is itself 8-bit quantized (``uint8`` absmax).
        tensors: names of the constant tensors storing the weight (codes, absmax, nested statistics).
        has_bias: whether the node adds a bias.
        accuracy_level: the ``accuracy_level`` attribute of a ``MatMulNF4`` (0 when absent); ``None`` for
            ``MatMulBnb4``, which has no such attribute.
    """

    node: str
    op: str
    K: int
    N: int
    block_size: int
    quant_type: str
    double_quant: bool
    tensors: tuple[str, ...]
    has_bias: bool
    accuracy_level: int | None = None


@dataclass(frozen=True)
class FloatLayer:
    """A ``MatMul`` / ``Gemm`` left in float.

    Attributes:
        node: node name (``"<op_type>#<index>"`` when the node has none).
        op_type: ``"MatMul"`` or ``"Gemm"``.
        weight: name of its constant ``B``, or ``None`` when ``B`` is computed at run time.
        shape: shape of the constant ``B`` (as stored), or ``None``.
        dtype: element type name of the constant ``B`` (e.g. ``"float32"``), or ``None``.
    """

    node: str
    op_type: str
    weight: str | None
    shape: tuple[int, ...] | None
    dtype: str | None


@dataclass
class ModelSummary:
    """The quantization state of a model.

    Attributes:
        quantized: the 4-bit layers, in graph order.
        float_layers: the float ``MatMul`` / ``Gemm`` nodes, in graph order.
        tensor_bytes: bytes of every constant tensor (initializer or ``Constant`` node), by name.
        opsets: the model's opset imports, ``{domain: version}`` (``""`` is the default domain).
    """

    quantized: list[QuantizedLayer] = field(default_factory=list)
    float_layers: list[FloatLayer] = field(default_factory=list)
    tensor_bytes: dict[str, int] = field(default_factory=dict)
    opsets: dict[str, int] = field(default_factory=dict)

    @property
    def formats(self) -> list[str]:
        """The quantized formats present: a sublist of ``["onnx_nf4", "com.microsoft"]``."""
        ops = {layer.op for layer in self.quantized}
        return [
            fmt
            for fmt, op in ((DOMAIN, f"{DOMAIN}::{OP_TYPE}"), (MS_DOMAIN, f"{MS_DOMAIN}::{BNB4_OP_TYPE}"))
            if op in ops
        ]

    @property
    def accuracy_levels(self) -> dict[int, int]:
        """How many ``MatMulNF4`` layers have each ``accuracy_level``, by level (ascending)."""
        levels = [layer.accuracy_level for layer in self.quantized if layer.accuracy_level is not None]
        return {level: levels.count(level) for level in sorted(set(levels))}

    @property
    def block_sizes(self) -> list[int]:
        """The distinct block sizes of the quantized layers, ascending."""
        return sorted({layer.block_size for layer in self.quantized})

    @property
    def quantized_elements(self) -> int:
        """Weight elements (``K * N``) of the distinct quantized weights."""
        seen: set[tuple[str, ...]] = set()
        total = 0
        for layer in self.quantized:
            if layer.tensors not in seen:
                seen.add(layer.tensors)
                total += layer.K * layer.N
        return total

    @property
    def quantized_bytes(self) -> int:
        """Bytes of the tensors storing the quantized weights, each tensor counted once."""
        names = {name for layer in self.quantized for name in layer.tensors}
        return sum(self.tensor_bytes.get(name, 0) for name in names)

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per quantized weight element, statistics included (0 when nothing is quantized)."""
        elements = self.quantized_elements
        return 8 * self.quantized_bytes / elements if elements else 0.0

    @property
    def float_weight_bytes(self) -> int:
        """Bytes of the distinct constant weights of the float ``MatMul`` / ``Gemm`` nodes."""
        names = {layer.weight for layer in self.float_layers if layer.weight is not None}
        return sum(self.tensor_bytes.get(name, 0) for name in names)

    @property
    def total_tensor_bytes(self) -> int:
        """Bytes of all constant tensors of the model."""
        return sum(self.tensor_bytes.values())

    @property
    def shared_tensors(self) -> set[str]:
        """Tensors that store parts of several distinct weights (the nested code table of double quantization)."""
        users: dict[str, set[tuple[str, ...]]] = {}
        for layer in self.quantized:
            for name in layer.tensors:
                users.setdefault(name, set()).add(layer.tensors)
        return {name for name, weights in users.items() if len(weights) > 1}

    @property
    def shared_bytes(self) -> int:
        """Bytes of :attr:`shared_tensors`, each counted once (part of :attr:`quantized_bytes`)."""
        return sum(self.tensor_bytes.get(name, 0) for name in self.shared_tensors)

    def layer_bytes(self, layer: QuantizedLayer) -> int:
        """Bytes of the tensors of ``layer``'s weight alone: :attr:`shared_tensors` are counted in the totals only
        (as :attr:`onnx_nf4.passes.report.LayerReport.bytes_after` does)."""
        shared = self.shared_tensors
        return sum(self.tensor_bytes.get(name, 0) for name in layer.tensors if name not in shared)


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if index < len(node.inputs) else None


def _int_attr(node: ir.Node, name: str, default: int = 0) -> int:
    attr = node.attributes.get(name)
    return int(attr.value) if attr is not None else default


def summarize_model(model: ir.Model) -> ModelSummary:
    """Summarize ``model``'s quantized and float ``MatMul``-like layers (see the module docstring)."""
    summary = ModelSummary(opsets=dict(model.opset_imports))
    counts: dict[str, int] = {}
    for node in model.graph.all_nodes():
        index = counts.get(node.op_type, 0)
        counts[node.op_type] = index + 1
        name = node.name or f"{node.op_type}#{index}"
        if is_matmul_nf4(node.domain, node.op_type):
            summary.quantized.append(_quantized_layer(summary, node, name, WEIGHT_INPUTS))
        elif is_bnb4(node.domain, node.op_type):
            summary.quantized.append(_quantized_layer(summary, node, name, BNB4_WEIGHT_INPUTS))
        elif is_lookup(node.domain, node.op_type):
            summary.quantized.append(_lookup_layer(summary, node, name))
        elif node.domain in ONNX_DOMAINS and node.op_type in ("MatMul", "Gemm"):
            b = _input(node, Input.B)
            tensor = constant_tensor(b)
            if tensor is not None:
                summary.tensor_bytes[b.name] = tensor.nbytes
            summary.float_layers.append(
                FloatLayer(
                    node=name,
                    op_type=node.op_type,
                    weight=b.name if tensor is not None else None,
                    shape=tuple(int(d) for d in tensor.shape) if tensor is not None else None,
                    dtype=tensor.dtype.name.lower() if tensor is not None else None,
                )
            )
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                summary.tensor_bytes.setdefault(value.name, value.const_value.nbytes)
    return summary


def _quantized_layer(summary: ModelSummary, node: ir.Node, name: str, weight_inputs: tuple[int, ...]) -> QuantizedLayer:
    """Describe a ``MatMulNF4`` / ``MatMulBnb4`` node and record the bytes of its weight tensors."""
    tensors = []
    for i in weight_inputs:
        value = _input(node, i)
        tensor = constant_tensor(value)
        if tensor is not None:
            summary.tensor_bytes[value.name] = tensor.nbytes
            tensors.append(value.name)
    is_nf4 = is_matmul_nf4(node.domain, node.op_type)
    absmax = _input(node, Input.ABSMAX)
    quant_type = 1 if is_nf4 else _int_attr(node, "quant_type", 1)
    return QuantizedLayer(
        node=name,
        op=f"{node.domain}::{node.op_type}",
        K=_int_attr(node, "K"),
        N=_int_attr(node, "N"),
        block_size=_int_attr(node, "block_size"),
        quant_type=BNB4_QUANT_TYPES.get(quant_type, f"quant_type={quant_type}"),
        double_quant=is_nf4 and absmax is not None and absmax.dtype == ir.DataType.UINT8,
        tensors=tuple(tensors),
        has_bias=is_nf4 and _input(node, Input.BIAS) is not None,
        accuracy_level=_int_attr(node, "accuracy_level") if is_nf4 else None,
    )


def _through_reshape(value: ir.Value | None) -> ir.Value | None:
    """``value``, or the input of the ``Reshape`` that produces it (a lookup reading ``MatMulBnb4``'s flat bytes)."""
    producer = value.producer() if value is not None else None
    if producer is not None and producer.op_type == "Reshape" and producer.domain in ONNX_DOMAINS:
        return producer.inputs[0]
    return value


def _lookup_layer(summary: ModelSummary, node: ir.Node, name: str) -> QuantizedLayer:
    """Describe a ``GatherNF4`` / ``GatherNF4DQ`` node and record the bytes of its table's tensors."""
    tensors = []
    for position in list(LookupInput)[1:]:
        value = _through_reshape(_input(node, position))
        tensor = constant_tensor(value)
        if value is not None and tensor is not None:
            summary.tensor_bytes[value.name] = tensor.nbytes  # type: ignore[index]
            tensors.append(value.name)
    packed = _input(node, LookupInput.PACKED)
    shape = packed.shape if packed is not None else None
    known = shape is not None and len(shape) == 3 and all(isinstance(d, int) for d in shape)
    absmax = _through_reshape(_input(node, LookupInput.ABSMAX))
    return QuantizedLayer(
        node=name,
        op=f"{node.domain}::{node.op_type}",
        K=_int_attr(node, "row_size"),
        N=int(shape[0]) if known else 0,  # type: ignore[index]
        block_size=2 * int(shape[2]) if known else 0,  # type: ignore[index]
        quant_type="NF4",
        double_quant=absmax is not None and absmax.dtype == ir.DataType.UINT8,
        tensors=tuple(tensors),  # type: ignore[arg-type]
        has_bias=False,
    )
