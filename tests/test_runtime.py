"""Where ``onnx_nf4.custom_op_library()`` looks for the compiled library, and in which order."""

from __future__ import annotations

from pathlib import Path

import pytest

from onnx_nf4.runtime import library as runtime

NAME = runtime._library_file_name()


@pytest.fixture
def places(tmp_path, monkeypatch) -> dict[str, Path]:
    """Four empty candidate places; the environment variable unset."""
    paths = {key: tmp_path / key / NAME for key in ("package", "env", "dev", "distribution")}
    for path in paths.values():
        path.parent.mkdir()
    monkeypatch.setattr(runtime, "_PACKAGE_DIR", paths["package"].parent)
    monkeypatch.setattr(runtime, "_DEV_BUILD_DIR", paths["dev"].parent)
    monkeypatch.setattr(runtime, "_distribution_library", lambda name: paths["distribution"].parent / name)
    monkeypatch.delenv(runtime.LIBRARY_ENV_VAR, raising=False)
    return paths


@pytest.mark.parametrize("present", [["package", "env", "dev", "distribution"], ["env", "dev", "distribution"],
                                     ["dev", "distribution"], ["distribution"]])  # fmt: skip
def test_the_first_existing_place_wins(places, monkeypatch, present):
    for key in present:
        places[key].write_bytes(b"")
    monkeypatch.setenv(runtime.LIBRARY_ENV_VAR, str(places["env"]))
    assert Path(runtime.custom_op_library()) == places[present[0]].resolve()


def test_nothing_built_names_every_place_searched(places, monkeypatch):
    monkeypatch.setenv(runtime.LIBRARY_ENV_VAR, str(places["env"]))
    with pytest.raises(runtime.CustomOpLibraryNotFoundError) as err:
        runtime.custom_op_library()
    for path in places.values():
        assert str(path) in str(err.value)
