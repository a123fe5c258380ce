"""Loading with clear errors and atomic saving (external data included)."""

from __future__ import annotations

import os
import re

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from models import matmul_model
from onnx import numpy_helper

from onnx_nf4.model import io as model_io
from onnx_nf4.model.io import ModelLoadError, load_model, save_model


@pytest.fixture
def model_file(tmp_path):
    model = matmul_model(256, 128)
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path, model


def weight_of(model: ir.Model) -> np.ndarray:
    return model.graph.initializers["W"].const_value.numpy()


def test_load_accepts_paths_protos_and_ir_models(model_file):
    path, proto = model_file
    expected = numpy_helper.to_array(proto.graph.initializer[0])
    for source in (path, str(path), proto):
        np.testing.assert_array_equal(weight_of(load_model(source)), expected)
    ir_model = load_model(path)
    assert load_model(ir_model) is ir_model
    with pytest.raises(TypeError, match="expected a path"):
        load_model(42)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (lambda data: data[: len(data) // 2], "truncated or corrupt"),
        (lambda data: data[:-3], "truncated or corrupt"),
        (lambda data: bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8)), "truncated or corrupt"),
        (lambda data: b"", "not an ONNX model (no graph or no IR version)"),
        (lambda data: b"this is a text file, not a model\n", "truncated or corrupt"),
    ],
    ids=["half", "last-bytes-cut", "garbage", "empty", "text"],
)
def test_load_rejects_bad_files(model_file, content, message):
    path, proto = model_file
    path.write_bytes(content(proto.SerializeToString()))
    with pytest.raises(ModelLoadError, match=re.escape(message)) as info:
        load_model(path)
    assert str(path) in str(info.value)


def test_load_rejects_a_file_cut_after_the_graph(model_file):
    path, proto = model_file
    cut = onnx.ModelProto()
    cut.CopyFrom(proto)
    del cut.opset_import[:]
    path.write_bytes(cut.SerializeToString())
    with pytest.raises(ModelLoadError, match="declares no opset"):
        load_model(path)


def test_load_rejects_missing_paths_and_directories(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        load_model(tmp_path / "absent.onnx")
    with pytest.raises(ModelLoadError, match="not a regular file"):
        load_model(tmp_path)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a non-root POSIX user")
def test_load_rejects_an_unreadable_file(model_file):
    path, _ = model_file
    path.chmod(0)
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_model(path)


def test_external_data_missing_or_truncated(model_file, tmp_path):
    path, _ = model_file
    save_model(load_model(path), tmp_path / "ext.onnx", external_data=True)
    data = tmp_path / "ext.onnx.data"
    assert data.stat().st_size == 256 * 128 * 4
    os.truncate(data, 100)
    with pytest.raises(
        ModelLoadError, match=re.escape("'ext.onnx.data' is truncated: tensor 'W' needs bytes up to 131072")
    ):
        load_model(tmp_path / "ext.onnx")
    data.unlink()
    with pytest.raises(ModelLoadError, match=re.escape("external data file 'ext.onnx.data' of tensor 'W' not found")):
        load_model(tmp_path / "ext.onnx")


def test_save_roundtrip_inline_and_no_temporary_left(model_file, tmp_path):
    path, proto = model_file
    out = tmp_path / "out.onnx"
    save_model(load_model(path), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "out.onnx"]
    np.testing.assert_array_equal(weight_of(load_model(out)), numpy_helper.to_array(proto.graph.initializer[0]))
    save_model(proto, out)  # a ModelProto is accepted too
    onnx.checker.check_model(str(out), full_check=True)


def test_save_over_the_source_with_external_data(model_file, tmp_path):
    path, proto = model_file
    expected = numpy_helper.to_array(proto.graph.initializer[0])
    ext = tmp_path / "ext.onnx"
    save_model(load_model(path), ext, external_data=True)
    loaded = load_model(ext)
    assert isinstance(loaded.graph.initializers["W"].const_value, ir.ExternalTensor)
    save_model(loaded, ext, external_data=True)  # rewrites the data file the model is mapped from
    np.testing.assert_array_equal(weight_of(loaded), expected)
    np.testing.assert_array_equal(weight_of(load_model(ext)), expected)
    save_model(load_model(ext), ext, external_data=False)  # back inline, over itself
    np.testing.assert_array_equal(weight_of(load_model(ext)), expected)
    assert not isinstance(load_model(ext).graph.initializers["W"].const_value, ir.ExternalTensor)


def test_external_data_chosen_automatically_above_the_limit(model_file, tmp_path, monkeypatch):
    path, _ = model_file
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT_BYTES", 1000)
    save_model(load_model(path), tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").exists()
    with pytest.raises(ValueError, match="more than a protobuf can hold"):
        save_model(load_model(path), tmp_path / "inline.onnx", external_data=False)
    assert not (tmp_path / "inline.onnx").exists()


def test_a_failed_save_leaves_the_target_intact(model_file, monkeypatch):
    path, _ = model_file
    before = path.read_bytes()

    def failing_save(model, target, **kwargs):
        with open(target, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ir, "save", failing_save)
    monkeypatch.setattr(model_io, "write_model", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_model(load_model(path), path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["model.onnx"]


def test_save_into_a_missing_directory(model_file, tmp_path):
    path, _ = model_file
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_model(load_model(path), tmp_path / "absent" / "out.onnx")
