"""The public entry points: :func:`quantize_model` and its debugging inverse :func:`dequantize_model`.

Return convention of both: ``(model, report)`` / ``model`` where ``model`` is an ``onnx.ModelProto`` when no
``output_path`` is given, and ``None`` when it is (the model is then written there, atomically, with external
data when it exceeds 2 GB; a model that large could not be returned as one protobuf anyway, and not building the
protobuf saves a copy of every weight). A returned protobuf holds every
tensor itself, also those of an input with external data. The input is never modified: a path is read lazily, a
``ModelProto`` is left as it was, and ``output_path`` may be the input path.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from .calibration import CalibrationData
from .codec import check_block_size, dequantize_blockwise, is_valid_nested_block_size
from .double_quant import NestedAbsmax
from .layout import QuantizedWeight, dequantize_weight
from .methods import check_method
from .model_io import PROTOBUF_LIMIT_BYTES, ModelLike, load_model, save_model, tensor_bytes
from .passes import DEFAULT_MIN_ELEMENTS, ProgressCallback, QuantizeNF4Pass, UniqueNames, remove_unused_initializers
from .report import QuantizationReport
from .schema import DOMAIN, MS_DOMAIN, OP_TYPE

__all__ = ["dequantize_model", "quantize_model"]


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
    *,
    block_size: int = 64,
    double_quant: bool = False,
    format: str = "onnx_nf4",
    exclude: Iterable[str] = (),
    min_elements: int = DEFAULT_MIN_ELEMENTS,
    on_progress: ProgressCallback | None = None,
    prequantized: Mapping[str, QuantizedWeight] | None = None,
    external_data: bool | None = None,
    method: str = "rtn",
    calibration: CalibrationData | None = None,
) -> tuple[onnx.ModelProto | None, QuantizationReport]:
    """Rewrite the float ``MatMul`` / ``Gemm`` weights of a model to NF4 (see :mod:`onnx_nf4.passes`).

    Args:
        model_or_path: an ONNX file, an ``onnx.ModelProto`` or an ``onnx_ir.Model`` (an ``ir.Model`` is
            rewritten in place; the others are not modified).
        output_path: where to write the result; ``None`` returns it instead.
        block_size: elements per absmax block (a power of two in [16, 4096]).
        double_quant: 8-bit quantize the absmax too (bitsandbytes' ``compress_statistics``).
        format: ``"onnx_nf4"`` (``onnx_nf4::MatMulNF4``) or ``"com.microsoft"`` (onnxruntime's ``MatMulBnb4``).
        exclude: regular expressions searched in node names and weight names; matches stay float.
        min_elements: weights with fewer elements stay float (default 4096, see
            :data:`onnx_nf4.passes.DEFAULT_MIN_ELEMENTS`).
        on_progress: ``on_progress(done, total, weight_name)``, called after each distinct weight.
        prequantized: NF4 weights to insert as given, keyed by weight initializer name.
        external_data: with ``output_path``: ``True`` writes the tensors to ``<output file name>.data``,
            ``False`` keeps them in the protobuf, ``None`` (default) chooses external data when the input's or the
            output's tensors exceed 2 GB (writing a large input's NF4 output as one protobuf would need several
            copies of it in memory).
        method: how codes and block scales are chosen (:mod:`onnx_nf4.methods`; the format is the same):
            ``"rtn"`` (default: round to nearest at the absmax, byte for byte onnxruntime's quantizer),
            ``"mse"`` (data-free: per block, the scale minimizing its squared error) or ``"gptq"`` (codes with
            error feedback on the layers' input statistics; needs ``calibration``).
        calibration: ``method="gptq"`` only: the model's inputs, as a path to an ``.npz`` file (arrays named after
            the graph inputs), a sequence of feed dicts, or a callable returning an iterable of feed dicts
            (:mod:`onnx_nf4.calibration`). Rows where an ``attention_mask`` input is 0 are left out.

    Returns:
        ``(model, report)``: the rewritten ``ModelProto`` (``None`` when ``output_path`` is given) and the
        :class:`~onnx_nf4.report.QuantizationReport` listing every rewritten and skipped node.

    Raises:
        onnx_nf4.model_io.ModelLoadError: the input file cannot be read as an ONNX model.
        ValueError: invalid settings, or a ``prequantized`` weight that does not fit its node, or calibration
            data that does not fit the model.
    """
    _check_output(output_path, external_data)
    check_method(method)
    if method == "gptq" and calibration is None:
        raise ValueError("method 'gptq' needs calibration data (calibration=...)")
    if method != "gptq" and calibration is not None:
        raise ValueError(f"calibration data is used by method 'gptq' only, not by {method!r}")
    quantize = QuantizeNF4Pass(
        block_size=block_size,
        double_quant=double_quant,
        format=format,
        exclude=exclude,
        min_elements=min_elements,
        on_progress=on_progress,
        prequantized=prequantized,
        method=method,
    )
    model = load_model(model_or_path)
    if external_data is None and output_path is not None and tensor_bytes(model) > PROTOBUF_LIMIT_BYTES:
        external_data = True
    output_errors: dict[str, float] = {}
    if method == "gptq":
        assert calibration is not None
        calibrated, output_errors = _gptq_weights(model, quantize, calibration, on_progress)
        quantize.prequantized = {**calibrated, **quantize.prequantized}
    quantize(model)
    report = quantize.report
    assert report is not None
    if output_errors:
        report.layers = [
            dataclasses.replace(layer, output_error=output_errors.get(layer.weight)) for layer in report.layers
        ]
    return _finish(model, output_path, external_data), report


def _gptq_weights(
    model: ir.Model,
    quantize: QuantizeNF4Pass,
    calibration: CalibrationData,
    on_progress: ProgressCallback | None,
) -> tuple[dict[str, QuantizedWeight], dict[str, float]]:
    """GPTQ weights for ``quantize.prequantized``, and their output errors, keyed by weight name.

    Only weights of the main graph that the pass will rewrite, used in one orientation, that the caller did not
    prequantize, and (``com.microsoft``) whose K is a multiple of the block size; the pass quantizes any other
    weight with ``mse``.
    """
    from .methods.calibrated import find_layers, quantize_with_calibration

    planned = quantize.planned_weights(model)
    orientations: dict[str, int] = {}
    for name, *_ in planned:
        orientations[name] = orientations.get(name, 0) + 1
    keys = [
        (name, transpose)
        for name, transpose, K, _ in planned
        if orientations[name] == 1
        and name not in quantize.prequantized
        and (quantize.format == "onnx_nf4" or K % quantize.block_size == 0)
    ]
    layers = find_layers(model, keys)
    if not layers:
        return {}, {}
    results = quantize_with_calibration(
        model,
        layers,
        calibration,
        block_size=quantize.block_size,
        double_quant=quantize.double_quant,
        scales_in_weight_dtype=quantize.format == "com.microsoft",  # MatMulBnb4 stores the absmax in T
        on_progress=on_progress,
    )
    return (
        {name: result.q for (name, _), result in results.items()},
        {name: result.output_error for (name, _), result in results.items()},
    )


def _const(node: ir.Node, index: int) -> np.ndarray | None:
    value = node.inputs[index] if index < len(node.inputs) else None
    if value is None:
        return None
    if value.const_value is None:
        raise ValueError(f"{node.op_type} node {node.name!r}: input {index} ({value.name!r}) is not an initializer")
    return value.const_value.numpy()


def _attr(node: ir.Node, name: str, default: int | None = None) -> int:
    attr = node.attributes.get(name)
    if attr is None:
        if default is None:
            raise ValueError(f"{node.op_type} node {node.name!r} has no attribute {name!r}")
        return default
    return int(attr.as_int())


def _check_input(node: ir.Node, name: str, array: np.ndarray, dtypes: tuple[type, ...], shape: tuple[int, ...]) -> None:
    """Raise ``ValueError`` naming ``node`` unless ``array`` has one of ``dtypes`` and exactly ``shape``."""
    if array.dtype not in [np.dtype(d) for d in dtypes]:
        expected = " or ".join(np.dtype(d).name for d in dtypes)
        raise ValueError(f"{node.op_type} node {node.name!r}: input {name!r} is {array.dtype}, expected {expected}")
    if array.shape != shape:
        raise ValueError(
            f"{node.op_type} node {node.name!r}: input {name!r} has shape {list(array.shape)}, expected {list(shape)}"
        )


def _nested(node: ir.Node, N: int, k_blocks: int, absmax: np.ndarray) -> NestedAbsmax | None:
    """The double-quantization statistics of a ``MatMulNF4`` node, checked against ``absmax``'s dtype and size."""
    label = f"{OP_TYPE} node {node.name!r}"
    nested_absmax, code, offset = (_const(node, i) for i in (3, 4, 5))
    if absmax.dtype != np.uint8:
        if nested_absmax is not None or code is not None or offset is not None:
            raise ValueError(
                f"{label}: absmax is float32, so nested_absmax, nested_code and absmax_offset must be omitted"
            )
        return None
    if nested_absmax is None or code is None or offset is None:
        raise ValueError(f"{label}: uint8 absmax without the nested statistics")
    nbs = _attr(node, "nested_block_size", 256)
    if not is_valid_nested_block_size(nbs):
        raise ValueError(f"{label}: nested_block_size must be a power of two >= 16, got {nbs}")
    _check_input(node, "nested_absmax", nested_absmax, (np.float32,), (-(-N * k_blocks // nbs),))
    _check_input(node, "nested_code", code, (np.float32,), (256,))
    _check_input(node, "absmax_offset", offset.reshape(()) if offset.shape == (1,) else offset, (np.float32,), ())
    return NestedAbsmax(nested_absmax, code, np.float32(offset.reshape(())), nbs)


def _decoded_weight(node: ir.Node) -> np.ndarray:
    """The float32 ``W[K, N]`` of a ``MatMulNF4`` or ``MatMulBnb4`` node.

    Every attribute and tensor is checked against the op's spec first: an inconsistent (crafted or corrupt) node
    raises ``ValueError`` naming it.
    """
    K, N, bs = _attr(node, "K"), _attr(node, "N"), _attr(node, "block_size")
    if K < 1 or N < 1:
        raise ValueError(f"{node.op_type} node {node.name!r}: K and N must be >= 1, got K={K}, N={N}")
    try:
        check_block_size(bs)
    except ValueError as err:
        raise ValueError(f"{node.op_type} node {node.name!r}: {err}") from None
    packed, absmax = _const(node, 1), _const(node, 2)
    assert packed is not None and absmax is not None
    if node.domain == MS_DOMAIN:
        _check_input(node, "B", packed, (np.uint8,), (-(-N * K // 2),))
        _check_input(node, "absmax", absmax, (np.float32, np.float16), (-(-N * K // bs),))
        return dequantize_blockwise(packed, absmax.astype(np.float32), (N, K), bs).T
    k_blocks = -(-K // bs)
    _check_input(node, "B", packed, (np.uint8,), (N, k_blocks, bs // 2))
    _check_input(node, "absmax", absmax, (np.float32, np.uint8), (N, k_blocks))
    return dequantize_weight(QuantizedWeight(K, N, bs, packed, absmax, _nested(node, N, k_blocks, absmax)))


def _activation_dtype(node: ir.Node) -> ir.DataType | None:
    """The T of a ``MatMulNF4`` / ``MatMulBnb4`` node, when the graph tells it."""
    if node.domain == MS_DOMAIN:
        return node.inputs[2].dtype if node.inputs[2] is not None else None  # MatMulBnb4's absmax is of type T
    bias = node.inputs[6] if len(node.inputs) > 6 else None
    if bias is not None and bias.dtype is not None:
        return bias.dtype
    return node.inputs[0].dtype if node.inputs[0] is not None else None


def dequantize_model(
    model_or_path: ModelLike,
    output_path: str | os.PathLike[str] | None = None,
    *,
    external_data: bool | None = None,
) -> onnx.ModelProto | None:
    """Replace every ``MatMulNF4`` / ``MatMulBnb4`` node by a float ``MatMul`` (+ ``Add`` of its bias).

    The weight is the decoded NF4 weight (``NF4[code] * absmax`` in float32) stored in the op's T (found from
    the absmax of ``MatMulBnb4``, the bias, ``A``'s type, or shape inference; when it stays unknown, the float32
    weight goes through a ``CastLike`` to ``A``). NF4 tensors shared by several nodes give one shared float
    weight. A debugging aid: the result computes what the quantized model computes, with float kernels. Returns
    the ``ModelProto``, or ``None`` after writing it to ``output_path`` (``external_data`` as for
    :func:`quantize_model`). Unused NF4 initializers are removed.
    """
    _check_output(output_path, external_data)
    model = load_model(model_or_path)
    targets = [
        node
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
        if (node.domain, node.op_type) in ((DOMAIN, OP_TYPE), (MS_DOMAIN, "MatMulBnb4"))
    ]
    if any(_activation_dtype(node) is None for node in targets):
        ShapeInferencePass(strict_mode=False)(model)  # leaves the model unchanged if inference fails
    names = UniqueNames(model)
    decoded: dict[tuple[int, int, ir.DataType | None], ir.Value] = {}
    for node in targets:
        graph, (a, packed, absmax), out = node.graph, node.inputs[:3], node.outputs[0]
        assert isinstance(graph, ir.Graph) and a is not None and packed is not None and absmax is not None
        dtype = _activation_dtype(node)
        key = (id(packed), id(absmax), dtype)
        if key not in decoded:
            weight = _decoded_weight(node)
            weight = weight if dtype is None else weight.astype(dtype.numpy())
            name = names.fresh(f"{packed.name}_dequantized")
            value = ir.Value(name=name, shape=ir.Shape(weight.shape), const_value=ir.tensor(weight, name=name))
            value.type = ir.TensorType(value.const_value.dtype)  # type: ignore[union-attr]
            owner = packed.graph if isinstance(packed.graph, ir.Graph) else graph  # visible wherever B is
            owner.register_initializer(value)
            decoded[key] = value
        w_value = decoded[key]
        new_nodes: list[ir.Node] = []
        if dtype is None:
            cast = ir.Value(name=names.fresh(f"{w_value.name}_cast"))
            new_nodes.append(ir.node("CastLike", [w_value, a], outputs=[cast], name=f"{node.name}_cast"))
            w_value = cast
        y = ir.Value(name=names.fresh(f"{out.name}_matmul"))
        new_nodes.append(ir.node("MatMul", [a, w_value], outputs=[y], name=node.name))
        bias = node.inputs[6] if node.domain == DOMAIN and len(node.inputs) > 6 else None
        if bias is not None:
            summed = ir.Value(name=names.fresh(f"{out.name}_bias"))
            new_nodes.append(ir.node("Add", [y, bias], outputs=[summed], name=f"{node.name}_bias"))
            y = summed
        ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, [out], [y])
    remove_unused_initializers(model)
    return _finish(model, output_path, external_data)
