"""Fused attention: ``com.microsoft::Attention`` split into its QKV projection and ``MultiHeadAttention``.

onnxruntime's transformer optimizer (``onnxruntime.transformers.optimizer.optimize_model``) fuses a BERT layer's
self-attention into one ``com.microsoft::Attention`` node whose QKV projection weight is an input:
``Attention(input[B, S, hidden], weights[hidden, q + k + v], bias[q + k + v], mask_index, ...)``. The quantize pass
rewrites that weight like any other linear layer by taking the projection out of the node::

    qkv = MatMulNF4(input, W_qkv, bias)             # one NF4 GEMM over the packed weight (bias fused when the
    q, k, v = Split(qkv, [q, k, v], axis=-1)        #   format has a bias input; else MultiHeadAttention adds it)
    output = com.microsoft::MultiHeadAttention(q, k, v, bias, key_padding_mask, attention_bias)

``MultiHeadAttention`` on separate ``q``, ``k``, ``v`` computes what ``Attention`` computes after its own GEMM
(onnxruntime 1.32 CPU: bit-identical outputs for ``mask_index`` ``[B]`` and ``[B, T]``); its packed-QKV input
form would save the ``Split`` but is not implemented on the CPU execution provider. The fused attention kernel is
kept: only the projection moves to the NF4 op.

An ``Attention`` is rewritten when onnxruntime's ``MultiHeadAttention`` computes the same thing: no past state
(``past``, ``past_sequence_length``, a used ``present``), no rotary embedding, and a ``mask_index`` that is absent,
a raw ``[B, T]`` mask or ``[B]`` sequence lengths from ``EmbedLayerNormalization`` or from a ``ReduceSum`` of a
``[B, T]`` mask (Optimum's ``ORTOptimizer`` output). ``Attention`` also takes ``[2B]``, ``[B, S, T]`` and
``[B, 1, M, M]`` masks, which ``MultiHeadAttention``'s ``key_padding_mask`` does not.
Any other is left fused and float, with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import onnx_ir as ir

from ..model.graph import constant_tensor
from ..op.contract import MS_DOMAIN

__all__ = [
    "ATTENTION_OP",
    "MHA_OP",
    "SPLIT_SIZES_INPUT_OPSET",
    "AttentionNotRewritable",
    "AttentionTerms",
    "attention_terms",
    "is_attention",
    "mha_nodes",
]

#: The fused op whose packed QKV weight the pass rewrites, and the op that takes its place.
ATTENTION_OP = "Attention"
MHA_OP = "MultiHeadAttention"

#: Input positions of ``com.microsoft::Attention`` (onnxruntime contrib op schema).
_INPUT, _WEIGHTS, _BIAS, _MASK, _PAST, _ATTENTION_BIAS, _PAST_SEQUENCE_LENGTH = range(7)
#: ``Attention`` attributes that ``MultiHeadAttention`` has with the same meaning.
_SHARED_ATTRIBUTES = ("num_heads", "scale", "mask_filter_value", "unidirectional")
#: ``Attention`` attributes whose non-zero value ``MultiHeadAttention`` cannot express.
_UNSUPPORTED_ATTRIBUTES = ("do_rotary", "past_present_share_buffer")
#: The op (and its output) that produces the ``[B]`` sequence lengths ``Attention`` reads as ``mask_index``.
_MASK_INDEX_PRODUCER = ("EmbedLayerNormalization", 1)
#: ``Split`` takes its sizes as an input from this default-domain opset on (an attribute before).
SPLIT_SIZES_INPUT_OPSET = 13


class AttentionNotRewritable(Exception):
    """An ``Attention`` node that stays fused and float; the message is the reason."""


def is_attention(node: ir.Node) -> bool:
    """Whether ``node`` is a ``com.microsoft::Attention``."""
    return node.domain == MS_DOMAIN and node.op_type == ATTENTION_OP


@dataclass
class AttentionTerms:
    """What an ``Attention`` node computes after its QKV projection, as ``MultiHeadAttention``'s inputs.

    Attributes:
        sizes: the widths of Q, K and V: columns of the packed weight, in that order (sum = N).
        attributes: ``MultiHeadAttention``'s attributes (those ``Attention`` set, same meaning).
        mask: ``key_padding_mask``: ``Attention``'s ``mask_index`` (``[B]`` lengths or a ``[B, T]`` mask), or None.
        attention_bias: the additive ``[B or 1, heads or 1, S, T]`` bias input, or None.
    """

    sizes: tuple[int, int, int]
    attributes: dict[str, ir.Attr] = field(default_factory=dict)
    mask: ir.Value | None = None
    attention_bias: ir.Value | None = None


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def _rank(value: ir.Value) -> int | None:
    """The rank of ``value``: from its shape, else through a ``Cast`` (as exporters cast the mask to int32)."""
    if value.shape is not None:
        return len(value.shape)
    producer = value.producer()
    if producer is not None and producer.op_type == "Cast" and producer.inputs and producer.inputs[0] is not None:
        return _rank(producer.inputs[0])
    return None


def _is_row_sum(value: ir.Value) -> bool:
    """``ReduceSum(mask[B, T], axes=[1 or -1], keepdims=0)``: the ``[B]`` lengths Optimum's optimizer computes."""
    producer = value.producer()
    if producer is None or producer.op_type != "ReduceSum" or producer.domain not in ("", "ai.onnx"):
        return False
    attrs = producer.attributes
    if "keepdims" not in attrs or attrs["keepdims"].as_int() != 0 or producer.inputs[0] is None:
        return False
    if "axes" in attrs:  # before opset 13
        axes = list(attrs["axes"].as_ints())
    else:
        tensor = constant_tensor(producer.inputs[1] if len(producer.inputs) > 1 else None)
        axes = tensor.numpy().reshape(-1).tolist() if tensor is not None else []
    return _rank(producer.inputs[0]) == 2 and axes in ([1], [-1])


def _mask_is_supported(mask: ir.Value) -> bool:
    """A ``[B, T]`` raw mask, or ``[B]`` lengths that come from ``EmbedLayerNormalization`` or a row sum of a
    ``[B, T]`` mask (a ``[B]`` of unknown origin may be ``Attention``'s ``[2B]`` end/start form, which
    ``MultiHeadAttention`` reads differently)."""
    if _rank(mask) == 2:
        return True
    producer = mask.producer()
    op_type, output = _MASK_INDEX_PRODUCER
    from_embedding = (
        producer is not None
        and producer.domain == MS_DOMAIN
        and producer.op_type == op_type
        and len(producer.outputs) > output
        and producer.outputs[output] is mask
    )
    return from_embedding or _is_row_sum(mask)


def attention_terms(node: ir.Node, N: int) -> AttentionTerms:
    """The :class:`AttentionTerms` of an ``Attention`` whose packed weight has ``N`` columns.

    Raises:
        AttentionNotRewritable: ``MultiHeadAttention`` cannot compute what the node computes (the message says why).
    """
    attrs = node.attributes
    for name in _UNSUPPORTED_ATTRIBUTES:
        if name in attrs and attrs[name].as_int():
            raise AttentionNotRewritable(f"Attention with {name}=1 has no MultiHeadAttention equivalent")
    for index, label in ((_PAST, "past"), (_PAST_SEQUENCE_LENGTH, "past_sequence_length")):
        if _input(node, index) is not None:
            raise AttentionNotRewritable(f"Attention with a {label} input (past state) is left fused")
    present = node.outputs[1] if len(node.outputs) > 1 else None
    if present is not None and (present.uses() or present.is_graph_output()):
        raise AttentionNotRewritable("Attention's present output is used (past state); left fused")
    if "qkv_hidden_sizes" in attrs:
        sizes = tuple(int(size) for size in attrs["qkv_hidden_sizes"].as_ints())
    elif N % 3 == 0:
        sizes = (N // 3,) * 3
    else:
        raise AttentionNotRewritable(f"the packed weight has N={N} columns, not 3 equal Q, K, V widths")
    if len(sizes) != 3 or sum(sizes) != N or sizes[0] != sizes[1]:
        raise AttentionNotRewritable(f"qkv_hidden_sizes {list(sizes)} do not split the weight's N={N} columns")
    mask = _input(node, _MASK)
    if mask is not None and not _mask_is_supported(mask):
        raise AttentionNotRewritable(
            f"mask_index {mask.name!r} is neither a [B, T] mask nor EmbedLayerNormalization's [B] lengths "
            "(MultiHeadAttention's key_padding_mask takes no other form)"
        )
    shared = {name: attrs[name] for name in _SHARED_ATTRIBUTES if name in attrs}
    return AttentionTerms(sizes, shared, mask, _input(node, _ATTENTION_BIAS))  # type: ignore[arg-type]


def mha_nodes(
    node: ir.Node,
    terms: AttentionTerms,
    qkv: ir.Value,
    bias: ir.Value | None,
    sizes: ir.Value | None,
    fresh: Callable[[str], ir.Value],
) -> tuple[list[ir.Node], ir.Value]:
    """The ``Split`` and ``MultiHeadAttention`` nodes that take ``qkv = input @ W (+ bias)`` to ``node``'s output.

    Args:
        node: the ``Attention`` being replaced (its name goes to the ``MultiHeadAttention``).
        terms: from :func:`attention_terms`.
        qkv: the projection's output ``[B, S, q + k + v]``.
        bias: the ``[q + k + v]`` bias still to add (``MultiHeadAttention``'s ``bias`` input), or None.
        sizes: an int64 ``[3]`` initializer holding ``terms.sizes``, ``Split``'s sizes input from opset
            :data:`SPLIT_SIZES_INPUT_OPSET` on; None before it (the sizes are then an attribute).
        fresh: ``fresh(base) -> ir.Value``, a new value with a unique name.

    Returns:
        ``(nodes, output)``: the nodes in order and the value that replaces the node's output.
    """
    name = node.name or ATTENTION_OP
    q, k, v = (fresh(f"{name}_{part}") for part in "qkv")
    if sizes is not None:
        split = ir.node("Split", [qkv, sizes], {"axis": -1}, outputs=[q, k, v], name=f"{name}_split")
    else:
        split = ir.node("Split", [qkv], {"axis": -1, "split": list(terms.sizes)}, outputs=[q, k, v],
                        name=f"{name}_split")  # fmt: skip
    inputs: list[ir.Value | None] = [q, k, v, bias, terms.mask, terms.attention_bias]
    while inputs[-1] is None:
        inputs.pop()
    output = fresh(f"{name}_mha")
    mha = ir.node(MHA_OP, inputs, dict(terms.attributes), domain=MS_DOMAIN, outputs=[output], name=name)
    return [split, mha], output
