"""The public entry points: :func:`quantize_model` and its debugging inverse :func:`dequantize_model`.

Each is load -> pass -> save: :func:`onnx_nf4.model.io.load_model`, then :class:`~onnx_nf4.passes.QuantizeNF4Pass`
or :class:`~onnx_nf4.passes.DequantizeNF4Pass`, then :func:`onnx_nf4.model.io.save_model` or a protobuf.

Return convention of both: ``(model, report)`` / ``model`` where ``model`` is an ``onnx.ModelProto`` when no
``output_path`` is given, and ``None`` when it is (the model is then written there, atomically, with external
data when it exceeds 2 GB; a model that large could not be returned as one protobuf anyway, and not building the
protobuf saves a copy of every weight). A returned protobuf holds every tensor itself, also those of an input with
external data. The input is never modified: a path is read lazily, a ``ModelProto`` is left as it was, and
``output_path`` may be the input path.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from typing import Any

import onnx
import onnx_ir as ir

from .codec.layout import QuantizedWeight
from .methods import check_calibration
from .methods.calibration import CalibrationData
from .model.io import PROTOBUF_LIMIT_BYTES, ModelLike, load_model, save_model, tensor_bytes
from .passes import DequantizeNF4Pass, DequantizeResult, ProgressCallback, QuantizeNF4Pass
from .passes.options import QuantizeOptions
from .passes.report import QuantizationReport

__all__ = ["dequantize", "dequantize_model", "quantize_model"]


def _check_output(output_path: str | os.PathLike[str] | None, external_data: bool | None) -> None:
    if output_path is None and external_data is not None:
        raise ValueError("external_data applies to a written model: give output_path too")


def _finish(
    model: ir.Model, output_path: str | os.PathLike[str] | None, external_data: bool | None
) -> onnx.ModelProto | None:
    if output_path is None:
        ir.external_data.load_to_model(model)  # self-contained: no reference to the input's data files
        return ir.serde.serialize_model(model)
    save_model(model, output_path, external_data=external_data)
    return None


def quantize_model(
    model_or_path: ModelLike,
    output_path: str | os.PathLike[str] | None = None,
    options: QuantizeOptions | None = None,
    *,
    block_size: int | None = None,
    double_quant: bool | None = None,
    format: str | None = None,
    exclude: Iterable[str] | None = None,
    min_elements: int | None = None,
    embedding_min_rows: int | None = None,
    embedding_block_size: int | None = None,
    external_data: bool | None = None,
    accuracy_level: int | None = None,
    method: str | None = None,
    calibration: CalibrationData | None = None,
    calibration_passes: int | None = None,
    on_progress: ProgressCallback | None = None,
    prequantized: Mapping[str, QuantizedWeight] | None = None,
) -> tuple[onnx.ModelProto | None, QuantizationReport]:
    """Rewrite the float ``MatMul`` / ``Gemm`` weights of a model to NF4 (see :mod:`onnx_nf4.passes.quantize`).

    Args:
        model_or_path: an ONNX file, an ``onnx.ModelProto`` or an ``onnx_ir.Model`` (an ``ir.Model`` is
            rewritten in place; the others are not modified).
        output_path: where to write the result; ``None`` returns it instead.
        options: the :class:`~onnx_nf4.QuantizeOptions` (default: ``QuantizeOptions()``). The keyword
            arguments below override its fields; ``None`` leaves a field as it is.
        block_size: elements per absmax block (a power of two in [16, 4096]; default 64).
        double_quant: 8-bit quantize the absmax too (bitsandbytes' ``compress_statistics``).
        format: ``"onnx_nf4"`` (``onnx_nf4::MatMulNF4``, default) or ``"com.microsoft"`` (``MatMulBnb4``).
        exclude: regular expressions searched in node names and weight names; matches stay float.
        min_elements: weights with fewer elements stay float (default 4096, see
            :data:`onnx_nf4.passes.options.DEFAULT_MIN_ELEMENTS`).
        embedding_min_rows: embedding tables (constant ``Gather`` data) with at least this many rows become NF4
            lookups (default 16384: vocabularies, not position tables, see
            :data:`onnx_nf4.passes.options.DEFAULT_EMBEDDING_MIN_ROWS`); a table tied to a quantized weight is
            taken whatever its rows.
        embedding_block_size: the block size of embedding tables and of the weights tied to them (default
            ``min(block_size, 32)``, see :data:`onnx_nf4.passes.options.DEFAULT_EMBEDDING_BLOCK_SIZE`).
        external_data: with ``output_path``: ``True`` writes the tensors to ``<output file name>.data``,
            ``False`` keeps them in the protobuf, ``None`` (default) chooses external data when the input's or the
            output's tensors exceed 2 GB (writing a large input's NF4 output as one protobuf would need several
            copies of it in memory).
        accuracy_level: the ``MatMulNF4`` ``accuracy_level`` attribute: 0 (default, float32 compute) or 4 (the
            CPU kernels may quantize the activations to int8).
        on_progress: ``on_progress(done, total, layer)``, called after each distinct weight (``layer``: the first
            node that uses it, named as in the report).
            With ``method="gptq"`` the calibrated weights are reported first, then every weight again as written.
        method: how codes and block scales are chosen (:mod:`onnx_nf4.methods`; the output format is the same):
            ``"rtn"`` (default: round to nearest at the absmax, byte for byte onnxruntime's quantizer) or
            ``"gptq"`` (codes with error feedback on each layer's input statistics; needs ``calibration``).
        calibration: ``method="gptq"`` only: the model's inputs, as a path to an ``.npz`` file (arrays named after
            the graph inputs, one batch), a sequence of feed dicts, or a callable returning an iterable of feed
            dicts (:mod:`onnx_nf4.methods.calibration`). Rows where an ``attention_mask`` input is 0 are left out.
        calibration_passes: ``method="gptq"``: ``None`` (default) runs the model over the calibration data once
            per wave of layers; a number merges the waves into about that many runs (deep models, see
            :func:`onnx_nf4.methods.calibrated.quantize_with_calibration`).
        prequantized: NF4 weights to insert as given, keyed by weight initializer name.

    Returns:
        ``(model, report)``: the rewritten ``ModelProto`` (``None`` when ``output_path`` is given) and the
        :class:`~onnx_nf4.passes.report.QuantizationReport` listing every rewritten and skipped node.

    Raises:
        onnx_nf4.model.io.ModelLoadError: the input file cannot be read as an ONNX model.
        ValueError: invalid settings, or a ``prequantized`` weight that does not fit its node.
    """
    given: dict[str, Any] = {
        "block_size": block_size,
        "double_quant": double_quant,
        "format": format,
        "exclude": exclude,
        "min_elements": min_elements,
        "embedding_min_rows": embedding_min_rows,
        "embedding_block_size": embedding_block_size,
        "external_data": external_data,
        "accuracy_level": accuracy_level,
        "method": method,
    }
    options = QuantizeOptions.build(options, **given)
    _check_output(output_path, options.external_data)
    check_calibration(options.method, calibration, expected="calibration=...")
    model = load_model(model_or_path)
    external = options.external_data
    if external is None and output_path is not None and tensor_bytes(model) > PROTOBUF_LIMIT_BYTES:
        external = True  # decided on the input: the output is smaller, but was as large while being built
    quantize = QuantizeNF4Pass(options, on_progress=on_progress, prequantized=prequantized)
    output_errors: dict[str, float] = {}
    if calibration is not None:
        calibrated, output_errors = _gptq_weights(model, quantize, calibration, calibration_passes, on_progress)
        quantize.prequantized = {**calibrated, **quantize.prequantized}
    report = quantize(model).report
    if output_errors:
        report.layers = [
            dataclasses.replace(layer, output_error=output_errors.get(layer.weight)) for layer in report.layers
        ]
    return _finish(model, output_path, external), report


def _gptq_weights(
    model: ir.Model,
    quantize: QuantizeNF4Pass,
    calibration: CalibrationData,
    passes: int | None,
    on_progress: ProgressCallback | None,
) -> tuple[dict[str, QuantizedWeight], dict[str, float]]:
    """GPTQ weights for ``quantize.prequantized``, and their output errors, keyed by weight name.

    Only the main-graph weights that the pass will rewrite, in one orientation, that the caller did not
    prequantize, that no other node reads (a tied embedding table: its NF4 tensors also serve the lookup, at the
    table block size, so they keep the data-free choice) and (``com.microsoft``) whose K is a multiple of the block
    size; the pass gives any other weight the scale search alone (:data:`onnx_nf4.methods.SCALE_SEARCH`).
    """
    from .methods.calibrated import find_layers, quantize_with_calibration, weights_with_other_uses

    options = quantize.options
    planned = quantize.planned_weights(model)
    uses: dict[str, int] = {}
    for name, *_ in planned:
        uses[name] = uses.get(name, 0) + 1
    tied = weights_with_other_uses(model, set(uses))
    keys = [
        (name, transpose)
        for name, transpose, K, _ in planned
        if uses[name] == 1
        and name not in tied
        and name not in quantize.prequantized
        and (options.format == "onnx_nf4" or K % options.block_size == 0)
    ]
    results = quantize_with_calibration(
        model,
        find_layers(model, keys),
        calibration,
        block_size=options.block_size,
        double_quant=options.double_quant,
        scales_in_weight_dtype=options.format != "onnx_nf4",  # MatMulBnb4 stores the absmax in T
        passes=passes,
        on_progress=on_progress,
    )
    return (
        {name: result.q for (name, _), result in results.items()},
        {name: result.output_error for (name, _), result in results.items()},
    )


def dequantize(
    model_or_path: ModelLike,
    output_path: str | os.PathLike[str] | None = None,
    *,
    external_data: bool | None = None,
) -> tuple[onnx.ModelProto | None, DequantizeResult]:
    """:func:`dequantize_model`, also returning the :class:`~onnx_nf4.passes.DequantizeResult` (which nodes were
    replaced; none for a float model)."""
    _check_output(output_path, external_data)
    model = load_model(model_or_path)
    result = DequantizeNF4Pass()(model)
    return _finish(model, output_path, external_data), result


def dequantize_model(
    model_or_path: ModelLike,
    output_path: str | os.PathLike[str] | None = None,
    *,
    external_data: bool | None = None,
) -> onnx.ModelProto | None:
    """Replace every ``MatMulNF4`` / ``MatMulBnb4`` node by a float ``MatMul`` (+ ``Add`` of its bias).

    See :mod:`onnx_nf4.passes.dequantize`. A debugging aid: the result computes what the quantized model computes,
    with float kernels. Returns the ``ModelProto``, or ``None`` after writing it to ``output_path``
    (``external_data`` as for :func:`quantize_model`).

    Raises:
        onnx_nf4.model.io.ModelLoadError: the input file cannot be read as an ONNX model.
        ValueError: a node that breaks the op's contract (the message names it).
    """
    model, _ = dequantize(model_or_path, output_path, external_data=external_data)
    return model
