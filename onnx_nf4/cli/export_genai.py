"""``onnx-nf4 export-genai HF_DIR OUT_DIR``: a transformers checkpoint to an onnxruntime-genai NF4 folder.

Registered by :mod:`onnx_nf4.cli.entry`; the work is
:func:`onnx_nf4.genai.export.export_genai` (needs the ``genai`` extra: onnxruntime-genai, torch, transformers).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..methods import METHODS
from .common import (
    CLIError,
    Progress,
    add_calibration_options,
    add_format_options,
    add_quantize_options,
    check_calibration_options,
    print_folder_reports,
    quantize_options,
)
from .text_table import format_bytes

__all__ = ["DESCRIPTION", "HELP", "NAME", "add_arguments", "run"]


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


#: The subcommand's name, its line in ``onnx-nf4 --help`` and the paragraph of its own ``--help``.
NAME = "export-genai"
HELP = "export a transformers checkpoint (float or bitsandbytes NF4) to an onnxruntime-genai NF4 folder"
DESCRIPTION = (
    "Build HF_DIR with onnxruntime-genai's model builder and write OUT_DIR, a folder that "
    "onnxruntime_genai.Model loads as it is. A float checkpoint is quantized with the options below; a "
    "bitsandbytes NF4 checkpoint keeps bitsandbytes' own bytes (with or without double quantization), and "
    "the layers it left float (lm_head) stay float unless --quantize-float is given. Each --adapter NAME=PEFT_DIR "
    "(a peft LoRA adapter) is written to OUT_DIR/adapters/NAME.onnx_adapter, and the model gets LoRA inputs so "
    "that one folder serves every adapter, switched at run time (onnxruntime_genai.Adapters)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``onnx-nf4 export-genai`` to its parser."""
    from ..genai.export import EXECUTION_PROVIDERS

    parser.add_argument("hf_dir", metavar="HF_DIR", type=Path, help="transformers checkpoint folder")
    parser.add_argument("output", metavar="OUT_DIR", type=Path, help="the genai folder to create (new or empty)")
    parser.add_argument(
        "--execution-provider",
        choices=EXECUTION_PROVIDERS,
        default="cpu",
        help="execution provider the model is built for (default cpu)",
    )
    parser.add_argument(
        "--quantize-float",
        action="store_true",
        help="bitsandbytes checkpoints: also quantize the layers bitsandbytes left float (with --block-size / "
        "--double-quant)",
    )
    add_quantize_options(parser)
    add_format_options(parser, accuracy_default="4 for a float checkpoint built for the CPU, else 0 (see docs/llm.md)")
    parser.add_argument(
        "--method",
        choices=METHODS,
        default="rtn",
        help="float checkpoints: how codes and block scales are chosen (see onnx-nf4 quantize --help; default rtn)",
    )
    add_calibration_options(parser)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--builder-option",
        metavar="KEY=VALUE",
        type=_key_value,
        action="append",
        help="pass KEY=VALUE to the model builder's --extra_options (e.g. fuse_mlp_gate_up=true); repeatable",
    )
    parser.add_argument(
        "--adapter",
        metavar="NAME=PEFT_DIR",
        type=_key_value,
        action="append",
        help="a peft LoRA adapter folder, written as OUT_DIR/adapters/NAME.onnx_adapter; repeatable",
    )


def _adapters(pairs: list[tuple[str, str]]) -> dict[str, Path]:
    adapters: dict[str, Path] = {}
    for name, folder in pairs:
        if name in adapters:
            raise CLIError(f"--adapter {name}=...: the name {name!r} is given twice")
        adapters[name] = Path(folder)
    return adapters


def run(args: argparse.Namespace) -> int:
    """Run ``onnx-nf4 export-genai`` with the parsed ``args``; returns the exit status."""
    from ..genai.adapters import adapter_path
    from ..genai.export import BuilderError, default_accuracy_level, export_genai

    accuracy_level = args.accuracy_level
    if accuracy_level is None:
        accuracy_level = default_accuracy_level(args.hf_dir, args.execution_provider, args.format)
    options = quantize_options(args, format=args.format, accuracy_level=accuracy_level, method=args.method)
    check_calibration_options(args)
    adapters = _adapters(args.adapter or ())
    try:
        with Progress(enabled=not args.quiet and sys.stderr.isatty()) as progress:
            reports = export_genai(
                args.hf_dir,
                args.output,
                options,
                execution_provider=args.execution_provider,
                quantize_float=args.quantize_float,
                builder_options=dict(args.builder_option or ()),
                calibration=args.calibration,
                calibration_tokens=args.calibration_tokens,
                on_progress=progress.update,
                adapters=adapters,
            )
    except BuilderError as err:
        raise CLIError(str(err)) from None
    print_folder_reports(reports, None, args.output)
    for name in adapters:
        path = adapter_path(args.output, name)
        print(f"adapter {name}: {path} ({format_bytes(path.stat().st_size)})")
    return 0
