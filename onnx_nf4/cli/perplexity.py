"""``onnx-nf4 perplexity FOLDER TEXT_FILE``: perplexity of an onnxruntime-genai folder on a text file.

Registered by :mod:`onnx_nf4.cli.entry`; the work is :func:`onnx_nf4.genai.perplexity.perplexity` (its module
docstring says how the windows are scored).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import CLIError, Progress, non_negative_int

__all__ = ["DESCRIPTION", "HELP", "NAME", "add_arguments", "run"]

#: The subcommand's name, its line in ``onnx-nf4 --help`` and the paragraph of its own ``--help``.
NAME = "perplexity"
HELP = "perplexity of an onnxruntime-genai model folder on a text file"
DESCRIPTION = (
    "Tokenize TEXT_FILE with the folder's tokenizer, cut it into consecutive non-overlapping windows of --window "
    "tokens, run each window through the decoder as one prefill (plain onnxruntime; the folder's custom-op "
    "library when its config names one) and score every token but the first of each window: perplexity = "
    "exp(mean negative log-likelihood). Prints the perplexity, the scored tokens and the prefill tokens/s."
)


def _window(text: str) -> int:
    value = non_negative_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"a window holds at least 2 tokens, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``onnx-nf4 perplexity`` to its parser."""
    from ..genai.perplexity import DEFAULT_WINDOW

    parser.add_argument("folder", metavar="FOLDER", type=Path, help="onnxruntime-genai model folder")
    parser.add_argument("text", metavar="TEXT_FILE", type=Path, help="UTF-8 text file to score")
    parser.add_argument(
        "--window",
        metavar="N",
        type=_window,
        help=f"tokens per window (default {DEFAULT_WINDOW}, or the model's context length when shorter)",
    )
    parser.add_argument(
        "--max-tokens", metavar="N", type=_window, help="score only the first N tokens of the text (default: all)"
    )
    parser.add_argument(
        "--threads", metavar="N", type=non_negative_int, default=0, help="onnxruntime intra-op threads (0: its default)"
    )
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of text")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run ``onnx-nf4 perplexity`` with the parsed ``args``; returns the exit status."""
    from ..genai.perplexity import perplexity

    if not args.text.is_file():
        raise CLIError(f"{args.text}: text file not found")
    try:
        text = args.text.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CLIError(f"{args.text}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    with Progress(enabled=not args.quiet and sys.stderr.isatty(), unit="window") as progress:
        result = perplexity(
            args.folder,
            text,
            window=args.window,
            threads=args.threads,
            max_tokens=args.max_tokens,
            on_progress=progress.update,
        )
    if args.json:
        json.dump({"folder": str(args.folder), "text": str(args.text), **result.as_dict()}, sys.stdout, indent=2)
        print()
    else:
        print(f"perplexity: {result.perplexity:.4f}")
        print(f"tokens: {result.tokens} scored ({result.text_tokens} in {result.windows} window(s) of {result.window})")
        print(f"speed: {result.tokens_per_second:.1f} tokens/s ({result.seconds:.2f} s of prefill)")
    return 0
