"""Perplexity of an onnxruntime-genai model folder on a text (``onnx-nf4 perplexity``, :func:`perplexity`).

The ``llama-perplexity`` of this package, for any folder onnxruntime-genai loads: the builder's own float32 and
int4 folders, and every folder this package writes (``MatMulNF4`` with the op library in the folder, or
``com.microsoft::MatMulBnb4``).

How the text is scored:

1. The text is tokenized with the folder's tokenizer (``tokenizer.json`` through the ``tokenizers`` library; no
   special token is added), giving one stream of ``n`` tokens.
2. The stream is cut into consecutive, non-overlapping windows of ``window`` tokens (the last one holds what is
   left; a last window of a single token is dropped).
3. Each window is one prefill of the decoder (plain onnxruntime, empty past key/values, ``attention_mask`` all
   ones, ``position_ids`` ``0 .. w-1`` when the graph has that input): token ``i`` of a window (``i >= 1``) is
   predicted from tokens ``0 .. i-1`` of the same window only. Every token but the first of each window is
   scored, ``w - 1`` per window. (llama.cpp scores only the second half of each window, which gives every
   scored token at least ``window / 2`` tokens of context and a lower perplexity; the figures are not
   comparable.)
4. ``perplexity = exp(-mean log p(token))`` over the scored tokens, with the log-softmax of the float32 logits
   computed in float64.

The windows and the scoring are fixed by the token stream and ``window`` alone, so two folders of the same
checkpoint (same tokenizer) are compared on exactly the same predictions.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import GenaiFolderError, decoder_section, read_genai_config
from .prefill import decoder_inputs, prefill_feed

__all__ = [
    "DEFAULT_WINDOW",
    "DecoderSession",
    "PerplexityResult",
    "load_tokenizer",
    "log_probabilities",
    "perplexity",
    "token_windows",
]

#: Tokens per window when none is given (llama.cpp's ``llama-perplexity`` default context is 512 as well).
DEFAULT_WINDOW = 512
#: The tokenizer file of a genai folder.
TOKENIZER_FILE = "tokenizer.json"

#: ``on_progress(done, total, what)`` after each window.
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class PerplexityResult:
    """The outcome of :func:`perplexity`.

    Attributes:
        perplexity: ``exp(-mean log p)`` over the scored tokens.
        nll: the mean negative log-likelihood (nats per scored token).
        tokens: the number of scored tokens (the text's tokens less one per window).
        text_tokens: the number of tokens of the text.
        windows: the number of windows (model runs).
        window: the window size asked for (tokens).
        seconds: wall time of the model runs (tokenization and session creation left out).
        tokens_per_second: ``text_tokens / seconds`` (prefill throughput).
    """

    perplexity: float
    nll: float
    tokens: int
    text_tokens: int
    windows: int
    window: int
    seconds: float
    tokens_per_second: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_tokenizer(folder: str | os.PathLike[str]) -> Callable[[str], list[int]]:
    """``encode(text) -> token ids`` with the folder's ``tokenizer.json`` (no special tokens added).

    Raises:
        GenaiFolderError: the folder has no ``tokenizer.json`` or it cannot be read.
    """
    path = Path(folder) / TOKENIZER_FILE
    if not path.is_file():
        raise GenaiFolderError(f"{folder}: no {TOKENIZER_FILE} (the folder's tokenizer)")
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:  # the tokenizers library raises its own exception type
        raise GenaiFolderError(f"{path}: not a readable tokenizer ({err})") from None
    return lambda text: list(tokenizer.encode(text, add_special_tokens=False).ids)


def token_windows(ids: np.ndarray, window: int) -> Iterator[np.ndarray]:
    """The consecutive non-overlapping windows of ``ids`` (``window`` tokens; the last shorter; none of 1 token)."""
    if window < 2:
        raise ValueError(f"the window must hold at least 2 tokens, got {window}")
    for start in range(0, len(ids), window):
        part = ids[start : start + window]
        if len(part) >= 2:
            yield part


def log_probabilities(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``log softmax(logits[i])[targets[i]]`` for each row (float64 ``[rows]``); ``logits`` is ``[rows, vocab]``.

    Computed in float64 row chunks (a few MB at a time).
    """
    rows = logits.shape[0]
    out = np.empty(rows, dtype=np.float64)
    step = max(1, (1 << 21) // max(1, logits.shape[1]))
    for start in range(0, rows, step):
        x = np.asarray(logits[start : start + step], dtype=np.float64)
        top = x.max(axis=1, keepdims=True)
        log_sum = np.log(np.exp(x - top).sum(axis=1)) + top[:, 0]
        out[start : start + step] = x[np.arange(x.shape[0]), targets[start : start + step]] - log_sum
    return out


class DecoderSession:
    """The decoder of a genai folder in plain onnxruntime, run as a prefill (:mod:`onnx_nf4.genai.prefill`).

    The op library named by the decoder's ``session_options.custom_ops_library`` (inside the folder, where this
    package puts it) is registered; otherwise stock onnxruntime runs it.

    Raises:
        GenaiFolderError: the folder or its config cannot be used, or onnxruntime cannot load the model.
    """

    def __init__(self, folder: str | os.PathLike[str], *, threads: int = 0):
        import onnxruntime as ort

        folder = Path(folder)
        decoder = decoder_section(folder)
        self.path = folder / decoder["filename"]
        self.head_size = int(decoder.get("head_size") or 0)
        self.input_ids = (decoder.get("inputs") or {}).get("input_ids", "input_ids")
        self.logits = (decoder.get("outputs") or {}).get("logits", "logits")
        self.inputs = decoder_inputs(self.path)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        library = (decoder.get("session_options") or {}).get("custom_ops_library")
        if library:
            library_path = (folder / library).resolve()
            if not library_path.is_file():
                raise GenaiFolderError(f"{folder}: custom-op library {library!r} not found in the folder")
            options.register_custom_ops_library(str(library_path))
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime's own exception types
            raise GenaiFolderError(f"{self.path}: onnxruntime cannot load the decoder ({err})") from None

    def logits_of(self, ids: np.ndarray) -> np.ndarray:
        """The logits of one prefill of ``ids`` (int ``[length]``): float32 ``[length, vocab]``."""
        given = {self.input_ids: np.asarray(ids, dtype=np.int64)[None, :]}
        feed = prefill_feed(self.inputs, given, input_ids=self.input_ids, head_size=self.head_size)
        (logits,) = self.session.run([self.logits], feed)
        return np.asarray(logits[0], dtype=np.float32)


def perplexity(
    folder: str | os.PathLike[str],
    text: str,
    *,
    window: int | None = None,
    threads: int = 0,
    max_tokens: int | None = None,
    on_progress: Progress | None = None,
) -> PerplexityResult:
    """Perplexity of the genai model ``folder`` on ``text`` (see the module docstring for the scoring).

    Args:
        folder: an onnxruntime-genai model folder (``genai_config.json``, the decoder, ``tokenizer.json``).
        text: the text to score.
        window: tokens per window (one prefill each), at least 2; ``None``: :data:`DEFAULT_WINDOW`, or the
            config's ``context_length`` when that is shorter.
        threads: onnxruntime intra-op threads (0: onnxruntime's default).
        max_tokens: score only the first ``max_tokens`` tokens of the text (``None``: all).
        on_progress: ``on_progress(done, total, "window i/n")`` after each window.

    Raises:
        GenaiFolderError: an unusable folder (see :class:`DecoderSession`, :func:`load_tokenizer`).
        ValueError: ``window < 2`` or above the config's ``context_length``, or the text has fewer than 2 tokens.
    """
    decoder_section(folder)  # a folder that is no genai model is reported as such, before its tokenizer
    context = read_genai_config(folder)["model"].get("context_length")
    if window is None:
        window = min(DEFAULT_WINDOW, context) if isinstance(context, int) and context >= 2 else DEFAULT_WINDOW
    if window < 2:
        raise ValueError(f"the window must hold at least 2 tokens, got {window}")
    if isinstance(context, int) and window > context:
        raise ValueError(f"the window ({window} tokens) exceeds the model's context length ({context})")
    ids = np.asarray(load_tokenizer(folder)(text), dtype=np.int64)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    windows = list(token_windows(ids, window))
    if not windows:
        raise ValueError(f"the text has {len(ids)} token(s); at least 2 are needed")
    decoder = DecoderSession(folder, threads=threads)
    total = 0.0
    scored = 0
    seconds = 0.0
    for index, part in enumerate(windows, 1):
        start = time.perf_counter()
        logits = decoder.logits_of(part)
        seconds += time.perf_counter() - start
        total += float(log_probabilities(logits[:-1], part[1:]).sum())
        scored += len(part) - 1
        if on_progress is not None:
            on_progress(index, len(windows), f"window {index}/{len(windows)}")
    nll = -total / scored
    text_tokens = sum(len(part) for part in windows)
    return PerplexityResult(
        perplexity=math.exp(nll),
        nll=nll,
        tokens=scored,
        text_tokens=text_tokens,
        windows=len(windows),
        window=window,
        seconds=seconds,
        tokens_per_second=text_tokens / seconds if seconds > 0 else float("inf"),
    )
