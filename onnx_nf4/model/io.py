"""Loading ONNX models with clear errors, and saving them atomically.

* :func:`load_model` accepts a path, an ``onnx.ModelProto`` or an ``onnx_ir.Model`` and returns an
  ``onnx_ir.Model``. Files are read with ``onnx_ir``: external tensors stay on disk (memory-mapped when read).
  Every failure is a :class:`ModelLoadError` naming the file: missing or unreadable file, a directory, not an
  ONNX model, truncated file or protobuf garbage, a name that is not valid UTF-8, missing or too short external
  data file, external data outside the model's directory (``../``, a symbolic link out of it) or with several
  hard links (``onnx_ir`` refuses both), an external ``length`` that disagrees with the tensor's shape and type.
* :func:`save_model` writes to a temporary directory inside the target directory, fsyncs, then moves the
  external data file (if any) and the model into place with ``os.replace``. Saving over the model's own source
  path is therefore safe: the input stays intact until the new files are complete, and tensors still mapped from
  the old data file stay readable.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Union

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError, Message

from .proto_writer import write_model

__all__ = [
    "PROTOBUF_LIMIT_BYTES",
    "ModelLike",
    "ModelLoadError",
    "external_tensors",
    "load_model",
    "save_model",
    "tensor_bytes",
]

#: Models whose tensors exceed this many bytes are saved with external data (protobuf's 2 GiB limit, minus a
#: margin for the graph itself).
PROTOBUF_LIMIT_BYTES = 2**31 - 64 * 2**20

ModelLike = Union[str, "os.PathLike[str]", onnx.ModelProto, ir.Model]
"""What the API accepts as a model: a path, a protobuf or an IR model."""


class ModelLoadError(ValueError):
    """A model file could not be read as an ONNX model (the message names the file and the cause)."""


def external_tensors(model: ir.Model) -> Iterator[ir.ExternalTensor]:
    """The initializers of every graph of ``model`` whose data lies in an external file (not read)."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                yield value.const_value


def _check_external_data(model: ir.Model, path: Path) -> None:
    directory = path.absolute().parent.resolve()
    for tensor in external_tensors(model):
        data_path = Path(tensor.path)
        if not data_path.resolve().is_relative_to(directory):
            raise ModelLoadError(
                f"{path}: external data file {tensor.location!r} of tensor {tensor.name!r} is outside the model's "
                f"directory (it resolves to {data_path.resolve()})"
            )
        if not data_path.is_file():
            raise ModelLoadError(
                f"{path}: external data file {tensor.location!r} of tensor {tensor.name!r} not found "
                f"(looked for {data_path})"
            )
        if data_path.resolve().stat().st_nlink > 1:
            raise ModelLoadError(
                f"{path}: external data file {tensor.location!r} has several hard links, which onnx_ir refuses to "
                "read (copy the file instead of linking it)"
            )
        if tensor.length is not None and tensor.length != tensor.nbytes:
            raise ModelLoadError(
                f"{path}: tensor {tensor.name!r} declares external data length {tensor.length}, but its shape "
                f"{list(tensor.shape)} and type {tensor.dtype.name} need {tensor.nbytes} bytes"
            )
        end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
        size = data_path.stat().st_size
        if size < end:
            raise ModelLoadError(
                f"{path}: external data file {tensor.location!r} is truncated: tensor {tensor.name!r} "
                f"needs bytes up to {end}, the file has {size}"
            )


def _undecodable_string(message: Message) -> str | None:
    """The path of the first string field of ``message`` (recursively) that is not valid UTF-8, or ``None``.

    Protobuf keeps such a proto2 string as ``bytes``; ``onnx_ir`` would fail on it only when writing the model.
    """
    for field, value in message.ListFields():
        values = value if field.is_repeated else [value]
        if field.type == field.TYPE_STRING:
            if any(isinstance(item, bytes) for item in values):
                return field.name
        elif field.type == field.TYPE_MESSAGE:
            for item in values:
                found = _undecodable_string(item)
                if found is not None:
                    return f"{field.name}.{found}"
    return None


def load_model(model: ModelLike) -> ir.Model:
    """Return ``model`` as an ``onnx_ir.Model`` (a path is loaded lazily; an ``ir.Model`` is returned as is).

    A ``ModelProto`` is wrapped without copying its tensors, and is not modified by later graph edits.

    Raises:
        ModelLoadError: the file is missing, unreadable, not an ONNX model, truncated or corrupt, or its
            external data is missing or too short.
        TypeError: ``model`` is none of the accepted types.
    """
    if isinstance(model, ir.Model):
        return model
    if isinstance(model, onnx.ModelProto):
        return ir.serde.deserialize_model(model)
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"expected a path, onnx.ModelProto or onnx_ir.Model, got {type(model).__name__}")
    path = Path(model)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if not path.is_file():
        raise ModelLoadError(f"{path}: not a regular file")
    try:
        proto = onnx.load(path, load_external_data=False)
    except OSError as err:
        raise ModelLoadError(f"{path}: cannot read the file ({err.strerror or err})") from err
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{path}: not an ONNX model, or the file is truncated or corrupt ({err})") from err
    if not proto.HasField("graph") or proto.ir_version <= 0:
        raise ModelLoadError(f"{path}: not an ONNX model (no graph or no IR version)")
    if not proto.opset_import:
        raise ModelLoadError(f"{path}: the model declares no opset (is the file truncated?)")
    bad_string = _undecodable_string(proto)
    if bad_string is not None:
        raise ModelLoadError(f"{path}: field {bad_string} is not valid UTF-8 (the file is corrupt)")
    try:
        loaded = ir.serde.deserialize_model(proto)
    except Exception as err:  # any inconsistency the deserializer finds in a file that parsed
        raise ModelLoadError(f"{path}: invalid ONNX model ({type(err).__name__}: {err})") from err
    ir.external_data.set_base_dir(loaded.graph, path.absolute().parent)
    _check_external_data(loaded, path)
    return loaded


def tensor_bytes(model: ir.Model) -> int:
    """Bytes of every initializer of every graph of ``model`` (what external data would hold)."""
    return sum(
        value.const_value.nbytes
        for graph in model.graphs()
        for value in graph.initializers.values()
        if value.const_value is not None
    )


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_model(
    model: ir.Model | onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
) -> None:
    """Write ``model`` to ``path`` atomically.

    Args:
        model: the model (an ``onnx_ir.Model`` is not modified, except that without external data the external
            initializers of its subgraphs are read into memory; those of the main graph are copied from their
            files into the new one, :func:`onnx_nf4.model.proto_writer.write_model`).
        path: the ``.onnx`` file to write; its directory must exist.
        external_data: ``True`` writes every initializer larger than 256 bytes to ``<file name>.data`` beside the
            model; ``False`` keeps everything inside the protobuf; ``None`` (default) chooses external data
            when the tensors exceed :data:`PROTOBUF_LIMIT_BYTES`.

    Raises:
        ValueError: ``external_data=False`` but the tensors do not fit in one protobuf.
        FileNotFoundError: the target directory does not exist.
    """
    ir_model = ir.serde.deserialize_model(model) if isinstance(model, onnx.ModelProto) else model
    target = Path(path).absolute()
    if not target.parent.is_dir():
        raise FileNotFoundError(f"cannot write {target}: directory {target.parent} does not exist")
    size = tensor_bytes(ir_model)
    if external_data is None:
        external_data = size > PROTOBUF_LIMIT_BYTES
    elif not external_data and size > PROTOBUF_LIMIT_BYTES:
        raise ValueError(
            f"the model's tensors take {size} bytes, more than a protobuf can hold; save it with external data"
        )
    data_name = target.name + ".data"
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        tmp_model = tmp_dir / target.name
        if external_data:
            ir.save(ir_model, tmp_model, external_data=data_name)
        else:
            # As load_to_model + ir.save, without a copy of the tensors or of the serialized model.
            write_model(ir_model, tmp_model, inline_external=True)
        written = [file for file in [tmp_dir / data_name] if external_data and file.exists()]
        for file in [*written, tmp_model]:
            _fsync(file)
        for file in written:  # the data first: the new model must never point at missing data
            os.replace(file, target.parent / file.name)
        os.replace(tmp_model, target)
        _fsync(target.parent)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
