"""The Olive pass ``OnnxNF4Quantization`` (onnx_nf4.olive): package config, options, and ``olive run`` on MiniLM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

import onnx_nf4
from onnx_nf4.olive import PASS_CONFIG_PATH, PASS_TYPE

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_onnx_nf4_and_its_olive_package_do_not_import_olive() -> None:
    code = "import sys, onnx_nf4, onnx_nf4.olive, onnx_nf4.cli; assert 'olive' not in sys.modules, 'olive imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=120)


def test_the_shipped_pass_config_names_the_pass_module() -> None:
    passes = json.loads(PASS_CONFIG_PATH.read_text())["passes"]
    assert list(passes) == [PASS_TYPE]
    assert passes[PASS_TYPE]["module_path"] == "onnx_nf4.olive.quantization.OnnxNF4Quantization"


olive = pytest.importorskip("olive")

from onnx_nf4.olive.quantization import OnnxNF4Quantization, build_options  # noqa: E402


def package_config(cache: Path) -> Path:
    """What ``python -m onnx_nf4.olive --package-config`` prints (the file written under ``cache``)."""
    proc = subprocess.run([sys.executable, "-m", "onnx_nf4.olive", "--package-config"], cwd=REPO_ROOT,
                          env={**os.environ, "XDG_CACHE_HOME": str(cache)},
                          capture_output=True, text=True, check=True, timeout=120)  # fmt: skip
    return Path(proc.stdout.strip())


def test_package_config_holds_olives_passes_and_this_one(tmp_path: Path) -> None:
    from olive.package_config import OlivePackageConfig

    path = package_config(tmp_path)
    assert path.parent == tmp_path / "onnx_nf4" / "olive"
    config = OlivePackageConfig.parse_file_or_obj(str(path))
    assert config.import_pass_module(PASS_TYPE) is OnnxNF4Quantization
    assert set(OlivePackageConfig.load_default_config().passes) < set(config.passes)  # conversion, optimizer, ...
    assert package_config(tmp_path) == path  # written once per content


def pass_config(**given):
    """A stand-in for Olive's validated pass config: every parameter, unset ones ``None``."""
    from olive.hardware import DEFAULT_CPU_ACCELERATOR

    names = OnnxNF4Quantization._default_config(DEFAULT_CPU_ACCELERATOR)
    unknown = set(given) - set(names)
    assert not unknown, unknown
    return SimpleNamespace(**{name: given.get(name) for name in names})


def test_every_quantize_option_but_external_data_is_a_pass_parameter() -> None:
    import dataclasses

    from olive.hardware import DEFAULT_CPU_ACCELERATOR

    params = OnnxNF4Quantization._default_config(DEFAULT_CPU_ACCELERATOR)
    fields = {field.name for field in dataclasses.fields(onnx_nf4.QuantizeOptions)} - {"external_data"}
    assert fields <= set(params)
    assert "Default: 64." in params["block_size"].description
    assert "Default: 'com.microsoft'." in params["format"].description


def linear_model(path: Path) -> Path:
    """Two MatMul nodes named like a Hugging Face export: .../q_proj/MatMul and .../lm_head/MatMul."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), f"w{i}") for i in range(2)]
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h"], name="/model/layers.0/attn/q_proj/MatMul"),
        helper.make_node("MatMul", ["h", "w1"], ["y"], name="/lm_head/MatMul"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], w)  # fmt: skip
    onnx.save(helper.make_model(graph), path)
    return path


def test_quantized_modules_and_nodes_to_exclude_select_nodes(tmp_path: Path) -> None:
    path = str(linear_model(tmp_path / "m.onnx"))
    only_q = build_options(pass_config(quantized_modules=["q_proj"], min_elements=0), {}, path)
    _, report = onnx_nf4.quantize_model(path, options=only_q)
    assert [layer.node for layer in report.layers] == ["/model/layers.0/attn/q_proj/MatMul"]
    from_attributes = build_options(pass_config(min_elements=0), {"quantized_modules": ["lm_head"]}, path)
    _, report = onnx_nf4.quantize_model(path, options=from_attributes)
    assert [layer.node for layer in report.layers] == ["/lm_head/MatMul"]
    excluded = build_options(pass_config(nodes_to_exclude=["/lm_head/MatMul"], min_elements=0), {}, path)
    _, report = onnx_nf4.quantize_model(path, options=excluded)
    assert [layer.node for layer in report.layers] == ["/model/layers.0/attn/q_proj/MatMul"]
    assert report.format == "com.microsoft"  # the pass's default: a model Olive's sessions can run


def test_a_hugging_face_quantization_config_is_read(tmp_path: Path) -> None:
    path = str(linear_model(tmp_path / "m.onnx"))
    bnb = {"quantization_config": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                   "bnb_4bit_use_double_quant": True}}  # fmt: skip
    assert build_options(pass_config(format="onnx_nf4"), bnb, path).double_quant
    assert not build_options(pass_config(format="onnx_nf4", double_quant=False), bnb, path).double_quant
    assert not build_options(pass_config(), bnb, path).double_quant  # MatMulBnb4 has none: logged, not applied
    with pytest.raises(ValueError, match="fp4"):
        build_options(pass_config(), {"quantization_config": {"bnb_4bit_quant_type": "fp4"}}, path)
    with pytest.raises(ValueError, match="load_in_8bit"):
        build_options(pass_config(), {"quantization_config": {"load_in_8bit": True}}, path)
    with pytest.raises(ValueError, match="block_size"):
        build_options(pass_config(block_size=48), {}, path)


def test_olive_run_quantizes_minilm_and_evaluates_it(minilm, minilm_fp32_path: Path, minilm_inputs, tmp_path):
    """``olive run --config run.json --package-config "$(python -m onnx_nf4.olive --package-config)"`` with the
    pass and a latency metric: Olive's own evaluator loads and runs the quantized model."""
    names = list(minilm.INPUT_NAMES)
    run = {
        "input_model": {"type": "ONNXModel", "model_path": str(minilm_fp32_path)},
        "systems": {
            "local": {
                "type": "LocalSystem",
                "accelerators": [{"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}],
            }
        },
        "data_configs": [
            {
                "name": "tokens",
                "type": "DummyDataContainer",
                "load_dataset_config": {
                    "input_shapes": [[1, 16]] * 2,
                    "input_names": names,
                    "input_types": ["int64"] * 2,
                },
            }
        ],
        # "type" set: olive-ai 0.13 fails on an evaluator config without one ('NoneType' has no attribute 'lower').
        "evaluators": {
            "latency": {
                "type": "OnnxEvaluator",
                "metrics": [
                    {"name": "latency", "type": "latency", "sub_types": [{"name": "avg"}], "data_config": "tokens"}
                ],
            }
        },
        "evaluator": "latency",
        "passes": {"nf4": {"type": PASS_TYPE, "block_size": 64}},
        "host": "local",
        "target": "local",
        "output_dir": str(tmp_path / "out"),
        "cache_dir": str(tmp_path / "cache"),
    }
    config = tmp_path / "run.json"
    config.write_text(json.dumps(run))
    olive_cli = [
        sys.executable,
        "-m",
        "olive",
        "run",
        "--config",
        str(config),
        "--package-config",
        str(package_config(tmp_path)),
    ]
    proc = subprocess.run(olive_cli, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    footprint = json.loads((tmp_path / "out" / "footprint.json").read_text())
    latencies = [node["metrics"]["value"]["latency-avg"]["value"] for node in footprint.values() if node["metrics"]]
    assert len(latencies) == 2 and all(value > 0 for value in latencies)  # the input model and the quantized one

    output = tmp_path / "out" / "model.onnx"
    model = onnx.load(output)
    assert sum(node.op_type == "MatMulBnb4" for node in model.graph.node) == 36
    expected, _ = onnx_nf4.quantize_model(minilm_fp32_path, format="com.microsoft")
    ours = {init.name: init.raw_data for init in model.graph.initializer}
    assert ours == {init.name: init.raw_data for init in expected.graph.initializer}


def test_gptq_reads_its_calibration_batches_from_an_olive_data_config(tmp_path: Path) -> None:
    from onnx_nf4.olive.quantization import calibration_batches

    path = str(linear_model(tmp_path / "m.onnx"))
    data_config = {"name": "x", "type": "DummyDataContainer", "load_dataset_config": {
        "input_shapes": [[1, 64]], "input_names": ["x"], "input_types": ["float32"]}}  # fmt: skip
    batches = calibration_batches(data_config, path)
    feeds = list(batches())
    assert feeds and all(set(f) == {"x"} and f["x"].shape == (1, 64) and f["x"].dtype == np.float32 for f in feeds)
    options = build_options(pass_config(method="gptq", min_elements=0), {}, path)
    _, report = onnx_nf4.quantize_model(path, options=options, calibration=batches)
    assert len(report.layers) == 2 and all(layer.output_error is not None for layer in report.layers)
