"""Feeding a genai decoder one prefill: the inputs besides ``input_ids`` that the model builder's graphs take.

A decoder built by onnxruntime-genai's model builder takes ``input_ids [batch, sequence]``, ``attention_mask
[batch, total_sequence]``, sometimes ``position_ids [batch, sequence]``, and one ``past_key_values.<i>.key`` /
``.value`` per layer, ``[batch, kv_heads, past_sequence, head_size]``. A prefill (what perplexity and
calibration run) has no past: those get ``[batch, kv_heads, 0, head_size]`` arrays of the input's dtype, the
mask is all ones and the positions are ``0 .. sequence - 1``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import GenaiFolderError

__all__ = ["GraphInput", "decoder_inputs", "prefill_feed"]

ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
PAST_PREFIX = "past_key_values"

_FLOAT_TYPES = {1: np.float32, 10: np.float16}  # onnx.TensorProto.FLOAT, FLOAT16


@dataclass(frozen=True)
class GraphInput:
    """A graph input: its name, its numpy dtype (``None`` for a type a prefill cannot make) and its shape
    (``int`` for a fixed dimension, ``str`` / ``None`` for a symbolic one)."""

    name: str
    dtype: type | None
    shape: tuple[int | str | None, ...]


def decoder_inputs(model_path: str | os.PathLike[str]) -> list[GraphInput]:
    """The graph inputs of an ONNX model file (its external data is not read)."""
    import onnx

    model = onnx.load(str(Path(model_path)), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    inputs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        shape = tuple(
            dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or None) for dim in tensor.shape.dim
        )
        dtype = np.int64 if tensor.elem_type == 7 else _FLOAT_TYPES.get(tensor.elem_type)
        inputs.append(GraphInput(value.name, dtype, shape))
    return inputs


def _past(value: GraphInput, batch: int, head_size: int) -> np.ndarray:
    shape = value.shape
    if len(shape) != 4:
        raise GenaiFolderError(f"past key/value input {value.name!r} has rank {len(shape)}, expected 4")
    heads, size = shape[1], shape[3] if isinstance(shape[3], int) else head_size
    if not isinstance(heads, int) or not size or value.dtype not in (np.float32, np.float16):
        raise GenaiFolderError(f"cannot make an empty key/value cache for input {value.name!r} {shape}")
    return np.zeros((batch, heads, 0, size), dtype=value.dtype)


def prefill_feed(
    inputs: Sequence[GraphInput],
    given: Mapping[str, np.ndarray],
    *,
    input_ids: str = "input_ids",
    head_size: int = 0,
) -> dict[str, np.ndarray]:
    """``given`` (which must hold ``input_ids``) completed into one prefill's feed of ``inputs``.

    Inputs already in ``given`` are kept as given; ``attention_mask`` becomes all ones, ``position_ids``
    ``0 .. sequence - 1`` (or, with a given mask, the running count of its ones less one, as onnxruntime-genai
    does), past key/values empty (``head_size`` is used when the graph leaves the last dimension symbolic). Names
    of ``given`` that are not graph inputs are left in the feed (the caller's check reports them).

    Raises:
        GenaiFolderError: no ``input_ids``, or a missing input that a prefill cannot make.
    """
    if input_ids not in given:
        raise GenaiFolderError(f"a decoder prefill needs {input_ids!r}; got {sorted(given)}")
    feed = dict(given)
    ids = np.asarray(feed[input_ids])
    if ids.ndim != 2:
        raise GenaiFolderError(f"{input_ids!r} must be [batch, sequence], got shape {ids.shape}")
    batch, length = ids.shape
    for value in inputs:
        if value.name in feed:
            continue
        if value.name == ATTENTION_MASK:
            feed[value.name] = np.ones((batch, length), dtype=np.int64)
        elif value.name == POSITION_IDS:
            mask = feed.get(ATTENTION_MASK)
            if mask is not None and np.asarray(mask).shape == (batch, length):
                positions = np.maximum(np.cumsum(np.asarray(mask, dtype=np.int64), axis=1) - 1, 0)
            else:
                positions = np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length))
            feed[value.name] = np.ascontiguousarray(positions)
        elif value.name.startswith(PAST_PREFIX):
            feed[value.name] = _past(value, batch, head_size)
        else:
            raise GenaiFolderError(f"decoder input {value.name!r} is not one a prefill can make; give it")
    return feed
