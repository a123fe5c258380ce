"""Calibration data for the decoder of a genai folder (``--method gptq --calibration TEXT_OR_NPZ``).

GPTQ needs the decoder's inputs (:mod:`onnx_nf4.methods.calibration`). For a genai folder they are given as

* a plain text file (UTF-8; anything but ``.npz``): tokenized with the folder's tokenizer
  (:func:`onnx_nf4.genai.perplexity.load_tokenizer`), cut into consecutive windows of ``window`` tokens (the same
  cut as ``onnx-nf4 perplexity``; at most the model's ``context_length``), at most ``max_tokens`` tokens in all,
  one window per batch;
* an ``.npz`` file holding ``input_ids [batch, sequence]`` and optionally other decoder inputs
  (``attention_mask``...), one batch.

Every batch is then completed into a prefill (:func:`onnx_nf4.genai.prefill.prefill_feed`: empty past
key/values, a mask of ones, positions from 0). A name that is not a decoder input is reported by the collector.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from ..methods.calibration import load_calibration_file
from .config import GenaiFolderError, decoder_section, read_genai_config
from .perplexity import DEFAULT_WINDOW, load_tokenizer, token_windows
from .prefill import decoder_inputs, prefill_feed

__all__ = ["DEFAULT_CALIBRATION_PASSES", "DEFAULT_CALIBRATION_TOKENS", "decoder_calibration"]

#: Calibration tokens read from a text by default: 8 windows of 512.
DEFAULT_CALIBRATION_TOKENS = 4096
#: Runs of the decoder over the calibration data (layer-by-layer GPTQ with its waves merged, see
#: :func:`onnx_nf4.methods.calibrated.quantize_with_calibration`): a run of a large decoder is expensive.
DEFAULT_CALIBRATION_PASSES = 8


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: calibration text is not UTF-8 ({err.reason} at byte {err.start})") from None


def decoder_calibration(
    folder: str | os.PathLike[str],
    source: str | os.PathLike[str],
    *,
    window: int = DEFAULT_WINDOW,
    max_tokens: int = DEFAULT_CALIBRATION_TOKENS,
) -> Callable[[], Iterator[dict[str, np.ndarray]]]:
    """The calibration batches of the decoder of ``folder`` from ``source`` (see the module docstring).

    Returns a function giving a fresh iterator over the completed feeds on each call (the form
    :func:`onnx_nf4.quantize_model` takes).

    Raises:
        ValueError: a text with fewer than 2 tokens, a text that is not UTF-8, an unreadable or empty ``.npz``.
        GenaiFolderError: an unusable folder, or an ``.npz`` without ``input_ids`` or with an input a prefill
            cannot make.
        OSError: ``source`` cannot be read.
    """
    folder, source = Path(folder), Path(source)
    decoder = decoder_section(folder)
    context = read_genai_config(folder)["model"].get("context_length")
    window = min(window, context) if isinstance(context, int) and context >= 2 else window
    inputs = decoder_inputs(folder / decoder["filename"])
    head_size = int(decoder.get("head_size") or 0)
    input_ids = (decoder.get("inputs") or {}).get("input_ids", "input_ids")
    if source.suffix.lower() == ".npz":
        batch = load_calibration_file(source)
        if input_ids not in batch:
            raise GenaiFolderError(
                f"{source}: a decoder's calibration needs {input_ids!r}; the file holds {sorted(batch)}"
            )
        batches = [batch]
    else:
        if max_tokens < 2:
            raise ValueError(f"at least 2 calibration tokens are needed, got max_tokens={max_tokens}")
        ids = np.asarray(load_tokenizer(folder)(_read_text(source)), dtype=np.int64)[:max_tokens]
        batches = [{input_ids: part[None, :]} for part in token_windows(ids, window)]
        if not batches:
            raise ValueError(f"{source}: the calibration text has {len(ids)} token(s); at least 2 are needed")
    feeds = [prefill_feed(inputs, batch, input_ids=input_ids, head_size=head_size) for batch in batches]
    return lambda: iter(feeds)
