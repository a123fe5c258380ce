"""The top layer, the ``onnx-nf4`` command line (also ``python -m onnx_nf4``): one module per subcommand.

:mod:`.entry` builds the parser from the subcommand modules (:mod:`.quantize`, :mod:`.inspect`, :mod:`.dequantize`,
:mod:`.info`, :mod:`.export_bnb`, :mod:`.export_genai`) and maps expected failures to one-line errors;
:mod:`.common` holds what they share (errors, options, progress bar) and :mod:`.report_text` / :mod:`.text_table`
the plain-text output. May import every other layer; nothing imports it.
"""

from .entry import main

__all__ = ["main"]
