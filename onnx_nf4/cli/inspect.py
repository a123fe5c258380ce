"""``onnx-nf4 inspect MODEL``: what is quantized, block sizes and bits per weight (either format, or a float model)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..model.summary import summarize_model
from .common import file_bytes
from .report_text import format_model_summary
from .text_table import format_bytes

__all__ = ["DESCRIPTION", "HELP", "NAME", "add_arguments", "run"]


#: The subcommand's name, its line in ``onnx-nf4 --help`` and the paragraph of its own ``--help``.
NAME = "inspect"
HELP = "show what is quantized, block sizes and bits per weight"
DESCRIPTION = (
    "Show the quantized layers (either format), block sizes, bits per weight and the float "
    "MatMul/Gemm layers of a model."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``onnx-nf4 inspect`` to its parser."""
    parser.add_argument("model", metavar="MODEL", type=Path, help="ONNX model")


def run(args: argparse.Namespace) -> int:
    """Run ``onnx-nf4 inspect`` with the parsed ``args``; returns the exit status."""
    from ..model.io import load_model

    model = load_model(args.model)
    print(f"{args.model}: {format_bytes(file_bytes(args.model))}")
    print(format_model_summary(summarize_model(model)))
    return 0
