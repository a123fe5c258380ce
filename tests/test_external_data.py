"""Models with external data in and out, and the memory bound of quantizing one (a scaled-down large model).

The models come from ``tools/make_large_model.py`` (an LLM-like stack whose weights are generated straight into
the data file). The memory test runs the CLI in a subprocess and reads its kernel high-water mark
(``VmHWM``, which counts resident pages of memory-mapped weights too).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnx_nf4
from onnx_nf4 import quantize_model
from onnx_nf4.model.io import ModelLoadError, external_tensors

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tools"))
import make_large_model as generator  # noqa: E402
from peak_rss import cli_command, split_peak  # noqa: E402

#: The memory model: 10 layers of 768 x 2048 MLPs, vocabulary 8000: 285 MB of float32 in 52 weights, the
#: largest 24.6 MB.
MEMORY_MODEL = {"layers": 10, "hidden": 768, "ffn": 2048, "vocab": 8000}
SMALL_MODEL = {"layers": 2, "hidden": 128, "ffn": 256, "vocab": 512}


def peak_rss(*args: str | Path) -> int:
    """Peak RSS in bytes of ``onnx-nf4 quantize ARGS -q`` (fails if the command fails)."""
    cmd = cli_command("quantize", *map(str, args), "-q")
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return split_peak(proc.stderr)[1]


def initializer_arrays(path: Path) -> dict[str, np.ndarray]:
    model = ir.load(path)
    return {name: np.array(value.const_value.numpy()) for name, value in model.graph.initializers.items()}


def external_locations(path: Path) -> set[str]:
    return {str(tensor.location) for tensor in external_tensors(ir.load(path))}


@pytest.fixture(scope="module")
def small_models(tmp_path_factory) -> tuple[Path, Path]:
    """The same small model with one data file and with one data file per weight."""
    root = tmp_path_factory.mktemp("small")
    one = generator.make_large_model(root / "one" / "model.onnx", **SMALL_MODEL)
    many = generator.make_large_model(root / "many" / "model.onnx", per_tensor_files=True, **SMALL_MODEL)
    assert len(one.data_files) == 1 and len(many.data_files) == len(many.weights) > 1
    return one.model_path, many.model_path


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc/self/status")
def test_quantizing_streams_weight_by_weight(tmp_path):
    """Peak RSS of ``onnx-nf4 quantize --external-data`` on a 285 MB model stays far below the model size.

    Baseline: the same command on a tiny model (interpreter and imports, ~100 MB). A pass that keeps every weight
    (read, or mapped and touched) needs the whole 285 MB above that (310 MB measured with the unmapping disabled);
    the streaming pass holds one weight (at most 25 MB), the 4-bit output (33 MB) and chunk-sized temporaries, and
    the float embedding is copied file to file (84 MB above the baseline measured).
    """
    tiny = generator.make_large_model(tmp_path / "tiny" / "m.onnx", **SMALL_MODEL)
    big_dir = tmp_path / "big"
    big = generator.make_large_model(big_dir / "model.onnx", **MEMORY_MODEL)
    baseline = peak_rss(tiny.model_path, tmp_path / "tiny" / "out.onnx", "--external-data")
    peak = peak_rss(big.model_path, big_dir / "out.onnx", "--external-data")
    above = peak - baseline
    print(f"baseline {baseline / 1e6:.0f} MB, peak {peak / 1e6:.0f} MB, model {big.weight_bytes / 1e6:.0f} MB")
    assert above < 0.5 * big.weight_bytes, (
        f"peak RSS {peak / 1e6:.0f} MB is {above / 1e6:.0f} MB above the {baseline / 1e6:.0f} MB baseline for a "
        f"{big.weight_bytes / 1e6:.0f} MB model (largest weight {big.largest_weight_bytes / 1e6:.0f} MB)"
    )
    assert external_locations(big_dir / "out.onnx") == {"out.onnx.data"}


def test_one_file_and_many_files_give_the_same_model(small_models, tmp_path):
    one, many = small_models
    outputs = {}
    for name, source in (("one", one), ("many", many)):
        out = tmp_path / f"{name}.onnx"
        _, report = quantize_model(source, out, block_size=32, min_elements=0)
        assert len(report.layers) == 1 + 5 * SMALL_MODEL["layers"]  # every MatMul; the embedding feeds a Gather
        outputs[name] = initializer_arrays(out)
    assert outputs["one"].keys() == outputs["many"].keys()
    for key, value in outputs["one"].items():
        np.testing.assert_array_equal(value, outputs["many"][key], err_msg=key)


def test_inputs_are_left_untouched(small_models, tmp_path):
    one, many = small_models
    before = {p: p.read_bytes() for d in (one.parent, many.parent) for p in d.iterdir()}
    for source in (one, many):
        quantize_model(source, tmp_path / "out.onnx", min_elements=0, external_data=True)
    assert {p: p.read_bytes() for d in (one.parent, many.parent) for p in d.iterdir()} == before


@pytest.mark.parametrize(("external_data", "expected"), [(True, True), (False, False), (None, False)])
def test_external_data_on_request(small_models, tmp_path, external_data, expected):
    """``True``: one ``<out>.data`` beside the model; ``False`` and default (a model under 2 GB): all inline."""
    _, many = small_models
    out = tmp_path / "out.onnx"
    quantize_model(many, out, min_elements=0, external_data=external_data)
    names = {"out.onnx.data"} if expected else set()
    assert external_locations(out) == names
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"out.onnx", *names})


def test_a_returned_model_holds_every_tensor(small_models, tmp_path):
    """A returned protobuf holds every tensor, also the float embedding of an external-data input, so it can be
    written anywhere."""
    one, _ = small_models
    proto, _ = quantize_model(one, min_elements=0)  # returned as a protobuf: every tensor inline
    onnx.save(proto, tmp_path / "out.onnx")
    assert external_locations(tmp_path / "out.onnx") == set()
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]


def test_output_runs_and_matches_the_reference(small_models, tmp_path):
    """The external-data output computes what the reference op computes from the same NF4 tensors."""
    ort = pytest.importorskip("onnxruntime")
    from onnx.reference import ReferenceEvaluator

    from onnx_nf4.op.reference import MatMulNF4
    from onnx_nf4.runtime import CustomOpLibraryNotFoundError, session_options

    one, _ = small_models
    out = tmp_path / "out.onnx"
    quantize_model(one, out, min_elements=0, external_data=True)
    ids = np.random.default_rng(0).integers(0, SMALL_MODEL["vocab"], size=(2, 5), dtype=np.int64)
    ref = ReferenceEvaluator(str(out), new_ops=[MatMulNF4]).run(None, {"input_ids": ids})[0]
    try:
        options = session_options()
    except CustomOpLibraryNotFoundError as exc:
        pytest.skip(str(exc))
    y = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})[0]
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


def test_quantized_layers_equal_quantize_weight(small_models, tmp_path):
    one, _ = small_models
    out = tmp_path / "out.onnx"
    quantize_model(one, out, block_size=64, min_elements=0, external_data=True)
    model, source = ir.load(out), ir.load(one)
    for node in model.graph:
        if node.op_type != "MatMulNF4":
            continue
        weight_name = node.inputs[1].name.removesuffix("_nf4")
        q = onnx_nf4.quantize_weight(source.graph.initializers[weight_name].const_value.numpy(), 64)
        np.testing.assert_array_equal(node.inputs[1].const_value.numpy(), q.packed, err_msg=weight_name)
        np.testing.assert_array_equal(node.inputs[2].const_value.numpy(), q.absmax, err_msg=weight_name)


def test_missing_data_file_of_a_multi_file_model(small_models, tmp_path):
    _, many = small_models
    copy = tmp_path / "model.onnx"
    for path in many.parent.iterdir():
        if not path.name.endswith("mlp.up_proj.data") or "layers.1." not in path.name:
            (tmp_path / path.name).write_bytes(path.read_bytes())
    with pytest.raises(ModelLoadError, match=r"layers\.1\.mlp\.up_proj.*not found"):
        quantize_model(copy, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()
