"""``tests/data/nf4_vectors.npz`` is what ``tools/make_oracle_vectors.py`` writes with the installed bitsandbytes and
onnxruntime, byte for byte, and the script's ``--check`` names what differs when it is not."""

from __future__ import annotations

import importlib.util
import io
import json

import numpy as np
import pytest
from oracle_vectors import ORACLE_FILE, REPO_ROOT

pytest.importorskip("bitsandbytes")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("make_oracle_vectors", REPO_ROOT / "tools" / "make_oracle_vectors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def written(script) -> bytes:
    """The bytes the script writes now."""
    return script.npz_bytes(script.build_arrays(script.DEFAULT_SEED))


def test_committed_file_is_what_the_script_writes(written):
    assert written == ORACLE_FILE.read_bytes()


def test_check_passes_on_the_committed_file(script, capsys):
    assert script.main(["--check"]) == 0
    assert "byte for byte" in capsys.readouterr().out


def test_check_names_the_array_that_differs(script, written, tmp_path, capsys):
    with np.load(io.BytesIO(written)) as z:
        arrays = {key: z[key] for key in z.files}
    arrays["randn_f32_384x512__ort64__packed"] = arrays["randn_f32_384x512__ort64__packed"] ^ np.uint8(1)
    stale = tmp_path / "stale.npz"
    stale.write_bytes(script.npz_bytes(arrays))
    assert script.main(["--check", "--out", str(stale)]) == 1
    assert "arrays that differ: randn_f32_384x512__ort64__packed" in capsys.readouterr().err


def test_writing_is_deterministic_and_loads_without_pickle(script, written, tmp_path):
    out = tmp_path / "again.npz"
    assert script.main(["--out", str(out)]) == 0
    assert out.read_bytes() == written
    with np.load(out, allow_pickle=False) as z:
        meta = json.loads(str(z["meta_json"]))
        assert len(meta["cases"]) == 23 and meta["block_sizes"] == [64, 128]
