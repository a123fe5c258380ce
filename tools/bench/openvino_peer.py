"""OpenVINO's own NF4 as a benchmark peer: NNCF weight compression of a float ONNX model, compiled for the CPU.

``compress_weights(mode=NF4, group_size=64, ratio=1.0, all_layers=True)`` turns every MatMul weight into NF4 codes
(``nf4`` constants, per-group float16 scales, group 64 along the reduction axis: the same format as MatMulNF4 with
block 64); the CPU plugin decompresses them inside its MatMul kernel. Everything here is optional: without the
``openvino`` and ``nncf`` packages (the ``bench`` extra), :func:`openvino_version` is ``None`` and the benchmarks
leave the column out.

The compiled model runs with ``threads`` inference threads, one stream, latency hint and no CPU pinning (the
onnxruntime sessions it is compared with do not pin either). The precision is OpenVINO's default unless given:
``bf16`` on CPUs with AVX512_BF16 or AMX, ``f32`` otherwise; ``precision="f32"`` forces float32 activations.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import numpy as np

NF4_GROUP_SIZE = 64


def openvino_version() -> str | None:
    """``"openvino X, nncf Y"``, or ``None`` when either is not installed."""
    try:
        import nncf
        import openvino
    except ImportError:
        return None
    return f"openvino {openvino.__version__.split('-')[0]}, nncf {nncf.__version__}"


def default_precision() -> str:
    """The CPU plugin's default inference precision on this machine (``"bf16"`` or ``"f32"``)."""
    import openvino as ov

    return str(ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")).lower()


def compile_nf4(
    onnx_model: bytes,
    input_shapes: Mapping[str, tuple[int, ...]],
    threads: int,
    precision: str | None = None,
) -> Callable[[Mapping[str, np.ndarray]], np.ndarray]:
    """Compress ``onnx_model``'s weights to NF4 with NNCF and compile it for the CPU.

    Args:
        onnx_model: a serialized float ONNX model.
        input_shapes: the static shape of each input, by name (OpenVINO compiles for fixed shapes).
        threads: inference threads (``INFERENCE_NUM_THREADS``).
        precision: ``"f32"`` / ``"bf16"``; ``None`` leaves OpenVINO's default (:func:`default_precision`).

    Returns:
        ``run(feeds) -> first output``: one inference, ``feeds`` keyed by input name.
    """
    import nncf
    import openvino as ov

    nncf.set_log_level(logging.ERROR)  # no per-model statistics table on stdout
    core = ov.Core()
    model = core.read_model(onnx_model, b"")
    model.reshape({name: list(shape) for name, shape in input_shapes.items()})
    model = nncf.compress_weights(
        model, mode=nncf.CompressWeightsMode.NF4, group_size=NF4_GROUP_SIZE, ratio=1.0, all_layers=True
    )
    config: dict[str, object] = {
        "INFERENCE_NUM_THREADS": threads,
        "NUM_STREAMS": 1,
        "PERFORMANCE_HINT": "LATENCY",
        "ENABLE_CPU_PINNING": False,
    }
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    request = core.compile_model(model, "CPU", config).create_infer_request()

    def run(feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        return request.infer(dict(feeds))[0]

    return run
