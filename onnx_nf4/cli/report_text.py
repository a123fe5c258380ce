"""The plain-text renderings the CLI prints: the quantization report and the ``inspect`` summary."""

from __future__ import annotations

from ..model.summary import ModelSummary
from ..passes.report import QuantizationReport
from .text_table import format_bytes, render_table

__all__ = ["format_model_summary", "format_quantization_report"]


def format_quantization_report(report: QuantizationReport) -> str:
    """The per-layer table, the skipped layers with their reasons and the totals of a quantization run."""
    lines: list[str] = []
    if report.layers:
        rows = [
            (
                layer.node,
                f"{layer.shape[0]}x{layer.shape[1]}",
                format_bytes(layer.bytes_before),
                "shared" if layer.shared else format_bytes(layer.bytes_after),
                f"{layer.rel_rms_error:.4f}",
            )
            for layer in report.layers
        ]
        header: tuple[str, ...] = ("layer", "K x N", "before", "after", "rel. RMS error")
        if any(layer.output_error is not None for layer in report.layers):
            header += ("output error",)
            rows = [
                (*row, "-" if layer.output_error is None else f"{layer.output_error:.4f}")
                for row, layer in zip(rows, report.layers, strict=True)
            ]
        lines.append(render_table(header, rows))
    if report.skipped:
        if lines:
            lines.append("")
        lines.append(f"skipped {len(report.skipped)} layer(s):")
        rows = [(skip.node, skip.op_type, skip.reason) for skip in report.skipped]
        lines.append(render_table(("layer", "op", "reason"), rows, align="<<<"))
    if lines:
        lines.append("")
    tables = any(layer.op_type == "Gather" for layer in report.layers)
    double = (
        f" (embedding tables {report.table_block_size})"
        if tables and report.table_block_size != report.block_size
        else ""
    )
    double += ", double quantization" if report.double_quant else ""
    double += f", accuracy level {report.accuracy_level}" if report.accuracy_level else ""
    if report.layers:
        distinct = sum(not layer.shared for layer in report.layers)
        shared = f" ({distinct} distinct weights)" if distinct != len(report.layers) else ""
        lines.append(
            f"quantized {len(report.layers)} layer(s){shared} to NF4, format {report.format}, "
            f"block size {report.block_size}{double}{'' if report.method == 'rtn' else f', method {report.method}'}"
        )
        lines.append(
            f"weights: {format_bytes(report.bytes_before)} -> {format_bytes(report.bytes_after)} "
            f"(size ratio {report.size_ratio:.4f}, {report.bits_per_weight:.3f} bits per weight)"
        )
    for title, weights in (
        ("float copies kept (a node that was not rewritten reads them; counted above)", report.kept_float),
        ("float weights no MatMul/Gemm/Gather/Attention reads (left float)", report.left_float),
    ):
        if weights:
            lines.append(f"{title}:")
            rows = [(w.name, "x".join(map(str, w.shape)), format_bytes(w.nbytes), w.reason) for w in weights]
            lines.append(render_table(("tensor", "shape", "bytes", "reason"), rows, align="<<><"))
    if report.tensor_bytes_before:
        lines.append(
            f"all constant tensors: {format_bytes(report.tensor_bytes_before)} -> "
            f"{format_bytes(report.tensor_bytes_after)}"
        )
    already = report.already_quantized
    if already:
        shown = ", ".join(already[:_NAMES_SHOWN]) + (
            f", ... ({len(already) - _NAMES_SHOWN} more)" if len(already) > _NAMES_SHOWN else ""
        )
        what = f"{len(already)} layer(s) already NF4, left as they are: {shown}"
        lines.append(what if report.layers else f"no layer was quantized: {what}")
    elif not report.layers:
        lines.append("no layer was quantized")
    return "\n".join(lines)


#: How many layer names a summary line lists before "... (N more)".
_NAMES_SHOWN = 8


def format_model_summary(summary: ModelSummary) -> str:
    """What ``inspect`` prints: the quantized layers, the float MatMul/Gemm layers and the totals."""
    lines: list[str] = []
    opsets = ", ".join(f"{domain or 'ai.onnx'} {version}" for domain, version in sorted(summary.opsets.items()))
    lines.append(f"opsets: {opsets}")
    if summary.quantized:
        rows = []
        seen: set[tuple[str, ...]] = set()
        for layer in summary.quantized:
            nbytes = summary.layer_bytes(layer)
            shared = layer.tensors in seen  # the weight of an earlier layer: its bytes are counted there
            seen.add(layer.tensors)
            rows.append(
                (
                    layer.node,
                    layer.op,
                    f"{layer.K}x{layer.N}",
                    layer.quant_type,
                    layer.block_size,
                    "yes" if layer.double_quant else "no",
                    "-" if layer.accuracy_level is None else layer.accuracy_level,
                    "shared" if shared else format_bytes(nbytes),
                    "-" if shared or not layer.K * layer.N else f"{8 * nbytes / (layer.K * layer.N):.3f}",
                )
            )
        headers = ("layer", "op", "K x N", "type", "block", "double quant", "accuracy level", "bytes", "bits/weight")
        lines += ["", render_table(headers, rows, align="<<>>>>>>>")]
    if summary.float_layers:
        rows = [
            (
                layer.node,
                layer.op_type,
                "x".join(str(d) for d in layer.shape) if layer.shape is not None else "-",
                layer.dtype or "-",
                "constant" if layer.weight is not None else "computed at run time",
            )
            for layer in summary.float_layers
        ]
        lines += ["", "float layers:", render_table(("layer", "op", "B shape", "B type", "B is"), rows, align="<<><<")]
    lines.append("")
    if summary.quantized:
        sizes = ", ".join(str(size) for size in summary.block_sizes)
        double = sum(layer.double_quant for layer in summary.quantized)
        levels = ", ".join(f"{level} on {count}" for level, count in summary.accuracy_levels.items())
        lines.append(
            f"quantized: {len(summary.quantized)} layer(s), format {' + '.join(summary.formats)}, "
            f"block size {sizes}, double quantization on {double}" + (f", accuracy level {levels}" if levels else "")
        )
        shared = f", {format_bytes(summary.shared_bytes)} of it shared by several" if summary.shared_bytes else ""
        lines.append(
            f"quantized weights: {summary.quantized_elements} elements in {format_bytes(summary.quantized_bytes)} "
            f"({summary.bits_per_weight:.3f} bits per weight{shared})"
        )
    else:
        lines.append("quantized: none (a float model)")
    constant = sum(layer.weight is not None for layer in summary.float_layers)
    lines.append(
        f"float MatMul/Gemm: {len(summary.float_layers)} ({constant} with a constant weight, "
        f"{format_bytes(summary.float_weight_bytes)})"
    )
    lines.append(f"all constant tensors: {format_bytes(summary.total_tensor_bytes)}")
    return "\n".join(lines)
