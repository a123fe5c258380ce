"""``OnnxNF4Quantization``: an Olive pass that runs :func:`onnx_nf4.quantize_model` on an ONNX model.

The knobs of Olive's ``OnnxBnb4Quantization`` (``precision``, ``quantized_modules``, ``nodes_to_exclude``, the
``quantization_config`` of a Hugging Face model's attributes) and every field of
:class:`onnx_nf4.QuantizeOptions` (block size, double quantization, format, exclude patterns, ``min_elements``,
``accuracy_level``, method, and any field added to it later: the pass's parameters are derived from the dataclass),
plus ``data_config`` (calibration data for ``method="gptq"``) and ``save_as_external_data``.

Olive's ONNX sessions (evaluation, ``prepare_session``) register no custom-op library but onnxruntime-extensions'
(olive-ai 0.13: ``get_ort_inference_session`` builds its own ``SessionOptions``; ``inference_settings`` has no
entry for a library and onnxruntime has no session config key that loads one). So the pass writes
``format="com.microsoft"`` (onnxruntime's ``MatMulBnb4``, the same NF4 codes) by default: a model every Olive
evaluator runs. ``format="onnx_nf4"`` (``MatMulNF4``: fused bias, double quantization, ``accuracy_level``, faster
kernels) writes a model that runs in onnxruntime with :func:`onnx_nf4.session_options`, outside Olive's evaluator.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from olive.common.config_utils import validate_config
from olive.constants import Precision
from olive.data.config import DataConfig
from olive.hardware import AcceleratorSpec
from olive.model import ONNXModelHandler
from olive.model.utils import resolve_onnx_path
from olive.passes import Pass
from olive.passes.pass_config import BasePassConfig, PassConfigParam
from olive.resource_path import LocalFile, LocalFolder

from ..api import quantize_model
from ..op.contract import MS_DOMAIN
from ..passes.options import QuantizeOptions

__all__ = ["PASS_DEFAULTS", "OnnxNF4Quantization"]

logger = logging.getLogger(__name__)

#: Pass defaults that differ from :class:`QuantizeOptions`' (see the module docstring).
PASS_DEFAULTS: dict[str, Any] = {"format": MS_DOMAIN}
#: QuantizeOptions fields the pass sets otherwise: ``external_data`` is ``save_as_external_data``.
_NOT_PASS_PARAMETERS = ("external_data",)
#: The op types whose node names ``quantized_modules`` / ``nodes_to_exclude`` select (those the quantizer rewrites).
_LINEAR_OPS = ("MatMul", "Gemm", "Attention")


def _field_descriptions() -> dict[str, str]:
    """The ``Attributes:`` entries of :class:`QuantizeOptions`' docstring, by field name (one source of truth)."""
    doc = QuantizeOptions.__doc__ or ""
    section = doc.split("Attributes:", 1)[-1]
    entries: dict[str, str] = {}
    name = None
    for line in section.splitlines():
        match = re.match(r"^ {8}(\w+): (.*)$", line)
        if match:
            name = match.group(1)
            entries[name] = match.group(2).strip()
        elif name and line.startswith(" " * 12):
            entries[name] += " " + line.strip()
    return entries


def _option_parameters() -> dict[str, PassConfigParam]:
    """One optional parameter per :class:`QuantizeOptions` field; ``None`` means the pass's default."""
    hints = typing.get_type_hints(QuantizeOptions)
    descriptions = _field_descriptions()
    params = {}
    for field in dataclasses.fields(QuantizeOptions):
        if field.name in _NOT_PASS_PARAMETERS:
            continue
        default = PASS_DEFAULTS.get(field.name, field.default)
        hint = hints[field.name]
        params[field.name] = PassConfigParam(
            type_=hint | None,
            default_value=None,
            description=f"{descriptions.get(field.name, field.name)} Default: {default!r}.",
        )
    return params


class OnnxNF4Quantization(Pass):
    """Quantize the MatMul / Gemm / fused Attention weights of an ONNX model to NF4 (onnx_nf4)."""

    @classmethod
    def _default_config(cls, accelerator_spec: AcceleratorSpec) -> dict[str, PassConfigParam]:
        return {
            "precision": PassConfigParam(
                type_=Precision | None,
                default_value=None,
                description="Only 'nf4' (the default; a model's quantization_config may say so too).",
            ),
            "quantized_modules": PassConfigParam(
                type_=list[str] | None,
                default_value=None,
                description=(
                    "Modules to quantize (as OnnxBnb4Quantization): a MatMul / Gemm node is quantized when its name "
                    "matches '.*[./]{module}[./](MatMul|Gemm)$'; fused Attention nodes match no module. Default: the "
                    "model attribute 'quantized_modules', else every layer."
                ),
            ),
            "nodes_to_exclude": PassConfigParam(
                type_=list[str] | None,
                default_value=None,
                description="Names of nodes to leave float (exact names; 'exclude' takes regular expressions).",
            ),
            **_option_parameters(),
            "data_config": PassConfigParam(
                type_=DataConfig | dict | None,
                default_value=None,
                description="Calibration data for method 'gptq': batches of the model's inputs.",
            ),
            "save_as_external_data": PassConfigParam(
                type_=bool | None,
                default_value=None,
                description=(
                    "Write the tensors to '<model file name>.data'. Default: only when they exceed the 2 GB a "
                    "protobuf holds."
                ),
            ),
        }

    @classmethod
    def validate_config(cls, config: type[BasePassConfig], accelerator_spec: AcceleratorSpec) -> bool:
        if not super().validate_config(config, accelerator_spec):
            return False
        return config.precision in (None, Precision.NF4)

    def _run_for_config(
        self, model: ONNXModelHandler, config: type[BasePassConfig], output_model_path: str
    ) -> ONNXModelHandler:
        output_path = Path(resolve_onnx_path(output_model_path, Path(model.model_path).name))
        options = build_options(config, model.model_attributes or {}, model.model_path)
        calibration = None
        if config.data_config is not None:
            calibration = calibration_batches(config.data_config, model.model_path)
        _, report = quantize_model(
            model.model_path, output_path, options, external_data=config.save_as_external_data, calibration=calibration
        )
        logger.info(
            "OnnxNF4Quantization: %d layer(s) in NF4 (%s), %d left float",
            len(report.layers),
            options.format,
            len(report.skipped),
        )
        for skipped in report.skipped:
            logger.debug("left float: %s %s: %s", skipped.op_type, skipped.node, skipped.reason)
        external = output_path.with_name(output_path.name + ".data").is_file()
        if external:
            return ONNXModelHandler(
                model_path=LocalFolder({"path": output_path.parent}),
                onnx_file_name=output_path.name,
                model_attributes=model.model_attributes,
            )
        return ONNXModelHandler(model_path=LocalFile({"path": output_path}), model_attributes=model.model_attributes)


def build_options(config: Any, attributes: dict[str, Any], model_path: str) -> QuantizeOptions:
    """The :class:`QuantizeOptions` of a pass config, completed from a Hugging Face ``quantization_config``.

    Raises:
        ValueError: the model's ``quantization_config`` asks for 8 bits or FP4, or a setting is invalid.
    """
    settings = {
        field.name: getattr(config, field.name)
        for field in dataclasses.fields(QuantizeOptions)
        if field.name not in _NOT_PASS_PARAMETERS
    }
    quant_config = attributes.get("quantization_config") or {}
    if quant_config.get("load_in_8bit"):
        raise ValueError("quantization_config has load_in_8bit: OnnxNF4Quantization writes 4-bit NF4 only")
    quant_type = quant_config.get("bnb_4bit_quant_type")
    if quant_type not in (None, "nf4"):
        raise ValueError(f"quantization_config has bnb_4bit_quant_type={quant_type!r}: only 'nf4' is supported")
    fmt = settings["format"] if settings["format"] is not None else PASS_DEFAULTS["format"]
    settings["format"] = fmt
    if settings["double_quant"] is None and quant_config.get("bnb_4bit_use_double_quant"):
        if fmt == MS_DOMAIN:
            logger.info("bnb_4bit_use_double_quant ignored: com.microsoft::MatMulBnb4 has no double quantization")
        else:
            settings["double_quant"] = True
    exclude = list(settings["exclude"] or ())
    excluded_names = list(config.nodes_to_exclude or [])
    modules = config.quantized_modules or attributes.get("quantized_modules")
    if modules:
        wanted = [re.compile(rf".*[./]{re.escape(module)}[./](MatMul|Gemm)$") for module in modules]
        excluded_names += [name for name in _linear_node_names(model_path) if not any(p.match(name) for p in wanted)]
    exclude += [f"^{re.escape(name)}$" for name in dict.fromkeys(excluded_names)]
    settings["exclude"] = exclude
    return QuantizeOptions.build(None, **settings)


def _linear_node_names(model_path: str) -> list[str]:
    """Names of the nodes the quantizer may rewrite, in every graph of the model (external data not read)."""
    model = onnx.load(model_path, load_external_data=False)
    names: list[str] = []

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            if node.op_type in _LINEAR_OPS:
                names.append(node.name)
            for attribute in node.attribute:
                for subgraph in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                    visit(subgraph)

    visit(model.graph)
    return names


def calibration_batches(
    data_config: DataConfig | dict, model_path: str
) -> Callable[[], Iterator[dict[str, np.ndarray]]]:
    """A callable returning the calibration feed dicts (numpy) of an Olive ``data_config``'s dataloader.

    A batch is ``(inputs, label)`` or ``inputs`` (Olive's ``extract_input_data``); ``inputs`` is a dict by input name,
    or one tensor / a sequence of tensors in the order of the model's graph inputs.
    """
    container = validate_config(data_config, DataConfig).to_data_container()
    model = onnx.load(model_path, load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    input_names = [value.name for value in model.graph.input if value.name not in initializers]

    def batches() -> Iterator[dict[str, np.ndarray]]:
        for batch in container.create_dataloader():
            data = batch[0] if isinstance(batch, (tuple, list)) and len(batch) == 2 else batch
            if isinstance(data, dict):
                yield {name: np.asarray(value) for name, value in data.items()}
                continue
            values = list(data) if isinstance(data, (tuple, list)) else [data]
            if len(values) != len(input_names):
                raise ValueError(
                    f"a calibration batch holds {len(values)} unnamed tensor(s) but the model has {len(input_names)} "
                    f"inputs {input_names}: give the batches as dicts by input name"
                )
            yield {name: np.asarray(value) for name, value in zip(input_names, values, strict=True)}

    return batches
