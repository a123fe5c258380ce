"""One writer per output format: which weight dtypes it takes, whether it fuses a bias, its tensors and its node.

* :class:`NF4Writer`: ``onnx_nf4::MatMulNF4`` (float32 / float16 / bfloat16, fused bias, double quantization,
  ``accuracy_level``); its weight tensors are those of :class:`onnx_nf4.codec.layout.QuantizedWeight`.
* :class:`Bnb4Writer`: onnxruntime's ``com.microsoft::MatMulBnb4`` (float32 / float16; bytes identical to
  onnxruntime's ``MatMulBnb4Quantizer``: blocks run across the rows of ``W.T``, absmax in the weight's dtype; no
  bias, no double quantization).

:func:`writer_for` picks the writer of ``options.format``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ..codec.blockwise import dequantize_blockwise
from ..codec.layout import QuantizedWeight, nf4_rel_rms_error
from ..codec.metrics import rel_rms_error
from ..model.graph import Initializers
from ..op.contract import BNB4_OP_TYPE, DOMAIN, MS_DOMAIN, OP_TYPE, Input
from .encoding import encode_flat_and_error, encode_weight_and_error
from .options import QuantizeOptions

__all__ = ["Bnb4Writer", "Encoded", "NF4Writer", "Writer", "writer_for"]


@dataclass(frozen=True)
class Encoded:
    """The quantized tensors of one weight, shared by every node that uses it.

    Attributes:
        inputs: the op's inputs after ``A`` (codes, absmax[, nested statistics]).
        attributes: the op's attributes that come from the encoding (``block_size``, ``nested_block_size``).
        nbytes: bytes of this weight's own tensors (a table shared by several weights is not included).
        rel_rms_error: ``rms(W - decoded) / rms(W)``.
    """

    inputs: list[ir.Value | None]
    attributes: dict[str, int]
    nbytes: int
    rel_rms_error: float


class Writer(ABC):
    """How one output format stores a weight and builds its node (one instance per pass call)."""

    #: The value of :attr:`QuantizeOptions.format` and the op's domain and type.
    domain: str
    op_type: str
    #: The weight (and activation) dtypes the op takes.
    dtypes: tuple[ir.DataType, ...]
    #: Whether the op adds a bias, so that a following ``Add`` of a ``[N]`` constant can be fused.
    fuses_bias: bool

    def __init__(self, options: QuantizeOptions, initializers: Initializers):
        self.options = options
        self.initializers = initializers

    @abstractmethod
    def row_blocks(self, K: int) -> bool:
        """Whether the stored blocks of a ``K``-row weight are those of the ``MatMulNF4`` layout (blocks along K
        inside one column, i.e. inside one row of a tied embedding table), so that a lookup can read them."""

    @abstractmethod
    def check_prequantized(self, q: QuantizedWeight, w: np.ndarray, weight: str) -> None:
        """Raise ``ValueError`` when the format cannot store the given NF4 weight ``q`` of ``w`` exactly."""

    @abstractmethod
    def encode(self, w: np.ndarray, graph: ir.Graph, name: str, given: QuantizedWeight | None) -> Encoded:
        """Quantize ``w[K, N]`` (or store ``given``) as initializers of ``graph`` named after ``name``."""

    @abstractmethod
    def node(self, a: ir.Value, encoded: Encoded, K: int, N: int, bias: ir.Value | None, y: ir.Value,
             name: str | None) -> ir.Node:  # fmt: skip
        """The node computing ``y = a @ W (+ bias)``; ``bias`` is ``None`` unless :attr:`fuses_bias`."""


class NF4Writer(Writer):
    domain, op_type = DOMAIN, OP_TYPE
    dtypes = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
    fuses_bias = True

    def row_blocks(self, K: int) -> bool:
        return True

    def check_prequantized(self, q: QuantizedWeight, w: np.ndarray, weight: str) -> None:
        pass  # MatMulNF4 stores every QuantizedWeight as it is

    def encode(self, w: np.ndarray, graph: ir.Graph, name: str, given: QuantizedWeight | None) -> Encoded:
        if given is None:
            q, error = encode_weight_and_error(w, self.options, name=name)
        else:
            q, error = given, nf4_rel_rms_error(w, given)
        add = self.initializers.add
        inputs: list[ir.Value | None] = [add(graph, f"{name}_nf4", q.packed), add(graph, f"{name}_absmax", q.absmax)]
        attributes = {"block_size": q.block_size}
        own_bytes = q.nbytes
        if q.nested is not None:
            code = q.nested.code.astype(np.float32)
            inputs += [
                add(graph, f"{name}_nested_absmax", q.nested.nested_absmax.astype(np.float32)),
                self.initializers.shared(graph, "nf4_nested_code", code),
                add(graph, f"{name}_absmax_offset", np.array(q.nested.offset, dtype=np.float32)),
            ]
            attributes["nested_block_size"] = q.nested.block_size
            own_bytes -= q.nested.code.nbytes  # the code table is shared: counted once, in the report's totals
        return Encoded(inputs, attributes, own_bytes, error)

    def node(self, a: ir.Value, encoded: Encoded, K: int, N: int, bias: ir.Value | None, y: ir.Value,
             name: str | None) -> ir.Node:  # fmt: skip
        attributes = {"K": K, "N": N, **encoded.attributes}
        if self.options.accuracy_level:
            attributes["accuracy_level"] = self.options.accuracy_level
        inputs: Sequence[ir.Value | None] = [a, *encoded.inputs]
        if bias is not None:
            inputs = [*inputs, *[None] * (Input.BIAS - len(inputs)), bias]
        return ir.node(self.op_type, inputs, attributes, domain=self.domain, outputs=[y], name=name)


class Bnb4Writer(Writer):
    domain, op_type = MS_DOMAIN, BNB4_OP_TYPE
    dtypes = (ir.DataType.FLOAT, ir.DataType.FLOAT16)
    fuses_bias = False

    def row_blocks(self, K: int) -> bool:
        return K % self.options.block_size == 0  # flat blocks over W.T then never span two columns

    def check_prequantized(self, q: QuantizedWeight, w: np.ndarray, weight: str) -> None:
        if q.nested is not None or q.K % q.block_size:
            raise ValueError(
                f"prequantized weight {weight!r} cannot be written as MatMulBnb4: it needs "
                "K % block_size == 0 and no double quantization"
            )
        if q.absmax.astype(w.dtype).astype(np.float32).tobytes() != q.absmax.astype(np.float32).tobytes():
            raise ValueError(
                f"prequantized weight {weight!r}: its float32 absmax is not exactly representable "
                f"in the weight's dtype {w.dtype}, which MatMulBnb4 stores it in"
            )

    def encode(self, w: np.ndarray, graph: ir.Graph, name: str, given: QuantizedWeight | None) -> Encoded:
        error: float | None = None
        if given is not None:
            packed, absmax, bs = given.packed.reshape(-1), given.absmax.reshape(-1), given.block_size
        else:
            packed, absmax, error = encode_flat_and_error(w, self.options, name=name)
            bs = self.options.block_size
        K, N = w.shape
        absmax_t = absmax.astype(w.dtype)  # MatMulBnb4 stores the absmax in T
        if error is None:  # decoded with the stored (possibly rounded) absmax
            decoded = dequantize_blockwise(packed, absmax_t.astype(np.float32), (N, K), bs).T
            error = rel_rms_error(w, decoded)
        add = self.initializers.add
        inputs: list[ir.Value | None] = [add(graph, f"{name}_Bnb4", packed), add(graph, f"{name}_absmax", absmax_t)]
        return Encoded(inputs, {"block_size": bs}, packed.nbytes + absmax_t.nbytes, error)

    def node(self, a: ir.Value, encoded: Encoded, K: int, N: int, bias: ir.Value | None, y: ir.Value,
             name: str | None) -> ir.Node:  # fmt: skip
        assert bias is None, "MatMulBnb4 has no bias input"
        attributes = {"K": K, "N": N, **encoded.attributes, "quant_type": 1}
        return ir.node(self.op_type, [a, *encoded.inputs], attributes, domain=self.domain, outputs=[y], name=name)


def writer_for(options: QuantizeOptions, initializers: Initializers) -> Writer:
    """The writer of ``options.format``."""
    writer = NF4Writer if options.format == DOMAIN else Bnb4Writer
    return writer(options, initializers)
