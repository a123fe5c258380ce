"""What a quantization run did, layer by layer (returned by ``quantize_model``, printed by the CLI)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["FloatWeight", "LayerReport", "QuantizationReport", "SkippedLayer"]


@dataclass(frozen=True)
class LayerReport:
    """One rewritten node.

    Attributes:
        node: name of the rewritten node (``MatMul`` / ``Gemm``, or the ``Gather`` of an embedding table).
        weight: name of its weight initializer (a weight shared by several nodes appears once per node,
            with ``shared=True`` after the first).
        shape: ``(K, N)`` of the weight as used by the node; for a ``Gather`` over ``E[V, H]``, ``(H, V)``: the
            ``MatMul`` weight ``E.T`` whose layout the lookup reads (that of a tied ``lm_head``).
        bytes_before: bytes of the float weight.
        bytes_after: bytes of this weight's NF4 tensors (codes, absmax, and with double quantization the nested
            absmax and offset; the 256-entry nested code table, one per graph, is in
            :attr:`QuantizationReport.shared_bytes`).
        rel_rms_error: ``rms(W - dequant(W)) / rms(W)`` (0 for an all-zero weight).
        op_type: the original op type (``MatMul``, ``Gemm`` or ``Gather``).
        fused_bias: whether a following ``Add`` (or Gemm's C) was fused into the node.
        shared: whether the weight was already quantized for an earlier node.
        output_error: ``method="gptq"``: ``||X (W - dequant(W))|| / ||X W||`` over the calibration rows ``X``
            that reached this layer (the float layer's output, bias left out, is the reference); ``None`` for the
            other methods and for weights quantized without calibration statistics.
    """

    node: str
    weight: str
    shape: tuple[int, int]
    bytes_before: int
    bytes_after: int
    rel_rms_error: float
    op_type: str = "MatMul"
    fused_bias: bool = False
    shared: bool = False
    output_error: float | None = None


@dataclass(frozen=True)
class SkippedLayer:
    """A MatMul/Gemm left alone, and why (e.g. "B is not a constant", "B is 3-D", "excluded")."""

    node: str
    op_type: str
    reason: str


@dataclass(frozen=True)
class FloatWeight:
    """A float constant that stays in the model: its name, shape, bytes and why it stays."""

    name: str
    shape: tuple[int, ...]
    nbytes: int
    reason: str


@dataclass
class QuantizationReport:
    """Every rewritten and skipped node of a run, plus the settings used."""

    block_size: int
    double_quant: bool
    format: str
    layers: list[LayerReport] = field(default_factory=list)
    skipped: list[SkippedLayer] = field(default_factory=list)
    #: Bytes of tensors shared by every double-quantized layer of a graph (the nested code tables).
    shared_bytes: int = 0
    #: The ``accuracy_level`` attribute written on every ``MatMulNF4`` node (0: float32 compute).
    accuracy_level: int = 0
    #: The ``MatMulNF4`` / ``MatMulBnb4`` nodes the model already had (left as they were), by name.
    already_quantized: list[str] = field(default_factory=list)
    #: How codes and scales were chosen: ``"rtn"``, ``"mse"`` or ``"gptq"`` (:mod:`onnx_nf4.methods`).
    method: str = "rtn"
    #: Quantized weights whose float tensor stays in the model too, because a node that was not rewritten
    #: still reads it (counted in :attr:`bytes_after`: the file holds both).
    kept_float: list[FloatWeight] = field(default_factory=list)
    #: Float constants of at least ``min_elements`` elements that no ``MatMul`` / ``Gemm`` / ``Gather`` /
    #: ``com.microsoft::Attention`` reads (e.g. the tables of a fused ``com.microsoft::EmbedLayerNormalization``):
    #: never quantized, listed with their readers. A skipped ``Attention``'s weight is in ``skipped``, with the reason.
    left_float: list[FloatWeight] = field(default_factory=list)
    #: Bytes of every constant tensor of the model (initializers and ``Constant`` nodes, all graphs), before and
    #: after the pass: what the written file holds besides the graph's structure.
    tensor_bytes_before: int = 0
    tensor_bytes_after: int = 0
    #: The block size of the embedding tables and the weights tied to them (``QuantizeOptions.table_block_size``).
    table_block_size: int = 0

    @property
    def bytes_before(self) -> int:
        """Float bytes of the distinct quantized weights."""
        return sum(layer.bytes_before for layer in self.layers if not layer.shared)

    @property
    def bytes_after(self) -> int:
        """NF4 bytes of the distinct quantized weights, shared tensors included once, plus the float copies that
        stay (:attr:`kept_float`)."""
        kept = sum(weight.nbytes for weight in self.kept_float)
        return sum(layer.bytes_after for layer in self.layers if not layer.shared) + self.shared_bytes + kept

    @property
    def size_ratio(self) -> float:
        """``bytes_after / bytes_before`` over the rewritten weights (0 when nothing was rewritten)."""
        return self.bytes_after / self.bytes_before if self.bytes_before else 0.0

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per quantized weight element, statistics included."""
        elements = sum(layer.shape[0] * layer.shape[1] for layer in self.layers if not layer.shared)
        return 8 * self.bytes_after / elements if elements else 0.0
