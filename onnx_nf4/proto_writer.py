"""Writing an ``onnx_ir`` model as one ONNX protobuf file without building the whole message in memory.

``onnx_ir.save`` (without external data) converts the model to a ``ModelProto`` (a copy of every tensor) and
serializes it to one ``bytes`` object (a second copy) before writing it. :func:`write_model` writes the same
message in the protobuf wire format, field by field: the model and graph without their large initializers are
serialized as usual (small), and each large initializer is written as its small ``TensorProto`` header followed by
its ``raw_data`` field, taken directly from the tensor's buffer. Peak memory stays at the size of the largest
header, and the file is written once.

The file is a valid ``ModelProto`` encoding of the same model (the large initializers come last in the graph; the
order of fields in the wire format carries no meaning): ``onnx.load`` of it equals ``onnx_ir.serde.
serialize_model`` of the model, up to the order of ``graph.initializer``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import onnx
import onnx_ir as ir

__all__ = ["write_model"]

_MODEL_GRAPH_FIELD = 7  # ModelProto.graph
_GRAPH_INITIALIZER_FIELD = 5  # GraphProto.initializer
_TENSOR_RAW_DATA_FIELD = 9  # TensorProto.raw_data
_LENGTH_DELIMITED = 2
#: Initializers of at least this many bytes are streamed from their buffers.
STREAM_MIN_BYTES = 1 << 16


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int) -> bytes:
    return _varint(field << 3 | _LENGTH_DELIMITED)


def _field_size(field: int, length: int) -> int:
    return len(_key(field)) + len(_varint(length)) + length


def _raw_bytes(tensor: ir.TensorProtocol) -> memoryview | bytes:
    """The tensor's ``raw_data`` bytes (little-endian), without a copy when its numpy array allows it."""
    if isinstance(tensor, ir.Tensor) and tensor.dtype.bitwidth >= 8 and tensor.dtype != ir.DataType.STRING:
        array = tensor.numpy()
        if array.dtype.byteorder != ">" and array.flags.c_contiguous:
            return memoryview(array.reshape(-1).view(np.uint8))
    return tensor.tobytes()


def _streamed(graph: ir.Graph) -> list[ir.Value]:
    """The main graph's initializers held in memory and large enough to be worth streaming."""
    return [
        value
        for value in graph.initializers.values()
        if value.const_value is not None
        and not isinstance(value.const_value, ir.ExternalTensor)
        and value.const_value.nbytes >= STREAM_MIN_BYTES
        and value.const_value.dtype.bitwidth >= 8
        and value.const_value.dtype != ir.DataType.STRING
    ]


def _headers(model: ir.Model, values: list[ir.Value]) -> tuple[onnx.ModelProto, list[bytes]]:
    """The model's proto without the streamed initializers, and the ``TensorProto`` of each without its data."""
    tensors = [value.const_value for value in values]
    try:
        for value, tensor in zip(values, tensors, strict=True):
            value.const_value = ir.Tensor(np.zeros(0, tensor.dtype.numpy()), name=value.name)  # type: ignore[union-attr]
        proto = ir.serde.serialize_model(model)
    finally:
        for value, tensor in zip(values, tensors, strict=True):
            value.const_value = tensor
    by_name = {init.name: i for i, init in enumerate(proto.graph.initializer)}
    headers = []
    for value, tensor in zip(values, tensors, strict=True):
        header = proto.graph.initializer[by_name[value.name]]
        del header.dims[:]
        header.dims.extend(int(d) for d in tensor.shape)  # type: ignore[union-attr]
        header.ClearField("raw_data")
        headers.append(header.SerializeToString())
    streamed = {value.name for value in values}
    kept = [init for init in proto.graph.initializer if init.name not in streamed]
    proto.graph.ClearField("initializer")
    proto.graph.initializer.extend(kept)
    return proto, headers


def _chunks(model: ir.Model) -> Iterator[bytes | memoryview]:
    values = _streamed(model.graph)
    proto, headers = _headers(model, values)
    graph = proto.graph.SerializeToString()
    proto.ClearField("graph")
    datas = [_raw_bytes(value.const_value) for value in values]  # type: ignore[arg-type]
    tensor_sizes = [len(h) + _field_size(_TENSOR_RAW_DATA_FIELD, len(d)) for h, d in zip(headers, datas, strict=True)]
    graph_size = len(graph) + sum(_field_size(_GRAPH_INITIALIZER_FIELD, size) for size in tensor_sizes)
    yield proto.SerializeToString()
    yield _key(_MODEL_GRAPH_FIELD) + _varint(graph_size)
    yield graph
    for header, data, size in zip(headers, datas, tensor_sizes, strict=True):
        yield _key(_GRAPH_INITIALIZER_FIELD) + _varint(size) + header
        yield _key(_TENSOR_RAW_DATA_FIELD) + _varint(len(data))
        yield data


def write_model(model: ir.Model, path: str | os.PathLike[str]) -> None:
    """Write ``model`` (its tensors in memory or external) to ``path`` as one protobuf, streaming large tensors.

    External tensors keep their external data references, as with ``onnx_ir.save``. The model is left as it was.
    """
    with open(path, "wb") as f:
        for chunk in _chunks(model):
            f.write(chunk)
