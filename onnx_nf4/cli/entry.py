"""The ``onnx-nf4`` command line (also ``python -m onnx_nf4``).

Subcommands:

* ``quantize IN OUT``: rewrite the MatMul/Gemm layers with constant weights to NF4 (``onnx_nf4::MatMulNF4`` or
  ``com.microsoft::MatMulBnb4``), with a progress bar on stderr and a per-layer report on stdout.
* ``inspect MODEL``: what is quantized, block sizes, bits per weight (either format, or a float model).
* ``dequantize IN OUT``: back to float ``MatMul`` (for debugging).
* ``perplexity FOLDER TEXT``: perplexity of an onnxruntime-genai folder on a text file.
* ``info``: versions, the custom-op library, the CPU kernel set chosen, CUDA support (:mod:`onnx_nf4.op.sysinfo`).

Every expected failure (unreadable or invalid model, bad option, write error) is reported as one line
``onnx-nf4: error: ...`` on stderr with exit status 1, or 2 for a usage error (an unknown option, a bad value,
options that do not go together; the line names the command's ``--help``), never a traceback. Outputs are written
to a temporary file and renamed into place (:func:`onnx_nf4.model.io.save_model`), so ``OUT`` may equal ``IN``: the
input is replaced only once the new model is complete, and stays intact on any failure.

Other modules add subcommands through :data:`SUBCOMMAND_PROVIDERS` (see there).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence

from google.protobuf.message import DecodeError

from ..version import __version__
from . import dequantize, export_bnb, export_genai, info, inspect, perplexity, quantize
from .common import PROG, CLIError, CommandParser, UsageError, usage_line

__all__ = ["SUBCOMMAND_PROVIDERS", "build_parser", "main"]

#: The subcommand modules of this package, in ``--help`` order. Each defines ``NAME``, ``HELP`` and ``DESCRIPTION``,
#: ``add_arguments(parser)`` and ``run(args) -> int``, which reports an expected failure by raising
#: :class:`CLIError` (or :class:`UsageError`), ``OSError`` or ``ValueError``; it imports its optional dependencies
#: inside ``run``.
SUBCOMMANDS = (quantize, inspect, dequantize, info, export_bnb, export_genai, perplexity)

#: Subcommands defined outside this package, as ``"module:function"``. ``function(subparsers)`` receives the
#: ``argparse`` sub-parsers action, adds its parser with ``subparsers.add_parser(...)`` and sets
#: ``parser.set_defaults(handler=...)``, where ``handler(args: argparse.Namespace) -> int | None`` runs the command
#: (``None`` means 0) and reports an expected failure by raising :class:`CLIError`, ``OSError`` or ``ValueError``.
#: The module is imported only when the parser is built, and skipped when it is absent, so it must import without
#: its optional dependencies (import them inside the handler).
SUBCOMMAND_PROVIDERS: list[str] = []

# What a command may raise for a failure the user can fix; anything else is a bug and keeps its traceback.
_EXPECTED_ERRORS = (OSError, ValueError, DecodeError)


def build_parser() -> argparse.ArgumentParser:
    """The ``onnx-nf4`` argument parser: the subcommands of :data:`SUBCOMMANDS` and :data:`SUBCOMMAND_PROVIDERS`."""
    parser = CommandParser(prog=PROG, description="NF4 (4-bit NormalFloat) weight quantization for ONNX models.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND", parser_class=CommandParser)
    subparsers.required = True
    for module in SUBCOMMANDS:
        command = subparsers.add_parser(module.NAME, help=module.HELP, description=module.DESCRIPTION)
        module.add_arguments(command)
        command.set_defaults(handler=module.run)
    for provider in SUBCOMMAND_PROVIDERS:
        _register_provider(provider, subparsers)
    return parser


def _register_provider(provider: str, subparsers: argparse._SubParsersAction) -> None:
    """Call ``provider`` (``"module:function"``) on ``subparsers``.

    A provider whose module is not installed is skipped; one whose module fails to import (a bug: it must import
    without its optional dependencies) is skipped with a warning on stderr, so the other commands keep working.
    """
    module_name, _, function_name = provider.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        # Absent: the module itself (or its package) is not part of this installation.
        absent = isinstance(err, ModuleNotFoundError) and (module_name + ".").startswith(f"{err.name}.")
        if not absent:
            print(f"{PROG}: warning: commands of {module_name} unavailable ({err})", file=sys.stderr)
        return
    add_parser: Callable[[argparse._SubParsersAction], None] = getattr(module, function_name)
    add_parser(subparsers)


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 success, 1 failure, 2 usage error, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    try:
        status = args.handler(args)
    except UsageError as err:
        print(usage_line(str(err), f"{PROG} {args.command}"), end="", file=sys.stderr)
        return 2
    except CLIError as err:
        return _fail(str(err))
    except BrokenPipeError:  # stdout closed early (e.g. piped into head): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except _EXPECTED_ERRORS as err:
        return _fail(_describe(err))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 0 if status is None else int(status)


def _describe(err: BaseException) -> str:
    """One line for an expected exception: its message, or the OS error with its file name."""
    if isinstance(err, OSError) and err.strerror:
        name = err.filename if err.filename is not None else ""
        return f"{name}: {err.strerror}" if name else err.strerror
    text = " ".join(str(err).split())
    return text or type(err).__name__
