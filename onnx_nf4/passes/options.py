"""``QuantizeOptions``: every setting of a quantization run, validated once.

One frozen object travels from the command line (or the keyword arguments of :func:`onnx_nf4.quantize_model`
and the torch exporters) through :class:`onnx_nf4.passes.QuantizeNF4Pass` to the per-weight encoder
(:func:`onnx_nf4.passes.encoding.encode_weight`). Building it checks every rule; whoever receives one never
checks again.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from ..codec.validation import check_block_size
from ..methods import METHODS
from ..op.contract import DOMAIN, MS_DOMAIN

__all__ = [
    "ACCURACY_LEVELS",
    "DEFAULT_EMBEDDING_BLOCK_SIZE",
    "DEFAULT_EMBEDDING_MIN_ROWS",
    "DEFAULT_MIN_ELEMENTS",
    "FORMATS",
    "METHODS",
    "QuantizeOptions",
]

#: Weights with fewer elements are kept in float. 4096 elements (e.g. 64 x 64) is 16 KiB of float32: below it
#: NF4 saves less than 14 KiB per weight, while such small matrices (classifier heads, gates, projections to a
#: handful of outputs) are where the 4-bit error is least diluted; an extra custom op also costs more than the
#: bytes it saves. Every MatMul of a transformer layer is far above it.
DEFAULT_MIN_ELEMENTS = 4096

#: Embedding tables (constant ``Gather`` data) with fewer rows stay float, unless the same values are a quantized
#: ``MatMul`` / ``Gemm`` weight (a tied embedding, stored once). Vocabularies have 30k rows and more (BERT 30522,
#: Llama 32000, GPT-2 50257, SmolLM2 49152); learned position tables 512 to 8192 rows and token-type tables 2: a
#: vocabulary is large (most of a small model's file) and each token reads one row, whereas a position table is
#: small and adds its error to every token.
DEFAULT_EMBEDDING_MIN_ROWS = 16384

#: The largest block size of embedding tables (and of the weights tied to them) by default: a token reads one row,
#: so a row's error is the token's whole input; and a tied table is also the ``lm_head``, whose error every logit
#: carries. Measured on SmolLM2-135M (tied, block 64 elsewhere): the tied table at block 64 raised the perplexity
#: 2.2 % above the folder with a float table, at block 32 it is below it (docs/embeddings.md).
DEFAULT_EMBEDDING_BLOCK_SIZE = 32

#: Output formats: ``onnx_nf4::MatMulNF4`` and onnxruntime's ``com.microsoft::MatMulBnb4``.
FORMATS = (DOMAIN, MS_DOMAIN)

#: The ``accuracy_level`` values a quantized model may ask for: 0 (float32 compute, exact) or 4 (the CPU kernels
#: may quantize the activations to int8 per block, as onnxruntime's ``MatMulNBits`` does at level 4).
ACCURACY_LEVELS = (0, 4)


@dataclass(frozen=True)
class QuantizeOptions:
    """The settings of a quantization run (immutable; invalid values raise ``ValueError`` on construction).

    Attributes:
        block_size: weights per absmax block along K, a power of two in [16, 4096].
        double_quant: also quantize the absmax to 8 bits (bitsandbytes' ``compress_statistics``; ``onnx_nf4``
            format only).
        format: ``"onnx_nf4"`` (``onnx_nf4::MatMulNF4``) or ``"com.microsoft"`` (``MatMulBnb4``).
        exclude: regular expressions; a node whose name or weight name matches one (``re.search``) stays float.
            A single string is one pattern.
        min_elements: weights with fewer elements stay float (>= 0); embedding tables too.
        embedding_min_rows: embedding tables (the constant 2-D float data of a ``Gather`` on axis 0) with at
            least this many rows become NF4 lookups (``onnx_nf4.lookup::GatherNF4``); a table with the values of a
            quantized ``MatMul`` / ``Gemm`` weight (tied) is taken whatever its rows, and stored once.
        embedding_block_size: the block size of embedding tables and of the weights tied to them; ``None``
            (default): ``min(block_size, DEFAULT_EMBEDDING_BLOCK_SIZE)``.
        external_data: for a written model: ``True`` writes the tensors to ``<file name>.data``, ``False`` keeps
            them in the protobuf, ``None`` decides by size (above 2 GB: external).
        accuracy_level: the ``MatMulNF4`` attribute written on every node, one of :data:`ACCURACY_LEVELS`
            (``onnx_nf4`` format only: ``MatMulBnb4`` has no such attribute).
        method: how codes and block scales are chosen, one of :data:`METHODS` (``"gptq"`` needs calibration
            data, given to :func:`onnx_nf4.quantize_model`; weights it has no statistics for get ``"mse"``).
    """

    block_size: int = 64
    double_quant: bool = False
    format: str = "onnx_nf4"
    exclude: tuple[str, ...] = ()
    min_elements: int = DEFAULT_MIN_ELEMENTS
    embedding_min_rows: int = DEFAULT_EMBEDDING_MIN_ROWS
    embedding_block_size: int | None = None
    external_data: bool | None = None
    accuracy_level: int = 0
    method: str = "rtn"

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # normalizing the fields of a frozen instance, once
        set_(self, "block_size", check_block_size(self.block_size))
        set_(self, "double_quant", bool(self.double_quant))
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
        if self.double_quant and self.format == MS_DOMAIN:
            raise ValueError("double_quant is not supported by com.microsoft::MatMulBnb4; use format='onnx_nf4'")
        exclude = (self.exclude,) if isinstance(self.exclude, str) else tuple(self.exclude)
        for pattern in exclude:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as err:
                raise ValueError(f"invalid exclude pattern {pattern!r}: {err}") from None
        set_(self, "exclude", exclude)
        if int(self.min_elements) < 0:
            raise ValueError(f"min_elements must be >= 0, got {self.min_elements}")
        set_(self, "min_elements", int(self.min_elements))
        if int(self.embedding_min_rows) < 0:
            raise ValueError(f"embedding_min_rows must be >= 0, got {self.embedding_min_rows}")
        set_(self, "embedding_min_rows", int(self.embedding_min_rows))
        if self.embedding_block_size is not None:
            set_(self, "embedding_block_size", check_block_size(self.embedding_block_size))
        if self.external_data is not None:
            set_(self, "external_data", bool(self.external_data))
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise ValueError(f"accuracy_level must be one of {ACCURACY_LEVELS}, got {self.accuracy_level!r}")
        set_(self, "accuracy_level", int(self.accuracy_level))
        if self.accuracy_level and self.format == MS_DOMAIN:
            raise ValueError("accuracy_level is not supported by com.microsoft::MatMulBnb4; use format='onnx_nf4'")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")

    @property
    def table_block_size(self) -> int:
        """The block size of embedding tables (and tied weights): :attr:`embedding_block_size` when set."""
        if self.embedding_block_size is not None:
            return self.embedding_block_size
        return min(self.block_size, DEFAULT_EMBEDDING_BLOCK_SIZE)

    @property
    def patterns(self) -> tuple[re.Pattern[str], ...]:
        """The compiled :attr:`exclude` patterns."""
        return tuple(re.compile(pattern) for pattern in self.exclude)

    def replace(self, **changes: Any) -> QuantizeOptions:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def build(cls, options: QuantizeOptions | None = None, /, **settings: Any) -> QuantizeOptions:
        """``options`` (default: ``QuantizeOptions()``) with the ``settings`` that are not ``None`` applied: how the
        public functions turn their keyword arguments into options (``None`` there means "as in ``options``")."""
        given = {name: value for name, value in settings.items() if value is not None}
        if options is None:
            return cls(**given)
        return options.replace(**given) if given else options
