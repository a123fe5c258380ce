"""QuantizeOptions (validated once, immutable) and the passes' results (no state kept between calls)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import onnx_ir as ir
import pytest
from models import matmul_model, shared_weight_model

import onnx_nf4
from onnx_nf4 import DequantizeNF4Pass, QuantizeNF4Pass, QuantizeOptions, quantize_model
from onnx_nf4.passes.options import DEFAULT_MIN_ELEMENTS, FORMATS, METHODS


def test_defaults():
    options = QuantizeOptions()
    assert (options.block_size, options.double_quant, options.format) == (64, False, "onnx_nf4")
    assert (options.exclude, options.min_elements, options.external_data) == ((), DEFAULT_MIN_ELEMENTS, None)
    assert (options.accuracy_level, options.method) == (0, "rtn")
    assert FORMATS == ("onnx_nf4", "com.microsoft") and METHODS == ("rtn", "mse", "gptq")


def test_frozen_and_normalized():
    options = QuantizeOptions(exclude="lm_head", block_size=128.0, min_elements="0")  # type: ignore[arg-type]
    assert options.exclude == ("lm_head",) and options.block_size == 128 and options.min_elements == 0
    assert [p.pattern for p in options.patterns] == ["lm_head"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.block_size = 32  # type: ignore[misc]
    assert options.replace(block_size=32).block_size == 32 and options.block_size == 128
    assert hash(options) == hash(QuantizeOptions(exclude=["lm_head"], block_size=128, min_elements=0))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [  # block_size, format, double_quant, exclude and min_elements: tests/test_pass.py::test_invalid_settings
        ({"accuracy_level": 2}, r"accuracy_level must be one of \(0, 4\)"),
        ({"format": "com.microsoft", "accuracy_level": 4}, "accuracy_level is not supported by com.microsoft"),
        ({"method": "awq"}, "method must be one of"),
        ({"block_size": 48}, "block_size must be a power of two"),
    ],
)
def test_invalid_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantizeOptions(**kwargs)
    with pytest.raises(ValueError, match=message):
        QuantizeOptions().replace(**kwargs)  # a copy is validated again


def test_build_applies_only_given_settings():
    base = QuantizeOptions(block_size=32, double_quant=True)
    assert QuantizeOptions.build(base) is base
    assert QuantizeOptions.build(base, block_size=None, min_elements=0) == base.replace(min_elements=0)
    assert QuantizeOptions.build(None, format="com.microsoft").format == "com.microsoft"


def test_quantize_model_takes_options_and_keywords_override_them():
    model = matmul_model(128, 32)
    options = QuantizeOptions(block_size=32, min_elements=0)
    _, report = quantize_model(model, options=options)
    assert report.block_size == 32 and len(report.layers) == 1
    _, report = quantize_model(model, options=options, block_size=128)
    assert report.block_size == 128


def test_pass_takes_options_or_keywords_not_both():
    options = QuantizeOptions(min_elements=0)
    assert QuantizeNF4Pass(options).options is options
    assert QuantizeNF4Pass(min_elements=0).options == options
    with pytest.raises(TypeError, match="not both"):
        QuantizeNF4Pass(options, block_size=32)


def test_passes_report_through_their_results_only():
    ir_model = ir.serde.deserialize_model(shared_weight_model())
    quantize_pass = QuantizeNF4Pass(min_elements=0)
    first = quantize_pass(ir_model)
    assert first.modified and len(first.report.layers) == 2
    second = quantize_pass(ir_model)  # already NF4: the second call reports its own (empty) run
    assert not second.modified and not second.report.layers and len(first.report.layers) == 2
    dequantized = DequantizeNF4Pass()(ir_model)
    assert dequantized.modified and dequantized.layers == [layer.node for layer in first.report.layers]
    again = DequantizeNF4Pass()(ir_model)
    assert not again.modified and again.layers == []


def test_the_version_is_written_once():
    """pyproject.toml reads the version from onnx_nf4/version.py (scikit-build-core's regex provider)."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    root = Path(__file__).resolve().parents[1]
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    version = pyproject["tool"]["scikit-build"]["metadata"]["version"]
    assert version == {"provider": "scikit_build_core.metadata.regex", "input": "onnx_nf4/version.py"}
    text = (root / version["input"]).read_text()
    (found,) = re.findall(r"""__version__\s*=\s*['"]([^'"]+)['"]""", text)  # the provider's default regex
    assert found == onnx_nf4.__version__
