"""GPTQ over a whole model: calibration statistics for each layer, then codes with error feedback.

Two ways of collecting the statistics ``H = X^T X`` of each layer's input ``X``:

* ``sequential=False`` (all at once): one pass of the float model over the calibration data collects every
  layer's ``H``; each layer then compensates its own rounding only.
* ``sequential=True`` (layer by layer, the default): layers are quantized in waves; a wave's inputs are collected
  with every earlier layer already quantized, so each layer also compensates the error that reaches it from
  below. A wave holds the activations that no pending layer feeds (a transformer block gives four: the query,
  key and value projections share one input; then the attention output; then the first and second feed-forward
  matrices). The model runs once per wave (one onnxruntime session for all waves: the quantized weights are fed
  as overridable initializers). On all-MiniLM-L6-v2 it gives the better embeddings (``tools/bench/
  RESULTS_methods.md``).

A deep model (an LLM: four waves per transformer block) would run the model a hundred times; with ``passes`` the
consecutive waves are merged into about that many runs over the data (the later waves of a run then see the
earlier ones' float weights), each holding at most ``hessian_budget`` bytes of ``[K, K]`` sums. Only one batch of
activations and the sums of the current run are held; layer by layer also keeps the dequantized float copy of every
weight already quantized (fed to the later runs), as much memory as those float weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ..codec.layout import QuantizedWeight, dequantize_weight
from ..model.graph import node_label
from ..op.contract import MS_DOMAIN, ONNX_DOMAINS
from . import encode_weight
from .calibration import ActivationCollector, CalibrationData, Hessian
from .gptq import DEFAULT_DAMP, PreparedHessian, relative_output_error

__all__ = [
    "DEFAULT_HESSIAN_BUDGET",
    "CalibratedLayer",
    "CalibratedWeight",
    "find_layers",
    "quantize_with_calibration",
    "weights_with_other_uses",
]

#: With ``passes``: the most bytes of ``X^T X`` sums (float64 ``[K, K]`` per activation) held at once, 1 GiB. A
#: Llama of 1 B parameters (hidden 2048, MLP 5632, 22 layers) has about 8 GB of them.
DEFAULT_HESSIAN_BUDGET = 1 << 30

#: ``on_progress(done, total, layer)`` after each weight (``layer``: its first node, named as in the report).
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class CalibratedLayer:
    """A weight to quantize with GPTQ, and the activations that multiply it.

    Attributes:
        weight: the name of the weight's initializer in the main graph.
        transpose: the nodes use ``W = B.T`` (Gemm ``transB=1``); the weight is then ``B.T``, ``[K, N]``.
        activations: ``(value name, transposed)`` of the ``A`` input of each node using the weight
            (``transposed`` for Gemm ``transA=1``); their ``H`` are summed.
        layer: the first node using the weight, named as in the report (for progress).
    """

    weight: str
    transpose: bool
    activations: tuple[tuple[str, bool], ...]
    layer: str = ""

    @property
    def key(self) -> tuple[str, bool]:
        return self.weight, self.transpose


@dataclass(frozen=True)
class CalibratedWeight:
    """The result for one weight.

    Attributes:
        q: the NF4 weight.
        output_error: ``||X (W - Wq)|| / ||X W||`` over the calibration rows that this layer saw (the float
            layer's output without bias is the reference).
        rows: the number of calibration rows (activation vectors) in ``H``.
    """

    q: QuantizedWeight
    output_error: float
    rows: int


def find_layers(model: ir.Model, keys: Iterable[tuple[str, bool]]) -> list[CalibratedLayer]:
    """The :class:`CalibratedLayer` of each ``(weight name, transpose)`` in ``keys`` used by main-graph nodes.

    A ``MatMul`` with the weight as ``B`` reads its ``A`` as is; a ``Gemm`` reads ``A`` transposed when
    ``transA=1`` and its weight as ``B.T`` when ``transB=1``; a ``com.microsoft::Attention`` reads its input as
    ``A`` of its packed QKV weight. Keys used by no main-graph node (only inside an
    ``If`` / ``Loop`` / ``Scan`` body) are left out: their inputs are not values the collector can return.
    """
    wanted = set(keys)
    found: dict[tuple[str, bool], list[tuple[str, bool]]] = {}
    first_node: dict[tuple[str, bool], str] = {}
    for node in model.graph:
        linear = node.op_type in ("MatMul", "Gemm") and node.domain in ONNX_DOMAINS
        attention = node.op_type == "Attention" and node.domain == MS_DOMAIN
        if not (linear or attention) or len(node.inputs) < 2:
            continue
        a, b = node.inputs[0], node.inputs[1]
        if a is None or b is None or not a.name or not b.name:
            continue
        attrs = node.attributes
        trans_a = node.op_type == "Gemm" and "transA" in attrs and attrs["transA"].as_int() == 1
        trans_b = node.op_type == "Gemm" and "transB" in attrs and attrs["transB"].as_int() == 1
        if (b.name, trans_b) in wanted:
            found.setdefault((b.name, trans_b), []).append((a.name, trans_a))
            first_node.setdefault((b.name, trans_b), node_label(node))
    return [
        CalibratedLayer(name, transpose, tuple(dict.fromkeys(acts)), first_node[name, transpose])
        for (name, transpose), acts in found.items()
    ]


def _weight(model: ir.Model, layer: CalibratedLayer) -> tuple[np.ndarray, np.dtype]:
    """The layer's ``W[K, N]`` (float16 or float32; bfloat16 widened) and the dtype of its initializer."""
    tensor = model.graph.initializers[layer.weight].const_value
    assert tensor is not None
    b = tensor.numpy()
    w = b if b.dtype in (np.float16, np.float32) else b.astype(np.float32)
    return (w.T if layer.transpose else w), b.dtype


def _weight_k(model: ir.Model, layer: CalibratedLayer) -> int:
    """K of the layer's weight ``[K, N]`` (from the initializer's shape, without reading its data)."""
    shape = model.graph.initializers[layer.weight].shape
    assert shape is not None and len(shape) == 2
    return int(shape[1] if layer.transpose else shape[0])


def _reads_weight(node: ir.Node, index: int) -> bool:
    """Whether input ``index`` of ``node`` is the weight of a ``MatMul`` / ``Gemm`` (the use GPTQ quantizes)."""
    return index == 1 and node.op_type in ("MatMul", "Gemm") and node.domain in ONNX_DOMAINS


def weights_with_other_uses(model: ir.Model, weights: set[str]) -> set[str]:
    """The names in ``weights`` that a node also reads other than as a ``MatMul`` / ``Gemm`` weight.

    A tied embedding is one: the builder's graph reads ``lm_head``'s weight through ``Transpose -> Gather`` too.
    Those uses stay float in the quantized model, so GPTQ neither counts them as dependencies nor feeds the
    quantized weight to later runs (which would quantize the embedding as well).
    """
    other = set()
    for node in model.graph:
        for index, value in enumerate(node.inputs):
            if value is not None and value.name in weights and not _reads_weight(node, index):
                other.add(value.name)
    return other


def _dependencies(model: ir.Model, activations: Sequence[str], weights: set[str]) -> dict[str, set[str]]:
    """For each activation, the names in ``weights`` it is computed from through their ``MatMul`` / ``Gemm`` uses
    (:func:`weights_with_other_uses`)."""
    memo: dict[int, frozenset[str]] = {}

    def of_value(value: ir.Value) -> frozenset[str]:
        producer = value.producer()
        if producer is None:
            return frozenset([value.name]) if value.name in weights else frozenset()
        return of_node(producer)

    def of_node(node: ir.Node) -> frozenset[str]:
        if id(node) not in memo:
            # Iterative post-order: a deep graph (hundreds of layers) must not exhaust the recursion limit.
            stack = [node]
            while stack:
                top = stack[-1]
                pending = [
                    p
                    for v in top.inputs
                    if v is not None and (p := v.producer()) is not None and id(p) not in memo and p is not top
                ]
                if pending:
                    stack.extend(pending)
                    continue
                stack.pop()
                deps: set[str] = set()
                for index, v in enumerate(top.inputs):
                    if v is not None:
                        p = v.producer()
                        if p is not None:
                            deps |= memo[id(p)]
                        elif _reads_weight(top, index):
                            deps |= {v.name} & weights
                memo[id(top)] = frozenset(deps)
        return memo[id(node)]

    values = {v.name: v for v in model.graph.inputs}
    values.update((out.name, out) for node in model.graph for out in node.outputs)
    return {name: set(of_value(values[name])) for name in activations}


def _waves(model: ir.Model, layers: Sequence[CalibratedLayer]) -> list[tuple[list[str], list[CalibratedLayer]]]:
    """The sequential schedule: ``(activations to collect, layers to quantize after them)`` per wave."""
    activations = list(dict.fromkeys(name for layer in layers for name, _ in layer.activations))
    deps = _dependencies(model, activations, {layer.weight for layer in layers})
    done_weights: set[str] = set()
    collected: set[str] = set()
    pending = list(layers)
    waves = []
    while pending:
        ready = [a for a in activations if a not in collected and deps[a] <= done_weights]
        if not ready:
            raise ValueError("no layer input can be computed without a layer that is still to be quantized")
        collected.update(ready)
        wave = [layer for layer in pending if all(name in collected for name, _ in layer.activations)]
        pending = [layer for layer in pending if layer not in wave]
        done_weights.update(layer.weight for layer in wave)
        waves.append((ready, wave))
    return waves


Wave = tuple[list[str], list[CalibratedLayer]]


def _group_waves(waves: Sequence[Wave], sizes: Mapping[str, int], passes: int | None, budget: int) -> list[list[Wave]]:
    """The waves of each pass over the calibration data: one wave per pass (``passes`` ``None``), or
    consecutive waves merged into about ``passes`` passes of equal ``[K, K]`` float64 sums, each at most ``budget``
    bytes (more passes when needed; a wave larger than the budget on its own is a pass of its own).
    """
    wave_bytes = [sum(8 * sizes[name] ** 2 for name in wave[0]) for wave in waves]
    if passes is None:
        return [[wave] for wave in waves]
    limit = min(budget, max(-(-sum(wave_bytes) // max(1, passes)), max(wave_bytes, default=0)))
    groups: list[list[Wave]] = []
    held = 0
    for wave, size in zip(waves, wave_bytes, strict=True):
        if groups and held + size <= limit:
            groups[-1].append(wave)
            held += size
        else:
            groups.append([wave])
            held = size
    return groups


def quantize_with_calibration(
    model: ir.Model,
    layers: Sequence[CalibratedLayer],
    data: CalibrationData,
    *,
    block_size: int = 64,
    double_quant: bool = False,
    scales_in_weight_dtype: bool = False,
    damp: float = DEFAULT_DAMP,
    act_order: bool = True,
    sequential: bool = True,
    exclude_padding: bool = True,
    passes: int | None = None,
    hessian_budget: int = DEFAULT_HESSIAN_BUDGET,
    on_progress: Progress | None = None,
) -> dict[tuple[str, bool], CalibratedWeight]:
    """GPTQ-quantize ``layers`` of ``model`` on calibration ``data`` (see the module docstring).

    ``model`` is not modified. The arguments after ``data`` are those of :func:`onnx_nf4.methods.encode_weight`
    (``scales_in_weight_dtype``: store each weight's scales in its own dtype, as ``MatMulBnb4`` does), plus
    ``sequential`` (layer by layer, or all statistics from the float model), ``exclude_padding`` (drop rows
    where ``attention_mask`` is 0), ``passes`` (layer by layer: ``None`` runs the model once per wave, a number
    merges consecutive waves into about that many runs over the data, for deep models where a run is expensive),
    ``hessian_budget`` (with ``passes``: the most bytes of ``X^T X`` sums held at once) and
    ``on_progress(done, total, layer)`` after each weight.

    Returns:
        The :class:`CalibratedWeight` of each layer, keyed by ``(weight, transpose)``.
    """
    layers = list({layer.key: layer for layer in layers}.values())
    activations = list(dict.fromkeys(name for layer in layers for name, _ in layer.activations))
    sizes = {name: _weight_k(model, layer) for layer in layers for name, _ in layer.activations}
    shared = weights_with_other_uses(model, {layer.weight for layer in layers})
    fed_weights = [layer.weight for layer in layers if layer.weight not in shared] if sequential else []
    collector = ActivationCollector(model, activations, fed_weights)
    waves = _waves(model, layers) if sequential else [(activations, layers)]
    hessians: dict[tuple[str, bool], Hessian] = {}
    fed: dict[str, np.ndarray] = {}
    results: dict[tuple[str, bool], CalibratedWeight] = {}
    for group in _group_waves(waves, sizes, passes, hessian_budget):
        group_activations = {name for wave_activations, _ in group for name in wave_activations}
        wanted = [(name, t) for layer in layers for name, t in layer.activations if name in group_activations]
        hessians.update(collector.hessians(dict.fromkeys(wanted), data, weights=fed, exclude_padding=exclude_padding))
        for _, wave_layers in group:
            prepared = _prepare(wave_layers, hessians, damp, act_order)
            for layer in wave_layers:
                w, dtype = _weight(model, layer)
                h = prepared[layer.activations]
                q = encode_weight(w, block_size, method="gptq", double_quant=double_quant, hessian=h,
                                  scale_dtype=w.dtype.type if scales_in_weight_dtype else np.float32,
                                  name=layer.weight)  # fmt: skip
                wq = dequantize_weight(q)
                rows = sum(hessians[pair].rows for pair in layer.activations)
                results[layer.key] = CalibratedWeight(q, relative_output_error(w, wq, h.matrix), rows)
                if sequential and layer.weight not in shared:
                    fed[layer.weight] = (wq.T if layer.transpose else wq).astype(dtype)
                if on_progress is not None:
                    on_progress(len(results), len(layers), layer.layer or layer.weight)
            del prepared
        pending = {pair for layer in layers if layer.key not in results for pair in layer.activations}
        hessians = {pair: h for pair, h in hessians.items() if pair in pending}
    return results


def _prepare(
    layers: Sequence[CalibratedLayer],
    hessians: Mapping[tuple[str, bool], Hessian],
    damp: float,
    act_order: bool,
) -> dict[tuple[tuple[str, bool], ...], PreparedHessian]:
    """One :class:`PreparedHessian` per distinct set of activations (shared by the layers reading them)."""
    prepared: dict[tuple[tuple[str, bool], ...], PreparedHessian] = {}
    for layer in layers:
        if layer.activations not in prepared:
            matrix = sum(hessians[pair].matrix for pair in layer.activations)
            prepared[layer.activations] = PreparedHessian(np.asarray(matrix), damp=damp, act_order=act_order)
    return prepared
