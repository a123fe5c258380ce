"""``onnx-nf4 export-bnb MODEL STATE_DICT OUT``: a bitsandbytes 4-bit state dict into an exported float ONNX model.

Registered by :mod:`onnx_nf4.cli.entry`. Needs neither PyTorch nor bitsandbytes
for a ``.safetensors`` state dict (a ``torch.save`` file needs PyTorch).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from .common import (
    UsageError,
    add_external_data_option,
    add_quantize_options,
    check_output_path,
    print_written,
    quantize_kwargs,
)
from .report_text import format_quantization_report

__all__ = ["DESCRIPTION", "HELP", "NAME", "add_arguments", "run"]


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


#: The subcommand's name, its line in ``onnx-nf4 --help`` and the paragraph of its own ``--help``.
NAME = "export-bnb"
HELP = "put the 4-bit layers of a bitsandbytes state dict into an exported float ONNX model"
DESCRIPTION = (
    "Replace the weight of each MatMul/Gemm exported from a bitsandbytes Linear4bit layer (NF4) "
    "by bitsandbytes' own codes and statistics from STATE_DICT, bit for bit, without re-quantizing, and "
    "print a per-layer report. Layers are matched by module path (a wrapper's prefix is allowed)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``onnx-nf4 export-bnb`` to its parser."""
    parser.add_argument("model", metavar="MODEL", type=Path, help="float ONNX model exported with torch.onnx.export")
    parser.add_argument(
        "state_dict",
        metavar="STATE_DICT",
        type=Path,
        help="bitsandbytes-quantized state dict: .safetensors (e.g. from save_pretrained) or a torch.save file",
    )
    parser.add_argument("output", metavar="OUT", type=Path, help="where to write the NF4 model")
    parser.add_argument(
        "--quantize-float",
        action="store_true",
        help="also quantize the other float MatMul/Gemm weights (with --block-size / --double-quant)",
    )
    add_quantize_options(parser, applies_to="--quantize-float")
    parser.add_argument(
        "--max-rel-error",
        metavar="X",
        type=_positive_float,
        default=None,
        help="refuse a layer whose float graph weight differs from its NF4 weight by more than X relative RMS "
        "(default 0.5: catches a wrong mapping)",
    )
    parser.add_argument("--no-check", action="store_true", help="skip the --max-rel-error check")
    add_external_data_option(parser)


def run(args: argparse.Namespace) -> int:
    """Run ``onnx-nf4 export-bnb`` with the parsed ``args``; returns the exit status."""
    from ..torch.state_dict import DEFAULT_MAX_REL_ERROR, export_bnb_state_dict

    if args.no_check and args.max_rel_error is not None:
        raise UsageError("--no-check and --max-rel-error exclude each other")
    check_output_path(args.output)
    max_rel_error = None if args.no_check else (args.max_rel_error or DEFAULT_MAX_REL_ERROR)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        report = export_bnb_state_dict(
            args.model,
            args.state_dict,
            args.output,
            quantize_float=args.quantize_float,
            **quantize_kwargs(args),
            max_rel_error=max_rel_error,
            external_data=args.external_data,
        )
    for warning in caught:
        print(f"onnx-nf4: warning: {warning.message}", file=sys.stderr)
    print(format_quantization_report(report))
    print_written(args.output)
    return 0
