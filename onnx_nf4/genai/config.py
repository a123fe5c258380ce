"""The ``genai_config.json`` of an onnxruntime-genai model folder: reading it, its decoder, the models it names.

Layer 7 (:mod:`onnx_nf4.genai`), below :mod:`.folder`, :mod:`.perplexity` and :mod:`.calibration`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "DECODER_CALIBRATION",
    "GENAI_CONFIG",
    "GenaiFolderError",
    "config_sections",
    "decoder_section",
    "is_genai_folder",
    "model_filenames",
    "path_inside",
    "read_genai_config",
]

#: The configuration file that makes a folder an onnxruntime-genai model.
GENAI_CONFIG = "genai_config.json"

#: What ``--method gptq`` takes as calibration data for a genai decoder (in error messages).
DECODER_CALIBRATION = "a text file or an .npz of decoder inputs"


class GenaiFolderError(ValueError):
    """A folder that is not a usable onnxruntime-genai model, or an output folder that cannot be written."""


def is_genai_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a directory holding ``genai_config.json``."""
    return (Path(path) / GENAI_CONFIG).is_file()


def read_genai_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``genai_config.json`` of ``folder``.

    Raises:
        GenaiFolderError: ``folder`` is not a directory, has no config, or the config is not a JSON object.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise GenaiFolderError(f"{folder}: not a directory")
    path = folder / GENAI_CONFIG
    if not path.is_file():
        raise GenaiFolderError(f"{folder}: no {GENAI_CONFIG} (not an onnxruntime-genai model folder)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise GenaiFolderError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise GenaiFolderError(f"{path}: expected a JSON object with a 'model' section")
    return config


def decoder_section(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``model.decoder`` section of ``folder``'s config, whose ``filename`` names an existing file.

    Raises:
        GenaiFolderError: no usable config, no decoder section, or its model file is missing or outside the folder.
    """
    folder = Path(folder)
    decoder = read_genai_config(folder)["model"].get("decoder")
    if not isinstance(decoder, dict) or not isinstance(decoder.get("filename"), str):
        raise GenaiFolderError(f"{folder / GENAI_CONFIG}: no model.decoder.filename")
    if not path_inside(folder, decoder["filename"]).is_file():
        raise GenaiFolderError(f"{folder}: decoder model {decoder['filename']!r} not found")
    return decoder


def config_sections(node: Any) -> Iterator[dict[str, Any]]:
    """Every JSON object of ``node`` (recursively) that has a string ``"filename"`` ending in ``.onnx``."""
    if isinstance(node, dict):
        filename = node.get("filename")
        if isinstance(filename, str) and filename.endswith(".onnx"):
            yield node
        for value in node.values():
            yield from config_sections(value)
    elif isinstance(node, list):
        for value in node:
            yield from config_sections(value)


def model_filenames(config: Mapping[str, Any]) -> list[str]:
    """The ONNX model files a genai config names (``"filename"`` keys ending in ``.onnx``), in order, once each."""
    return list(dict.fromkeys(section["filename"] for section in config_sections(config.get("model", {}))))


def path_inside(folder: Path, name: str) -> Path:
    """``folder / name`` resolved; refused when it lies outside ``folder`` (a config naming ``../x.onnx``)."""
    path = (folder / name).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise GenaiFolderError(f"{folder / GENAI_CONFIG}: model file {name!r} is outside the folder")
    return path
