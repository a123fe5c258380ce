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

import contextlib
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
    """The tensor's ``raw_data`` bytes (little-endian), without a copy when its numpy array allows it (an external
    tensor's array maps its file)."""
    if isinstance(tensor, (ir.Tensor, ir.ExternalTensor)) and _streamable_dtype(tensor):
        array = tensor.numpy()
        if array.dtype.byteorder != ">" and array.flags.c_contiguous:
            return memoryview(array.reshape(-1).view(np.uint8))
    return tensor.tobytes()


def _streamable_dtype(tensor: ir.TensorProtocol) -> bool:
    return tensor.dtype.bitwidth >= 8 and tensor.dtype != ir.DataType.STRING


def _streamed(graph: ir.Graph, inline_external: bool) -> list[ir.Value]:
    """The main graph's initializers to stream: the large ones held in memory, and the external ones when their
    data is to be written into the file."""
    values = []
    for value in graph.initializers.values():
        tensor = value.const_value
        if tensor is None or not _streamable_dtype(tensor):
            continue
        external = isinstance(tensor, ir.ExternalTensor)
        if (external and inline_external) or (not external and tensor.nbytes >= STREAM_MIN_BYTES):
            values.append(value)
    return values


def _load_subgraph_externals(model: ir.Model) -> None:
    """Read the external initializers of subgraphs into memory (those of the main graph are streamed)."""
    values = [
        value
        for graph in model.graphs()
        if graph is not model.graph
        for value in graph.initializers.values()
        if isinstance(value.const_value, ir.ExternalTensor)
    ]
    loaded = ir.external_data.convert_tensors_from_external([value.const_value for value in values])
    for value, tensor in zip(values, loaded, strict=True):
        value.const_value = tensor


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


def _chunks(model: ir.Model, inline_external: bool = False) -> Iterator[bytes | memoryview]:
    values = _streamed(model.graph, inline_external)
    proto, headers = _headers(model, values)
    graph = proto.graph.SerializeToString()
    proto.ClearField("graph")
    sizes = [value.const_value.nbytes for value in values]  # type: ignore[union-attr]
    tensor_sizes = [len(h) + _field_size(_TENSOR_RAW_DATA_FIELD, n) for h, n in zip(headers, sizes, strict=True)]
    graph_size = len(graph) + sum(_field_size(_GRAPH_INITIALIZER_FIELD, size) for size in tensor_sizes)
    yield proto.SerializeToString()
    yield _key(_MODEL_GRAPH_FIELD) + _varint(graph_size)
    yield graph
    for value, header, nbytes, size in zip(values, headers, sizes, tensor_sizes, strict=True):
        yield _key(_GRAPH_INITIALIZER_FIELD) + _varint(size) + header
        yield _key(_TENSOR_RAW_DATA_FIELD) + _varint(nbytes)
        tensor = value.const_value
        data = _raw_bytes(tensor)  # type: ignore[arg-type]
        if len(data) != nbytes:  # memoryview / bytes length in bytes
            raise AssertionError(f"tensor {value.name!r}: {len(data)} data bytes, {nbytes} expected")
        yield data
        del data
        if isinstance(tensor, ir.ExternalTensor):  # unmap it: its pages would stay resident otherwise
            with contextlib.suppress(BufferError):
                tensor.release()


def write_model(model: ir.Model, path: str | os.PathLike[str], *, inline_external: bool = False) -> None:
    """Write ``model`` to ``path`` as one protobuf, streaming large tensors from their buffers.

    Args:
        model: the model; it is left as it was, except that with ``inline_external`` the external initializers of
            subgraphs are read into memory.
        path: the file to write.
        inline_external: write the data of external initializers into the file (as ``onnx_ir.external_data.
            load_to_model`` then ``onnx_ir.save`` would), streamed from their memory-mapped files, each unmapped
            once written; otherwise they keep their references to external data, as with ``onnx_ir.save``.
    """
    if inline_external:
        _load_subgraph_externals(model)
    with open(path, "wb") as f:
        for chunk in _chunks(model, inline_external):
            f.write(chunk)
