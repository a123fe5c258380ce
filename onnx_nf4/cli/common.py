"""What every ``onnx-nf4`` subcommand shares: the one-line errors, the parser class, the shared options and steps.

Every expected failure is reported as one line ``onnx-nf4: error: ...`` on stderr: :class:`CLIError` (exit status 1)
or :class:`UsageError` (options that do not go together, exit status 2, the line names the command's ``--help``).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

import onnx_ir as ir
from google.protobuf.message import DecodeError

from ..codec.validation import check_block_size
from ..model.io import external_tensors
from ..passes.options import ACCURACY_LEVELS, FORMATS, QuantizeOptions
from ..passes.report import QuantizationReport
from .report_text import format_quantization_report
from .text_table import format_bytes

__all__ = [
    "PROG",
    "CLIError",
    "CommandParser",
    "Progress",
    "UsageError",
    "add_calibration_options",
    "add_external_data_option",
    "add_format_options",
    "add_quantize_options",
    "check_calibration_options",
    "check_output_path",
    "file_bytes",
    "non_negative_int",
    "print_folder_reports",
    "print_written",
    "quantize_kwargs",
    "quantize_options",
    "usage_line",
]

PROG = "onnx-nf4"


class CLIError(Exception):
    """A failure reported as one ``onnx-nf4: error: <message>`` line (exit status 1)."""


class UsageError(CLIError):
    """Options that do not go together: one line naming the command's ``--help``, exit status 2."""


class CommandParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line naming the command's ``--help``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, usage_line(message, self.prog))

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: Any = None
    ) -> argparse.Namespace:
        """As ``ArgumentParser.parse_args``, but an unknown option is reported by the subcommand's parser (so the
        message points to ``onnx-nf4 COMMAND --help``)."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self._command_parser(parsed).error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed

    def _command_parser(self, parsed: argparse.Namespace) -> argparse.ArgumentParser:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and getattr(parsed, "command", None) in action.choices:
                return action.choices[parsed.command]
        return self


def usage_line(message: str, prog: str) -> str:
    """The one line of a usage error: the message and the command's ``--help``."""
    return f"{PROG}: error: {message} (see '{prog} --help')\n"


def _block_size(text: str) -> int:
    try:
        return check_block_size(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"unsupported block size {text!r}: it must be a power of two between 16 and 4096"
        ) from None


def _regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as err:
        raise argparse.ArgumentTypeError(f"invalid regular expression {text!r}: {err}") from None
    return text


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def add_quantize_options(parser: argparse.ArgumentParser, *, applies_to: str = "") -> None:
    """Add ``--block-size N``, ``--double-quant`` and ``--exclude REGEX`` (read back by :func:`quantize_kwargs`).

    ``applies_to`` names the option that the block size and double quantization qualify (``"--quantize-float"``),
    or is empty when they apply to every quantized layer.
    """
    scope = f" for {applies_to}" if applies_to else ""
    parser.add_argument(
        "--block-size",
        metavar="N",
        type=_block_size,
        default=64,
        help=f"weights per absmax block{scope}: a power of two in [16, 4096] (default 64)",
    )
    parser.add_argument(
        "--double-quant",
        action="store_true",
        help=f"quantize the absmax to 8 bits as well{scope} (onnx_nf4 format only)",
    )
    parser.add_argument(
        "--exclude",
        metavar="REGEX",
        type=_regex,
        action="append",
        help="leave layers whose node or weight name matches REGEX (re.search) in float; repeatable",
    )


def add_format_options(parser: argparse.ArgumentParser, accuracy_default: str | None = None) -> None:
    """Add ``--format`` and ``--accuracy-level`` (``args.format``, ``args.accuracy_level``). With
    ``accuracy_default`` (the help's words for it), ``args.accuracy_level`` is ``None`` unless given; else 0."""
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="onnx_nf4",
        help="onnx_nf4: onnx_nf4::MatMulNF4 (needs this package's runtime); "
        "com.microsoft: com.microsoft::MatMulBnb4 (stock onnxruntime)",
    )
    parser.add_argument(
        "--accuracy-level",
        metavar="{0,4}",
        type=int,
        choices=ACCURACY_LEVELS,
        default=None if accuracy_default else 0,
        help="the MatMulNF4 accuracy_level attribute: 0 computes in float32; 4 lets the CPU kernels quantize the "
        "activations to int8 per block (faster, slightly less exact; onnx_nf4 format only); default: "
        + (accuracy_default or "0"),
    )


def quantize_kwargs(args: argparse.Namespace) -> dict[str, object]:
    """The keyword arguments ``block_size``, ``double_quant`` and ``exclude`` of :func:`add_quantize_options`."""
    return {"block_size": args.block_size, "double_quant": args.double_quant, "exclude": tuple(args.exclude or ())}


def add_calibration_options(parser: argparse.ArgumentParser) -> None:
    """``--calibration`` and ``--calibration-tokens`` (``--method gptq``)."""
    parser.add_argument(
        "--calibration",
        metavar="TEXT_OR_NPZ",
        type=Path,
        help="--method gptq: an .npz with one batch of the model's inputs, arrays named after the graph inputs "
        "(rows where an attention_mask input is 0 are left out); for an onnxruntime-genai folder also a UTF-8 "
        "text file, tokenized with the folder's tokenizer and cut into windows of 512 tokens (or an .npz with "
        "input_ids; the other decoder inputs are those of a prefill)",
    )
    parser.add_argument(
        "--calibration-tokens",
        metavar="N",
        type=non_negative_int,
        help="genai folders: read at most N tokens of a calibration text (default 4096)",
    )


def check_calibration_options(args: argparse.Namespace) -> None:
    """Refuse ``--method gptq`` without ``--calibration`` (and the reverse) or a calibration file that is missing."""
    if args.method == "gptq" and args.calibration is None:
        raise UsageError("--method gptq needs --calibration TEXT_OR_NPZ (the model's inputs)")
    if args.method != "gptq" and (args.calibration is not None or args.calibration_tokens is not None):
        raise UsageError(f"--calibration is used by --method gptq only, not by --method {args.method}")
    if args.calibration is not None and not args.calibration.is_file():
        raise CLIError(f"{args.calibration}: calibration file not found")


def add_external_data_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--external-data`` / ``--no-external-data`` (``args.external_data``: ``True``, ``False`` or ``None``)."""
    parser.add_argument(
        "--external-data",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write the tensors to OUT.data beside OUT (--no-external-data: inside OUT; "
        "default: when the input or the output exceeds 2 GB)",
    )


def check_output_path(path: Path) -> None:
    """Refuse an output path that cannot be written before any work is done."""
    if path.is_dir():
        raise CLIError(f"{path}: is a directory (OUT must be a file path)")
    if not path.absolute().parent.is_dir():
        raise CLIError(f"{path}: directory {path.absolute().parent} does not exist")


def print_written(output: Path, input_bytes: int | None = None) -> None:
    """Print ``wrote OUT: SIZE`` (``INPUT -> SIZE`` when ``input_bytes`` is given), external data included."""
    before = "" if input_bytes is None else f"{format_bytes(input_bytes)} -> "
    print(f"wrote {output}: {before}{format_bytes(file_bytes(output))}")


def quantize_options(args: argparse.Namespace, **settings: Any) -> QuantizeOptions:
    """:class:`QuantizeOptions` from the options of :func:`add_quantize_options` and ``settings``; options that do
    not go together raise :class:`UsageError`."""
    if args.double_quant and settings.get("format", "onnx_nf4") != "onnx_nf4":
        raise UsageError(
            "--double-quant needs --format onnx_nf4 (com.microsoft::MatMulBnb4 has no double quantization)"
        )
    if settings.get("accuracy_level") and settings.get("format", "onnx_nf4") != "onnx_nf4":
        raise UsageError("--accuracy-level 4 needs --format onnx_nf4 (com.microsoft::MatMulBnb4 has no accuracy level)")
    try:
        return QuantizeOptions(**quantize_kwargs(args), **settings)
    except ValueError as err:
        raise UsageError(str(err)) from None


def print_folder_reports(reports: Mapping[str, QuantizationReport], source: Path | None, output: Path) -> None:
    """Each model file's report, then ``wrote OUT_DIR: SIZE`` (``SOURCE -> SIZE`` with a source folder)."""
    for name, report in reports.items():
        print(f"{name}:")
        print(format_quantization_report(report))
        print()
    before = "" if source is None else f"{format_bytes(folder_bytes(source))} -> "
    print(f"wrote {output}: {before}{format_bytes(folder_bytes(output))}")


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under ``folder``."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


#: A model file at least this large holds its tensors itself: its size is not worth parsing it for external data.
_EMBEDDED_MODEL_BYTES = 16 << 20


def file_bytes(path: Path) -> int:
    """Bytes of the model file plus the external data files its tensors reference (0 if unreadable).

    Only a small model file is parsed (external data keeps the ``.onnx`` file small), so that a large model is
    never read twice.
    """
    try:
        size = path.stat().st_size
        if size >= _EMBEDDED_MODEL_BYTES:
            return size
        model = ir.load(path)
        data_files = {Path(tensor.path) for tensor in external_tensors(model)}
        return size + sum(file.stat().st_size for file in data_files)
    except (OSError, ValueError, DecodeError):
        return 0


class Progress:
    """A tqdm bar on stderr fed by ``quantize_model``'s ``on_progress(done, total, layer)``; inert when disabled.

    The bar starts when the ``with`` block does (its total is set by the first update), so its first rate covers
    the work done until then rather than the instant between the bar's creation and its first update.
    """

    def __init__(self, enabled: bool, stream: TextIO | None = None, *, unit: str = "layer") -> None:
        self._enabled = enabled
        self._stream = stream
        self._unit = unit
        self._bar: Any = None

    def update(self, done: int, total: int, layer: str) -> None:
        if self._bar is None:
            return
        if done < self._bar.n:  # the next model of a genai folder
            self._bar.reset(total=total)
        elif self._bar.total != total:
            self._bar.total = total
        self._bar.set_postfix_str(layer[-40:], refresh=False)
        self._bar.update(done - self._bar.n)

    def __enter__(self) -> Progress:
        if self._enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=None,
                unit=self._unit,
                file=self._stream or sys.stderr,
                leave=False,
                mininterval=0,
                dynamic_ncols=True,
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()
