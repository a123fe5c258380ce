"""How NF4 codes and block scales are chosen: ``rtn`` (default) or ``gptq`` (calibration).

Every method writes the same format (the ``MatMulNF4`` layout: codes plus one float32 scale per block, or its
double-quantized form), so models from any method run on every kernel and, as ``com.microsoft::MatMulBnb4``, on
stock onnxruntime. Only the choice differs:

* ``rtn``: scale = the block's absmax, each code the nearest; byte for byte onnxruntime's
  ``MatMulBnb4Quantizer`` and bitsandbytes (:func:`onnx_nf4.codec.layout.quantize_weight`).
* ``gptq``: per block, the scale minimizing the block's squared error weighted towards its large weights
  (:mod:`onnx_nf4.methods.mse`, stored by :mod:`onnx_nf4.methods.storage`), then codes chosen row by row along K
  with error feedback weighted by the layer's input statistics ``H = X^T X`` (:mod:`onnx_nf4.methods.gptq`),
  collected on calibration data (:mod:`onnx_nf4.methods.calibration`).

:func:`encode_weight` applies one of them to one weight; :mod:`.calibrated` runs GPTQ over a whole model. A
weight GPTQ has no statistics for (e.g. a tied lm_head) gets the scale search alone, :data:`SCALE_SEARCH`. That
search is no longer a method of its own (``--method mse``): data-free, it measured worse than ``rtn`` on a real LLM
at block 32 (``docs/methods.md``), and a method that can lose to round-to-nearest is not offered.

Layer 4: owns the methods and calibration data (:mod:`.calibration`: loading, batching, ``X^T X`` per layer). May
import :mod:`onnx_nf4.model`, :mod:`onnx_nf4.op`, :mod:`onnx_nf4.codec` and :mod:`onnx_nf4.runtime`.
"""

from __future__ import annotations

import numpy as np

from ..codec.blockwise import pack_nibbles
from ..codec.codebook import NF4_ZERO_CODE
from ..codec.layout import QuantizedWeight, quantize_weight
from ..codec.validation import as_float_array, check_block_size, check_finite
from .gptq import DEFAULT_DAMP, PreparedHessian, gptq_codes
from .grid import reciprocal, scaled_codes
from .mse import block_errors, block_weights, search_scales
from .storage import store_scales

__all__ = [
    "DEFAULT_DAMP",
    "ENCODINGS",
    "METHODS",
    "SCALE_SEARCH",
    "PreparedHessian",
    "check_calibration",
    "check_method",
    "encode_flat_mse",
    "encode_weight",
    "weight_blocks",
]

#: How codes and block scales are chosen (:mod:`onnx_nf4.methods`; the format is the same for all): ``"rtn"``,
#: each element to its nearest code with the block's absmax as scale (byte for byte onnxruntime's quantizer);
#: ``"gptq"``, codes with error feedback on the layers' input statistics (needs calibration data, see
#: :func:`onnx_nf4.quantize_model`).
METHODS = ("rtn", "gptq")

#: The encoding of a ``gptq`` weight without statistics: the weighted scale search, then the nearest codes.
SCALE_SEARCH = "mse"

#: What :func:`encode_weight` takes: the methods and the scale search alone.
ENCODINGS = (*METHODS, SCALE_SEARCH)


def check_method(method: str) -> str:
    """Return ``method`` if it is one of :data:`METHODS`, else raise ``ValueError`` (saying why ``"mse"`` is gone)."""
    if method == SCALE_SEARCH:
        raise ValueError(
            "method 'mse' is no longer offered: data-free, it measured worse than rtn on a real LLM (docs/methods.md); "
            "use 'rtn', or 'gptq' with calibration data (its scales come from the same search)"
        )
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return method


def check_calibration(method: str, calibration: object, *, expected: str) -> None:
    """Raise ``ValueError`` unless ``calibration`` is given exactly when ``method`` needs it (``"gptq"`` only);
    ``expected`` says what the caller takes, for the message (e.g. ``"calibration=..."``)."""
    if method == "gptq" and calibration is None:
        raise ValueError(f"method 'gptq' needs calibration data ({expected})")
    if method != "gptq" and calibration is not None:
        raise ValueError(f"calibration data is used by method 'gptq' only, not by {method!r}")


def weight_blocks(w: np.ndarray, block_size: int) -> np.ndarray:
    """The blocks of ``w[K, N]`` in the ``MatMulNF4`` order: float32 ``[N * k_blocks, block_size]``.

    Block ``n * k_blocks + b`` holds ``w[b*bs : (b+1)*bs, n]``, zero-padded past K. A float32 copy of the weight.
    """
    K, N = w.shape
    k_blocks = -(-K // block_size)
    padded = np.zeros((N, k_blocks * block_size), dtype=np.float32)
    padded[:, :K] = w.T
    return padded.reshape(N * k_blocks, block_size)


def _pack(codes: np.ndarray, K: int, block_size: int) -> np.ndarray:
    """uint8 ``[N, k_blocks, bs // 2]`` from codes ``[N, >= K]``: padding codes forced to 7, high nibble first."""
    N = codes.shape[0]
    k_blocks = -(-K // block_size)
    full = np.full((N, k_blocks * block_size), NF4_ZERO_CODE, dtype=np.uint8)
    full[:, :K] = codes[:, :K]
    return pack_nibbles(full.reshape(-1)).reshape(N, k_blocks, block_size // 2)


def encode_weight(
    w: np.ndarray,
    block_size: int = 64,
    *,
    method: str = "rtn",
    double_quant: bool = False,
    hessian: np.ndarray | PreparedHessian | None = None,
    damp: float = DEFAULT_DAMP,
    act_order: bool = True,
    scale_dtype: type = np.float32,
    name: str = "weight",
) -> QuantizedWeight:
    """Quantize a ``MatMul`` weight ``w[K, N]`` with ``method`` into the ``MatMulNF4`` layout.

    Args:
        w: float16/32/64 weight ``[K, N]``.
        block_size: elements per block along K, a power of two in [16, 4096].
        method: one of :data:`ENCODINGS`: ``"rtn"``, ``"gptq"``, or :data:`SCALE_SEARCH` (see the package
            docstring).
        double_quant: store the scales as 8-bit codes (bitsandbytes' ``compress_statistics``).
        hessian: ``gptq`` only, required: ``X^T X`` of the layer's inputs, ``[K, K]``, or a
            :class:`~onnx_nf4.methods.gptq.PreparedHessian` (shared by the weights reading the same input; its
            own damping and order then apply).
        damp: ``gptq`` with a plain matrix: diagonal damping, a fraction of the mean of ``diag(H)``.
        act_order: ``gptq`` with a plain matrix: quantize the rows of ``w`` by decreasing ``H[k, k]``.
        scale_dtype: the dtype the scales are stored in without double quantization (float16 for
            ``MatMulBnb4`` with a float16 weight); codes are chosen for the rounded scale. ``rtn`` ignores it.
        name: the weight's name, for error messages.

    Raises:
        ValueError: bad method or block size, NaN/Inf in ``w``, a non-2-D ``w``, or ``gptq`` without a Hessian
            of shape ``[K, K]``.
        TypeError: ``w`` is not a float array.
    """
    if method not in ENCODINGS:
        raise ValueError(f"method must be one of {ENCODINGS}, got {method!r}")
    bs = check_block_size(block_size)
    w = as_float_array(w, name)
    if w.ndim != 2:
        raise ValueError(f"tensor {name!r}: a MatMul weight must be 2-D, got shape {w.shape}")
    if method == "rtn":
        return quantize_weight(w, bs, double_quant=double_quant, name=name)
    check_finite(w, name)
    K, N = (int(d) for d in w.shape)
    if method == "gptq":
        if hessian is None:
            raise ValueError(f"tensor {name!r}: method 'gptq' needs the Hessian of the layer's inputs")
        if not isinstance(hessian, PreparedHessian):
            hessian = PreparedHessian(hessian, damp=damp, act_order=act_order)
        if hessian.size != K:
            raise ValueError(f"tensor {name!r}: the Hessian is {hessian.size} x {hessian.size}, expected {K} x {K}")
    k_blocks = -(-K // bs)
    blocks = weight_blocks(w, bs)
    errors = (lambda scales: block_errors(blocks, scales, block_weights(blocks))) if double_quant else None
    stored = store_scales(search_scales(blocks).reshape(N, k_blocks), double_quant=double_quant,
                          dtype=scale_dtype, block_errors=errors)  # fmt: skip
    if method == SCALE_SEARCH:
        codes, _ = scaled_codes(blocks, reciprocal(stored.decoded.reshape(-1))[:, None])
        codes = codes.reshape(N, k_blocks * bs)
    else:
        assert isinstance(hessian, PreparedHessian)
        codes = gptq_codes(w, hessian, stored.decoded, bs)
    return QuantizedWeight(K, N, bs, _pack(codes, K, bs), stored.absmax, stored.nested)


def encode_flat_mse(
    w: np.ndarray, block_size: int = 64, *, scale_dtype: type = np.float32, name: str = "weight"
) -> tuple[np.ndarray, np.ndarray]:
    """The scale search alone (:data:`SCALE_SEARCH`) in the flat layout of :func:`onnx_nf4.quantize_blockwise`
    (``com.microsoft``).

    Blocks are ``block_size`` consecutive elements of ``w.reshape(-1)`` (the last one may be partial; it is
    searched as if zero-padded), so they may run across rows. Returns ``(packed uint8 [(n + 1) // 2],
    absmax [ceil(n / block_size)] of scale_dtype)``; codes are chosen for the scale rounded to ``scale_dtype``.
    """
    bs = check_block_size(block_size)
    w = as_float_array(w, name)
    check_finite(w, name)
    flat = w.reshape(-1).astype(np.float32)
    n = flat.size
    blocks = np.zeros((-(-n // bs), bs), dtype=np.float32)
    blocks.reshape(-1)[:n] = flat
    stored = store_scales(search_scales(blocks)[None, :], dtype=scale_dtype)
    codes, _ = scaled_codes(blocks, reciprocal(stored.decoded.reshape(-1))[:, None])
    return pack_nibbles(codes.reshape(-1)[:n]), stored.absmax.reshape(-1)
