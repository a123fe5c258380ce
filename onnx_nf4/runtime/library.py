"""Running rewritten models: the path of the compiled custom-op library and ``SessionOptions`` that load it.

The library (``libonnx_nf4_ops.so`` / ``onnx_nf4_ops.dll`` / ``libonnx_nf4_ops.dylib``) registers domain
``onnx_nf4`` with ``MatMulNF4`` on onnxruntime's CPU (and, when built with CUDA, CUDA) execution provider.
It is looked up, in order:

1. in the ``onnx_nf4`` package folder (installed there by ``pip install .``);
2. the path in the environment variable ``ONNX_NF4_LIBRARY``;
3. the development build ``build/dev`` of a source checkout (``tools/build_dev.sh``);
4. the library installed with the ``onnx_nf4`` distribution, when this module is imported from a source checkout
   that shadows the installed package (e.g. ``python -m pytest`` in the repository after ``pip install .``).
"""

from __future__ import annotations

import os
import sys
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnxruntime

__all__ = ["LIBRARY_ENV_VAR", "CustomOpLibraryNotFoundError", "custom_op_library", "session_options"]

LIBRARY_ENV_VAR = "ONNX_NF4_LIBRARY"

#: The ``onnx_nf4`` package folder, where ``pip install .`` puts the library.
_PACKAGE_DIR = Path(__file__).resolve().parent.parent
_DEV_BUILD_DIR = _PACKAGE_DIR.parent / "build" / "dev"


class CustomOpLibraryNotFoundError(FileNotFoundError):
    """The compiled custom-op library is neither installed, nor named by ``ONNX_NF4_LIBRARY``, nor built."""


def _library_file_name() -> str:
    if sys.platform == "win32":
        return "onnx_nf4_ops.dll"
    if sys.platform == "darwin":
        return "libonnx_nf4_ops.dylib"
    return "libonnx_nf4_ops.so"


def _distribution_library(name: str) -> Path:
    """Where ``pip install`` put the library of the installed ``onnx_nf4`` distribution (it may not exist)."""
    try:
        distribution = metadata.distribution("onnx_nf4")
    except metadata.PackageNotFoundError:
        return _PACKAGE_DIR / name
    return Path(str(distribution.locate_file(f"onnx_nf4/{name}"))).resolve()


def custom_op_library() -> str:
    """The absolute path of the ``onnx_nf4`` custom-op library, for ``SessionOptions.register_custom_ops_library``.

    Raises:
        CustomOpLibraryNotFoundError: no library was found; the message lists the places searched.
    """
    name = _library_file_name()
    installed = _PACKAGE_DIR / name
    if installed.is_file():
        return str(installed)
    searched = [str(installed)]
    env = os.environ.get(LIBRARY_ENV_VAR)
    if env:
        if Path(env).is_file():
            return str(Path(env).resolve())
        searched.append(f"{env} (from {LIBRARY_ENV_VAR})")
    dev = _DEV_BUILD_DIR / name
    if dev.is_file():
        return str(dev)
    searched.append(str(dev))
    distributed = _distribution_library(name)
    if distributed.is_file():
        return str(distributed)
    if str(distributed) not in searched:
        searched.append(str(distributed))
    raise CustomOpLibraryNotFoundError(
        "the onnx_nf4 custom-op library is not built; searched: "
        + ", ".join(searched)
        + f". Install the package with `pip install .`, run tools/build_dev.sh in a source checkout, or set "
        f"{LIBRARY_ENV_VAR} to the library's path."
    )


def session_options(
    options: onnxruntime.SessionOptions | None = None,
    *,
    intra_op_num_threads: int | None = None,
    **settings: Any,
) -> onnxruntime.SessionOptions:
    """``onnxruntime.SessionOptions`` with the ``onnx_nf4`` custom-op library registered.

    Args:
        options: options to extend (modified in place and returned); a new object when ``None``.
        intra_op_num_threads: threads of each op (the ``MatMulNF4`` kernel uses the session's intra-op pool);
            left as it is when ``None``.
        **settings: other ``SessionOptions`` attributes to set, e.g. ``graph_optimization_level=...``.

    Returns:
        The options, ready for ``onnxruntime.InferenceSession(model, sess_options=...)``.

    Raises:
        CustomOpLibraryNotFoundError: the library is not built.
        AttributeError: a name in ``settings`` is not a ``SessionOptions`` attribute.
    """
    import onnxruntime as ort

    so = options if options is not None else ort.SessionOptions()
    if intra_op_num_threads is not None:
        so.intra_op_num_threads = intra_op_num_threads
    for key, value in settings.items():
        if not hasattr(so, key):
            raise AttributeError(f"onnxruntime.SessionOptions has no attribute {key!r}")
        setattr(so, key, value)
    so.register_custom_ops_library(custom_op_library())
    return so
