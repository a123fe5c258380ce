"""onnxruntime-genai model folders: quantize every model a folder's ``genai_config.json`` names.

An onnxruntime-genai folder holds ``genai_config.json``, the ONNX model(s) it names (``model.decoder.filename``,
and for multi-model pipelines further ``filename`` entries), their external data, the tokenizer files and anything
else. :func:`quantize_genai_folder` writes a new folder that ``onnxruntime_genai.Model(out_dir)`` loads as it is:

* every ``.onnx`` file named by a ``"filename"`` key anywhere in the config is quantized (with the options of
  :func:`onnx_nf4.quantize_model`), keeping external data when the input had it;
* every other file is copied (external data files of the quantized models are rewritten, not copied);
* with format ``onnx_nf4``, the custom-op library is copied into the folder and the ``session_options`` of every
  config section whose model received ``MatMulNF4`` nodes get ``"custom_ops_library": "<library file name>"``
  (onnxruntime-genai accepts only a library inside the model folder; a relative path is resolved there). Format
  ``com.microsoft`` (``MatMulBnb4``) runs on stock onnxruntime: no library is copied.

The folder is assembled in a temporary sibling directory and renamed into place when complete, so a failure leaves
no partial ``out_dir``. ``out_dir`` must not exist or be an empty directory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..methods import check_calibration
from ..model.io import external_tensors, load_model
from ..passes import ProgressCallback
from ..passes.options import QuantizeOptions
from ..passes.report import QuantizationReport
from .config import (
    DECODER_CALIBRATION,
    GENAI_CONFIG,
    GenaiFolderError,
    config_sections,
    decoder_section,
    is_genai_folder,
    model_filenames,
    path_inside,
    read_genai_config,
)

__all__ = [
    "GENAI_CONFIG",
    "GenaiFolderError",
    "decoder_section",
    "is_genai_folder",
    "model_filenames",
    "quantize_genai_folder",
    "read_genai_config",
    "require_library",
    "write_genai_folder",
]

#: ``quantize_file(source, destination, external_data) -> report``: writes the quantized model ``destination``.
QuantizeFile = Callable[[Path, Path, bool | None], QuantizationReport]


def _data_files(model_path: Path) -> set[Path]:
    """The external data files of ``model_path`` (resolved)."""
    return {Path(tensor.path).resolve() for tensor in external_tensors(load_model(model_path))}


def check_output_folder(out_dir: Path) -> None:
    """Refuse an ``out_dir`` that exists and is not an empty directory, or whose parent does not exist."""
    if out_dir.exists() and not out_dir.is_dir():
        raise GenaiFolderError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise GenaiFolderError(f"{out_dir}: exists and is not empty (give a new or empty folder)")
    if not out_dir.absolute().parent.is_dir():
        raise GenaiFolderError(f"{out_dir}: parent directory {out_dir.absolute().parent} does not exist")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _files_to_copy(in_dir: Path, skip: set[Path]) -> list[Path]:
    """The files of ``in_dir`` (recursively) other than ``skip``, listed before anything is written."""
    return [path for path in sorted(in_dir.rglob("*")) if path.is_file() and path.resolve() not in skip]


def _copy(files: list[Path], in_dir: Path, stage: Path) -> None:
    for source in files:
        target = stage / source.relative_to(in_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def _set_library(config: dict[str, Any], filenames: set[str], library_name: str) -> None:
    for section in config_sections(config.get("model", {})):
        if section["filename"] not in filenames:
            continue
        options = section.setdefault("session_options", {})
        current = options.get("custom_ops_library")
        if current and Path(current).name != library_name:
            raise GenaiFolderError(
                f"{GENAI_CONFIG}: the session of {section['filename']!r} already loads custom-op library "
                f"{current!r}; onnxruntime-genai loads one library per session"
            )
        options["custom_ops_library"] = library_name


def require_library(options: QuantizeOptions) -> None:
    """Fail before any work when ``options`` write ``MatMulNF4`` nodes but the op library is not built.

    Raises:
        onnx_nf4.runtime.CustomOpLibraryNotFoundError: as :func:`onnx_nf4.custom_op_library`.
    """
    if options.format == "onnx_nf4":
        from ..runtime.library import custom_op_library

        custom_op_library()


def write_genai_folder(
    in_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    quantize_file: QuantizeFile,
) -> dict[str, QuantizationReport]:
    """Write ``out_dir``: ``in_dir`` with each config-named model replaced by ``quantize_file``'s output.

    ``quantize_file(source, destination, external_data)`` writes one model (``external_data`` is ``True`` when the
    source has external data, else ``None``) and returns its report. When a model received ``onnx_nf4::MatMulNF4``
    nodes, the custom-op library is copied into ``out_dir`` and set as ``custom_ops_library`` of that model's
    session. Returns the reports by model file name.

    Raises:
        GenaiFolderError: ``in_dir`` is not a genai folder, a named model is missing or outside it, or ``out_dir``
            exists and is not empty.
        onnx_nf4.runtime.CustomOpLibraryNotFoundError: the library is needed but not built.
    """
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    config = read_genai_config(in_dir)
    check_output_folder(out_dir)
    if out_dir.resolve() == in_dir.resolve():
        raise GenaiFolderError(f"{out_dir}: the output folder must differ from the input folder")
    names = model_filenames(config)
    if not names:
        raise GenaiFolderError(f"{in_dir / GENAI_CONFIG}: names no .onnx model file")
    sources = {name: path_inside(in_dir, name) for name in names}
    for name, source in sources.items():
        if not source.is_file():
            raise GenaiFolderError(f"{in_dir / GENAI_CONFIG}: model file {name!r} not found in {in_dir}")
    data_of = {name: _data_files(source) for name, source in sources.items()}
    other_models = [p for p in in_dir.rglob("*.onnx") if p.resolve() not in set(sources.values())]
    still_needed = set().union(*(_data_files(p) for p in other_models)) if other_models else set()
    skip = (set(sources.values()) | set().union(*data_of.values())) - still_needed
    skip.add((in_dir / GENAI_CONFIG).resolve())
    files = _files_to_copy(in_dir, skip)

    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.absolute().parent))
    os.chmod(stage, 0o777 & ~_umask())  # mkdtemp makes it private; the folder gets a new directory's mode
    try:
        reports: dict[str, QuantizationReport] = {}
        for name, source in sources.items():
            target = stage / name
            target.parent.mkdir(parents=True, exist_ok=True)
            reports[name] = quantize_file(source, target, True if data_of[name] else None)
        _copy(files, in_dir, stage)
        with_library = {name for name, report in reports.items() if report.format == "onnx_nf4" and report.layers}
        if with_library:
            from ..runtime.library import custom_op_library

            library = Path(custom_op_library())
            shutil.copy2(library, stage / library.name)
            _set_library(config, with_library, library.name)
        (stage / GENAI_CONFIG).write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")
        if out_dir.is_dir():
            out_dir.rmdir()  # empty (checked above); a concurrent writer makes this fail instead of mixing files
        os.replace(stage, out_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return reports


def quantize_genai_folder(
    in_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    options: QuantizeOptions | None = None,
    *,
    block_size: int | None = None,
    double_quant: bool | None = None,
    format: str | None = None,
    exclude: Iterable[str] | None = None,
    min_elements: int | None = None,
    accuracy_level: int | None = None,
    method: str | None = None,
    calibration: str | os.PathLike[str] | None = None,
    calibration_tokens: int | None = None,
    calibration_passes: int | None = None,
    on_progress: ProgressCallback | None = None,
) -> dict[str, QuantizationReport]:
    """Quantize an onnxruntime-genai model folder into a new folder that onnxruntime-genai loads as it is.

    Args:
        in_dir: a folder holding ``genai_config.json`` and the models it names.
        out_dir: the folder to create (it must not exist, or be empty).
        options: the :class:`~onnx_nf4.QuantizeOptions` of every model; the keyword arguments override its
            fields as in :func:`onnx_nf4.quantize_model`. ``external_data`` ``None`` (default) keeps each model's
            layout: a model with external data is written with external data.
        calibration: ``method="gptq"``: a text file or an ``.npz`` of decoder inputs
            (:func:`onnx_nf4.genai.calibration.decoder_calibration`); only the decoder is calibrated, so a folder
            naming other models is refused.
        calibration_tokens: at most this many tokens of a calibration text (default
            :data:`~onnx_nf4.genai.calibration.DEFAULT_CALIBRATION_TOKENS`).
        calibration_passes: runs of the decoder over the calibration data (default
            :data:`~onnx_nf4.genai.calibration.DEFAULT_CALIBRATION_PASSES`).
        on_progress: ``on_progress(done, total, weight_name)``, per model file.

    Returns:
        The :class:`~onnx_nf4.passes.report.QuantizationReport` of each model, by its file name in the config.

    Raises:
        GenaiFolderError: see :func:`write_genai_folder`.
        ValueError: invalid quantization options (before anything is written).
        onnx_nf4.runtime.CustomOpLibraryNotFoundError: format ``onnx_nf4`` but the op library is not built.
    """
    from ..api import quantize_model

    options = QuantizeOptions.build(
        options,
        block_size=block_size,
        double_quant=double_quant,
        format=format,
        exclude=exclude,
        min_elements=min_elements,
        accuracy_level=accuracy_level,
        method=method,
    )
    check_calibration(options.method, calibration, expected=DECODER_CALIBRATION)
    require_library(options)
    batches = None
    if calibration is not None:
        from .calibration import DEFAULT_CALIBRATION_PASSES, DEFAULT_CALIBRATION_TOKENS, decoder_calibration

        names = model_filenames(read_genai_config(in_dir))
        decoder = decoder_section(in_dir)["filename"]
        if names != [decoder]:
            raise GenaiFolderError(f"{in_dir}: method 'gptq' calibrates the decoder only; the config also names "
                                   f"{[name for name in names if name != decoder]}")  # fmt: skip
        batches = decoder_calibration(in_dir, calibration, max_tokens=calibration_tokens or DEFAULT_CALIBRATION_TOKENS)
        calibration_passes = calibration_passes or DEFAULT_CALIBRATION_PASSES

    def quantize_file(source: Path, target: Path, external_data: bool | None) -> QuantizationReport:
        file_options = options if options.external_data is not None else options.replace(external_data=external_data)
        _, report = quantize_model(source, target, file_options, calibration=batches,
                                   calibration_passes=calibration_passes, on_progress=on_progress)  # fmt: skip
        return report

    return write_genai_folder(in_dir, out_dir, quantize_file)
