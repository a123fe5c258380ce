"""``onnx-nf4 info``: versions, the custom-op library, the CPU kernel set chosen, CUDA support."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from ..op.sysinfo import CPU_ISA_ENV_VAR, format_info, info

__all__ = ["DESCRIPTION", "HELP", "NAME", "add_arguments", "run"]


#: The subcommand's name, its line in ``onnx-nf4 --help`` and the paragraph of its own ``--help``.
NAME = "info"
HELP = "versions, the custom-op library, the CPU kernel set chosen, CUDA support"
DESCRIPTION = (
    "Print the versions of onnx_nf4 and its dependencies, the custom-op library's path, the CPU "
    f"kernel set MatMulNF4 runs (capped by {CPU_ISA_ENV_VAR}), the CPU's relevant features and whether the "
    "library holds CUDA kernels. Exit status 0 also when the library is missing (the output says so)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``onnx-nf4 info`` to its parser."""
    parser.add_argument("--json", action="store_true", help="print a JSON object (the fields of onnx_nf4.SystemInfo)")


def run(args: argparse.Namespace) -> int:
    """Run ``onnx-nf4 info`` with the parsed ``args``; returns the exit status."""
    system = info()
    if args.json:
        json.dump(dataclasses.asdict(system), sys.stdout, indent=2)
        print()
    else:
        print(format_info(system))
    return 0
