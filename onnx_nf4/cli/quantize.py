"""``onnx-nf4 quantize IN OUT``: a float model (or an onnxruntime-genai folder) to NF4, with a per-layer report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..methods import METHODS
from ..passes.options import DEFAULT_EMBEDDING_MIN_ROWS, DEFAULT_MIN_ELEMENTS, QuantizeOptions
from .common import (
    CLIError,
    Progress,
    UsageError,
    add_calibration_options,
    add_external_data_option,
    add_format_options,
    add_quantize_options,
    check_calibration_options,
    check_output_path,
    file_bytes,
    non_negative_int,
    print_folder_reports,
    print_written,
    quantize_options,
)
from .report_text import format_quantization_report

__all__ = ["DESCRIPTION", "HELP", "NAME", "add_arguments", "run"]


#: The subcommand's name, its line in ``onnx-nf4 --help`` and the paragraph of its own ``--help``.
NAME = "quantize"
HELP = "rewrite MatMul/Gemm layers with constant weights and embedding tables to NF4"
DESCRIPTION = (
    "Rewrite the MatMul/Gemm layers whose weight is a constant, and the vocabulary embedding (a Gather over a "
    "constant table; a table tied to a MatMul/Gemm weight is stored once), to NF4 and print a per-layer report. "
    "OUT may equal IN: the model is written to a temporary file and then renamed."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``onnx-nf4 quantize`` to its parser."""
    parser.add_argument("input", metavar="IN", type=Path, help="float ONNX model, or an onnxruntime-genai model folder")
    parser.add_argument(
        "output", metavar="OUT", type=Path, help="where to write the NF4 model (a new folder when IN is a folder)"
    )
    add_quantize_options(parser)
    add_format_options(parser)
    parser.add_argument(
        "--method",
        choices=METHODS,
        default="rtn",
        help="how codes and block scales are chosen (same format): rtn = round to nearest at the absmax, "
        "byte for byte onnxruntime's quantizer (default); mse = per block, the scale minimizing its squared "
        "error weighted towards the large weights (data-free); gptq = codes with error feedback on calibration "
        "data (needs --calibration)",
    )
    add_calibration_options(parser)
    parser.add_argument(
        "--min-elements",
        metavar="N",
        type=non_negative_int,
        default=DEFAULT_MIN_ELEMENTS,
        help=f"leave weights with fewer than N elements in float (default {DEFAULT_MIN_ELEMENTS})",
    )
    parser.add_argument(
        "--embedding-min-rows",
        metavar="ROWS",
        type=non_negative_int,
        default=DEFAULT_EMBEDDING_MIN_ROWS,
        help="embedding tables (Gather over a constant table) with at least ROWS rows become NF4 lookups (default "
        f"{DEFAULT_EMBEDDING_MIN_ROWS}: vocabularies, not position tables); a table tied to a quantized "
        "MatMul/Gemm weight is taken whatever its size; --exclude keeps any table float",
    )
    parser.add_argument(
        "--embedding-block-size",
        metavar="BS",
        type=int,
        help="block size of the embedding tables and of the weights tied to them (default: the smaller of "
        "--block-size and 32)",
    )
    add_external_data_option(parser)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run ``onnx-nf4 quantize`` with the parsed ``args``; returns the exit status."""
    from ..api import quantize_model

    options = quantize_options(
        args,
        format=args.format,
        min_elements=args.min_elements,
        embedding_min_rows=args.embedding_min_rows,
        embedding_block_size=args.embedding_block_size,
        external_data=args.external_data,
        accuracy_level=args.accuracy_level,
        method=args.method,
    )
    check_calibration_options(args)
    if args.input.is_dir():
        return _quantize_folder(args, options)
    if args.calibration_tokens is not None:
        raise UsageError("--calibration-tokens applies to a text calibration of a genai folder")
    check_output_path(args.output)
    input_bytes = file_bytes(args.input)
    with Progress(enabled=not args.quiet and sys.stderr.isatty()) as progress:
        _, report = quantize_model(
            args.input, args.output, options, calibration=args.calibration, on_progress=progress.update
        )
    print(format_quantization_report(report))
    print_written(args.output, input_bytes)
    return 0


def _quantize_folder(args: argparse.Namespace, options: QuantizeOptions) -> int:
    """``quantize IN_DIR OUT_DIR`` for an onnxruntime-genai model folder (:mod:`onnx_nf4.genai.folder`)."""
    from ..genai.folder import GENAI_CONFIG, is_genai_folder, quantize_genai_folder

    if not is_genai_folder(args.input):
        raise CLIError(
            f"{args.input}: is a directory without {GENAI_CONFIG} "
            "(IN must be an ONNX model file or an onnxruntime-genai model folder)"
        )
    with Progress(enabled=not args.quiet and sys.stderr.isatty()) as progress:
        reports = quantize_genai_folder(
            args.input,
            args.output,
            options,
            calibration=args.calibration,
            calibration_tokens=args.calibration_tokens,
            on_progress=progress.update,
        )
    print_folder_reports(reports, args.input, args.output)
    return 0
