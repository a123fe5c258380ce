"""The constant weights of an exported graph's ``MatMul`` / ``Gemm`` nodes, and running the pass on them.

:func:`graph_weights` lists, for every ``MatMul`` / ``Gemm`` whose B input is an initializer, the
initializer's name, its orientation and the PyTorch module the node came from (when the exporter recorded it).
:func:`quantize_with_prequantized` runs :func:`onnx_nf4.quantize_model` with given NF4 weights, choosing which of the
other float weights are quantized.
"""

from __future__ import annotations

import ast
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import onnx_ir as ir

from ..api import quantize_model
from ..codec.layout import QuantizedWeight
from ..op.contract import ONNX_DOMAINS
from ..passes.embedding import is_table_gather
from ..passes.options import QuantizeOptions
from ..passes.plan import weight_source
from ..passes.report import QuantizationReport

__all__ = ["GraphWeight", "graph_weights", "quantize_with_prequantized", "table_weights"]

_NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"  # written by torch.onnx's dynamo exporter


@dataclass(frozen=True)
class GraphWeight:
    """One constant weight of a ``MatMul`` / ``Gemm`` node.

    Attributes:
        node: the node's name.
        name: the weight initializer's name.
        transposed: whether the initializer is ``[N, K]`` (``Gemm`` with ``transB=1``) rather than ``[K, N]``.
        module: the PyTorch module path the node was exported from, or ``None`` when the graph does not say.
        tensor: the initializer's tensor.
    """

    node: str
    name: str
    transposed: bool
    module: str | None
    tensor: ir.TensorProtocol


def _module_path(node: ir.Node, weight_name: str) -> str | None:
    """The module path of an exported ``nn.Linear`` node, from exporter metadata or naming conventions."""
    scopes = node.metadata_props.get(_NAME_SCOPES_KEY)
    if scopes:  # dynamo exporter: ['', 'encoder', ..., 'encoder.layer.0.attention.self.query', 'linear']
        try:
            names = ast.literal_eval(scopes)
        except (ValueError, SyntaxError):
            names = None
        if isinstance(names, list) and len(names) >= 2 and isinstance(names[-2], str):
            return names[-2]
    name = node.name or ""
    if name.startswith("/"):  # TorchScript exporter: '/encoder/layer.0/attention/self/query/MatMul'
        return ".".join(name.split("/")[1:-1])
    if weight_name.endswith(".weight"):  # an un-folded parameter used directly (e.g. Gemm with transB=1)
        return weight_name[: -len(".weight")]
    return None


def graph_weights(model: ir.Model) -> list[GraphWeight]:
    """Every ``MatMul`` / ``Gemm`` (subgraphs included) whose B input is a 2-D initializer, in node order."""
    found = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ONNX_DOMAINS or len(node.inputs) < 2:
            continue
        value = node.inputs[1]
        if value is None or not value.is_initializer() or value.const_value is None or value.is_graph_input():
            continue
        if len(value.const_value.shape) != 2:
            continue
        trans_b = node.attributes.get("transB")
        transposed = node.op_type == "Gemm" and trans_b is not None and trans_b.as_int() == 1
        name = value.name or ""
        found.append(GraphWeight(node.name or "", name, transposed, _module_path(node, name), value.const_value))
    return found


def table_weights(model: ir.Model) -> dict[str, ir.TensorProtocol]:
    """The embedding tables of ``model`` (the constant data of each ``Gather`` over a 2-D float table, through a
    ``Transpose`` when there is one), by initializer name: ``[V, H]``, or ``[H, V]`` under a ``Transpose``."""
    tables = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if is_table_gather(node):
            value = weight_source(node.inputs[0]).weight
            if value is not None and value.is_initializer() and value.const_value is not None:
                tables[value.name or ""] = value.const_value
    return tables


def quantize_with_prequantized(
    model: ir.Model,
    output_path: str | os.PathLike[str],
    prequantized: Mapping[str, QuantizedWeight],
    *,
    keep_float: Iterable[str] = (),
    quantize_float: bool = False,
    options: QuantizeOptions | None = None,
    **settings: Any,
) -> QuantizationReport:
    """Write ``model`` to ``output_path`` with the ``prequantized`` weights as NF4 (rewritten in place).

    ``options`` (default ``QuantizeOptions()``) with ``settings`` (its field names, e.g. ``block_size=128``)
    applied as by :meth:`~onnx_nf4.QuantizeOptions.build`.

    The ``prequantized`` weights (keyed by initializer name) are inserted whatever their size. Every other float
    ``MatMul`` / ``Gemm`` weight stays float unless ``quantize_float`` is set; then it is quantized with
    ``options.block_size`` / ``options.double_quant`` when it has at least ``options.min_elements`` elements and is
    not in ``keep_float``; embedding tables likewise (a prequantized table, e.g. bitsandbytes' ``EmbeddingNF4``, is
    inserted whatever its size; the others follow ``options.embedding_min_rows`` when ``quantize_float`` is set and
    stay float otherwise). ``options.exclude`` (regular expressions on node and weight names) applies to every
    weight, prequantized ones included. Without ``quantize_float`` the report states the most common block size of
    the prequantized weights and whether any is double-quantized.
    """
    options = QuantizeOptions.build(options, **settings)
    if not quantize_float and prequantized:
        # Nothing else is quantized: report the settings of the inserted weights (the most common block size).
        sizes = Counter(q.block_size for q in prequantized.values())
        double_quant = any(q.nested is not None for q in prequantized.values())
        options = options.replace(block_size=sizes.most_common(1)[0][0], double_quant=double_quant)
    patterns = list(options.exclude)
    keep = set(keep_float)
    for weight in graph_weights(model):
        if weight.name in prequantized:
            continue
        elements = weight.tensor.shape[0] * weight.tensor.shape[1]
        if not quantize_float or weight.name in keep or elements < options.min_elements:
            patterns.append(f"^{re.escape(weight.name)}$")
    for name, tensor in table_weights(model).items():
        if name not in prequantized and (not quantize_float or tensor.size < options.min_elements):
            patterns.append(f"^{re.escape(name)}$")
    options = options.replace(exclude=tuple(patterns), min_elements=0)
    _, report = quantize_model(model, output_path, options, prequantized=prequantized)
    return report
