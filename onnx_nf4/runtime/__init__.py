"""Layer 0, the compiled custom-op library: where it is and ``SessionOptions`` that load it.

Owns :mod:`.library` (finding ``libonnx_nf4_ops`` and registering it with onnxruntime). Imports nothing of the
package, so every layer above (the compiled encoder's binding in :mod:`onnx_nf4.codec`, the op's system report in
:mod:`onnx_nf4.op`) may use it. ``onnx_nf4.runtime.session_options`` and ``onnx_nf4.runtime.custom_op_library``
are the documented paths.
"""

from .library import LIBRARY_ENV_VAR, CustomOpLibraryNotFoundError, custom_op_library, session_options

__all__ = ["LIBRARY_ENV_VAR", "CustomOpLibraryNotFoundError", "custom_op_library", "session_options"]
