"""The ``onnx-nf4`` command line (also ``python -m onnx_nf4``).

Subcommands:

* ``quantize IN OUT``: rewrite the MatMul/Gemm layers with constant weights to NF4 (``onnx_nf4::MatMulNF4`` or
  ``com.microsoft::MatMulBnb4``), with a progress bar on stderr and a per-layer report on stdout.
* ``inspect MODEL``: what is quantized, block sizes, bits per weight (either format, or a float model).
* ``dequantize IN OUT``: back to float ``MatMul`` (for debugging).
* ``info``: versions, the custom-op library, the CPU kernel set chosen, CUDA support (:mod:`onnx_nf4.sysinfo`).

Every expected failure (unreadable or invalid model, bad option, write error) is reported as one line
``onnx-nf4: error: ...`` on stderr with exit status 1, or 2 for a usage error (an unknown option, a bad value,
options that do not go together; the line names the command's ``--help``), never a traceback. Outputs are written
to a temporary file and renamed into place (:func:`onnx_nf4.model_io.save_model`), so ``OUT`` may equal ``IN``: the
input is replaced only once the new model is complete, and stays intact on any failure.

Other modules add subcommands through :data:`SUBCOMMAND_PROVIDERS` (see there).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

import onnx_ir as ir
from google.protobuf.message import DecodeError

from . import __version__
from .codec import check_block_size
from .model_io import external_tensors
from .model_summary import ModelSummary, summarize_model
from .options import ACCURACY_LEVELS, DEFAULT_MIN_ELEMENTS, FORMATS, METHODS, QuantizeOptions
from .report import QuantizationReport
from .text_table import format_bytes, render_table

__all__ = [
    "SUBCOMMAND_PROVIDERS",
    "CLIError",
    "UsageError",
    "add_external_data_option",
    "add_format_options",
    "add_quantize_options",
    "build_parser",
    "check_output_path",
    "main",
    "print_folder_reports",
    "print_written",
    "quantize_kwargs",
    "quantize_options",
]

PROG = "onnx-nf4"

#: Subcommands defined in other modules, as ``"module:function"``. ``function(subparsers)`` receives the
#: ``argparse`` sub-parsers action, adds its parser with ``subparsers.add_parser(...)`` and sets
#: ``parser.set_defaults(handler=...)``, where ``handler(args: argparse.Namespace) -> int | None`` runs the command
#: (``None`` means 0) and reports an expected failure by raising :class:`CLIError`, ``OSError`` or ``ValueError``.
#: The module is imported only when the parser is built, and skipped when it is absent, so it must import without
#: its optional dependencies (import them inside the handler).
SUBCOMMAND_PROVIDERS: list[str] = [
    "onnx_nf4.torch.cli:add_export_bnb_parser",
    "onnx_nf4.genai_cli:add_export_genai_parser",
    "onnx_nf4.sysinfo:add_info_parser",
]

# What a command may raise for a failure the user can fix; anything else is a bug and keeps its traceback.
_EXPECTED_ERRORS = (OSError, ValueError, DecodeError)


class CLIError(Exception):
    """A failure reported as one ``onnx-nf4: error: <message>`` line (exit status 1)."""


class UsageError(CLIError):
    """Options that do not go together: one line naming the command's ``--help``, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line naming the command's ``--help``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, _usage_line(message, self.prog))

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


def _usage_line(message: str, prog: str) -> str:
    return f"{PROG}: error: {message} (see '{prog} --help')\n"


# ----------------------------------------------------------------------------------------------------------------
# Argument types


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


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


# ----------------------------------------------------------------------------------------------------------------
# Parser


def build_parser() -> argparse.ArgumentParser:
    """The ``onnx-nf4`` argument parser, with the built-in subcommands and those of :data:`SUBCOMMAND_PROVIDERS`."""
    parser = _Parser(prog=PROG, description="NF4 (4-bit NormalFloat) weight quantization for ONNX models.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True

    quantize = subparsers.add_parser(
        "quantize",
        help="rewrite MatMul/Gemm layers with constant weights to NF4",
        description="Rewrite the MatMul/Gemm layers whose weight is a constant to NF4 and print a per-layer report. "
        "OUT may equal IN: the model is written to a temporary file and then renamed.",
    )
    quantize.add_argument(
        "input", metavar="IN", type=Path, help="float ONNX model, or an onnxruntime-genai model folder"
    )
    quantize.add_argument(
        "output", metavar="OUT", type=Path, help="where to write the NF4 model (a new folder when IN is a folder)"
    )
    add_quantize_options(quantize)
    add_format_options(quantize)
    quantize.add_argument(
        "--method",
        choices=METHODS,
        default="rtn",
        help="how codes and block scales are chosen (same format): rtn = round to nearest at the absmax, "
        "byte for byte onnxruntime's quantizer (default); mse = per block, the scale minimizing its squared "
        "error (data-free); gptq = codes with error feedback on calibration data (needs --calibration)",
    )
    quantize.add_argument(
        "--calibration",
        metavar="FILE.npz",
        type=Path,
        help="--method gptq: one batch of the model's inputs, arrays named after the graph inputs "
        "(rows where an attention_mask input is 0 are left out)",
    )
    quantize.add_argument(
        "--min-elements",
        metavar="N",
        type=_non_negative_int,
        default=DEFAULT_MIN_ELEMENTS,
        help=f"leave weights with fewer than N elements in float (default {DEFAULT_MIN_ELEMENTS})",
    )
    add_external_data_option(quantize)
    quantize.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    quantize.set_defaults(handler=_cmd_quantize)

    inspect = subparsers.add_parser(
        "inspect",
        help="show what is quantized, block sizes and bits per weight",
        description="Show the quantized layers (either format), block sizes, bits per weight and the float "
        "MatMul/Gemm layers of a model.",
    )
    inspect.add_argument("model", metavar="MODEL", type=Path, help="ONNX model")
    inspect.set_defaults(handler=_cmd_inspect)

    dequantize = subparsers.add_parser(
        "dequantize",
        help="turn NF4 layers back into float MatMul (for debugging)",
        description="Replace every NF4 layer (either format) by a float MatMul with the decoded weight. "
        "OUT may equal IN.",
    )
    dequantize.add_argument("input", metavar="IN", type=Path, help="NF4 ONNX model")
    dequantize.add_argument("output", metavar="OUT", type=Path, help="where to write the float model")
    add_external_data_option(dequantize)
    dequantize.set_defaults(handler=_cmd_dequantize)

    for provider in SUBCOMMAND_PROVIDERS:
        _register_provider(provider, subparsers)
    return parser


# Options and steps shared with the subcommands of SUBCOMMAND_PROVIDERS.


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


def add_format_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--format`` and ``--accuracy-level`` (``args.format``, ``args.accuracy_level``)."""
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
        default=0,
        help="the MatMulNF4 accuracy_level attribute: 0 (default) computes in float32; 4 lets the CPU kernels "
        "quantize the activations to int8 per block (faster, slightly less exact; onnx_nf4 format only)",
    )


def quantize_kwargs(args: argparse.Namespace) -> dict[str, object]:
    """The keyword arguments ``block_size``, ``double_quant`` and ``exclude`` of :func:`add_quantize_options`."""
    return {"block_size": args.block_size, "double_quant": args.double_quant, "exclude": tuple(args.exclude or ())}


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
    print(f"wrote {output}: {before}{format_bytes(_file_bytes(output))}")


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


# ----------------------------------------------------------------------------------------------------------------
# Commands


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


def _cmd_quantize(args: argparse.Namespace) -> int:
    from .api import quantize_model

    options = quantize_options(
        args,
        format=args.format,
        min_elements=args.min_elements,
        external_data=args.external_data,
        accuracy_level=args.accuracy_level,
        method=args.method,
    )
    if args.method == "gptq" and args.calibration is None:
        raise UsageError("--method gptq needs --calibration FILE.npz (the model's inputs)")
    if args.method != "gptq" and args.calibration is not None:
        raise UsageError(f"--calibration is used by --method gptq only, not by --method {args.method}")
    if args.input.is_dir():
        if args.method == "gptq":
            raise UsageError("--method gptq calibrates one model file, not an onnxruntime-genai folder")
        return _quantize_folder(args, options)
    if args.calibration is not None and not args.calibration.is_file():
        raise CLIError(f"{args.calibration}: calibration file not found")
    check_output_path(args.output)
    input_bytes = _file_bytes(args.input)
    with _Progress(enabled=not args.quiet and sys.stderr.isatty()) as progress:
        _, report = quantize_model(
            args.input, args.output, options, calibration=args.calibration, on_progress=progress.update
        )
    print(format_quantization_report(report))
    print_written(args.output, input_bytes)
    return 0


def _quantize_folder(args: argparse.Namespace, options: QuantizeOptions) -> int:
    """``quantize IN_DIR OUT_DIR`` for an onnxruntime-genai model folder (:mod:`onnx_nf4.genai`)."""
    from .genai import GENAI_CONFIG, is_genai_folder, quantize_genai_folder

    if not is_genai_folder(args.input):
        raise CLIError(
            f"{args.input}: is a directory without {GENAI_CONFIG} "
            "(IN must be an ONNX model file or an onnxruntime-genai model folder)"
        )
    with _Progress(enabled=not args.quiet and sys.stderr.isatty()) as progress:
        reports = quantize_genai_folder(args.input, args.output, options, on_progress=progress.update)
    print_folder_reports(reports, args.input, args.output)
    return 0


def print_folder_reports(reports: Mapping[str, QuantizationReport], source: Path | None, output: Path) -> None:
    """Each model file's report, then ``wrote OUT_DIR: SIZE`` (``SOURCE -> SIZE`` with a source folder)."""
    for name, report in reports.items():
        print(f"{name}:")
        print(format_quantization_report(report))
        print()
    before = "" if source is None else f"{format_bytes(_folder_bytes(source))} -> "
    print(f"wrote {output}: {before}{format_bytes(_folder_bytes(output))}")


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .model_io import load_model

    model = load_model(args.model)
    print(f"{args.model}: {format_bytes(_file_bytes(args.model))}")
    print(format_model_summary(summarize_model(model)))
    return 0


def _cmd_dequantize(args: argparse.Namespace) -> int:
    from .api import dequantize

    check_output_path(args.output)
    input_bytes = _file_bytes(args.input)
    _, result = dequantize(args.input, args.output, external_data=args.external_data)
    if result.layers:
        print(f"dequantized {len(result.layers)} layer(s) to float MatMul")
    else:
        print(f"nothing to dequantize: {args.input} has no MatMulNF4 or MatMulBnb4 node (wrote it unchanged)")
    print_written(args.output, input_bytes)
    return 0


#: A model file at least this large holds its tensors itself: its size is not worth parsing it for external data.
_EMBEDDED_MODEL_BYTES = 16 << 20


def _file_bytes(path: Path) -> int:
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


# ----------------------------------------------------------------------------------------------------------------
# Rendering


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
    double = ", double quantization" if report.double_quant else ""
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


# ----------------------------------------------------------------------------------------------------------------
# Progress


class _Progress:
    """A tqdm bar on stderr fed by ``quantize_model``'s ``on_progress(done, total, layer)``; inert when disabled.

    The bar starts when the ``with`` block does (its total is set by the first update), so its first rate covers
    the work done until then rather than the instant between the bar's creation and its first update.
    """

    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        self._enabled = enabled
        self._stream = stream
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

    def __enter__(self) -> _Progress:
        if self._enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=None,
                unit="layer",
                file=self._stream or sys.stderr,
                leave=False,
                mininterval=0,
                dynamic_ncols=True,
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()


# ----------------------------------------------------------------------------------------------------------------
# Entry point


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 success, 1 failure, 2 usage error, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    try:
        status = args.handler(args)
    except UsageError as err:
        print(_usage_line(str(err), f"{PROG} {args.command}"), end="", file=sys.stderr)
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
