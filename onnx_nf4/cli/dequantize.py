"""``onnx-nf4 dequantize IN OUT``: NF4 layers (either format) back to float ``MatMul``, for debugging."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_external_data_option, check_output_path, file_bytes, print_written

__all__ = ["DESCRIPTION", "HELP", "NAME", "add_arguments", "run"]


#: The subcommand's name, its line in ``onnx-nf4 --help`` and the paragraph of its own ``--help``.
NAME = "dequantize"
HELP = "turn NF4 layers back into float MatMul (for debugging)"
DESCRIPTION = "Replace every NF4 layer (either format) by a float MatMul with the decoded weight. OUT may equal IN."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``onnx-nf4 dequantize`` to its parser."""
    parser.add_argument("input", metavar="IN", type=Path, help="NF4 ONNX model")
    parser.add_argument("output", metavar="OUT", type=Path, help="where to write the float model")
    add_external_data_option(parser)


def run(args: argparse.Namespace) -> int:
    """Run ``onnx-nf4 dequantize`` with the parsed ``args``; returns the exit status."""
    from ..api import dequantize

    check_output_path(args.output)
    input_bytes = file_bytes(args.input)
    _, result = dequantize(args.input, args.output, external_data=args.external_data)
    if result.layers:
        print(f"dequantized {len(result.layers)} layer(s) to float MatMul")
    else:
        print(f"nothing to dequantize: {args.input} has no MatMulNF4 or MatMulBnb4 node (wrote it unchanged)")
    print_written(args.output, input_bytes)
    return 0
