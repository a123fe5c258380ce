"""Calibration data and the input statistics of the layers to quantize: ``H = X^T X`` per activation.

Calibration data is what a model is fed: dicts mapping graph input names to arrays. It is given as

* a path to an ``.npz`` file whose arrays are named after the graph inputs (one batch);
* a sequence of such dicts (one batch each);
* a callable returning an iterable of such dicts (called once per pass over the data, so a generator function
  works and nothing has to be held in memory).

:func:`collect_hessians` runs the float model in onnxruntime with the requested activations (the ``A`` inputs of
the layers to quantize) added as graph outputs, and reduces each one, batch by batch, to ``H = X^T X`` where
``X[rows, K]`` is the activation with its leading axes flattened: only the running sums (float64 ``[K, K]`` per
activation) and one batch's activations are ever held. Rows of padding can be left out: when a batch holds a 2-D
``attention_mask`` input ``[batch, sequence]`` and an activation's leading axes are exactly that shape, the rows
where the mask is 0 are dropped.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from ..model.io import PROTOBUF_LIMIT_BYTES, external_tensors, tensor_bytes

__all__ = [
    "ATTENTION_MASK",
    "ActivationCollector",
    "CalibrationData",
    "Hessian",
    "calibration_batches",
    "collect_hessians",
    "load_calibration_file",
]

#: A source of calibration batches, see the module docstring.
CalibrationData = (
    str | os.PathLike | Sequence[Mapping[str, np.ndarray]] | Callable[[], Iterable[Mapping[str, np.ndarray]]]
)

#: The input whose zeros mark padding rows.
ATTENTION_MASK = "attention_mask"


@dataclass
class Hessian:
    """The running ``X^T X`` of one activation.

    Attributes:
        matrix: float64 ``[K, K]``, the sum of ``x x^T`` over every calibration row ``x`` seen so far.
        rows: the number of rows summed.
    """

    matrix: np.ndarray
    rows: int = 0

    def add(self, x: np.ndarray) -> None:
        """Add the rows of ``x[rows, K]`` (products in float32, the sum kept in float64)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            self.matrix += x.T @ x
        self.rows += x.shape[0]


def load_calibration_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file as one calibration batch (names are graph input names).

    Raises:
        ValueError: the file cannot be read as ``.npz`` or holds no array.
        OSError: the file cannot be opened.
    """
    try:
        with np.load(Path(path), allow_pickle=False) as archive:
            batch = {name: archive[name] for name in archive.files}
    except (ValueError, EOFError, OSError) as err:
        if isinstance(err, FileNotFoundError | PermissionError | IsADirectoryError):
            raise
        raise ValueError(f"{path}: not a readable .npz file of calibration inputs ({err})") from None
    if not batch:
        raise ValueError(f"{path}: the calibration file holds no array")
    return batch


def calibration_batches(data: CalibrationData) -> Callable[[], Iterator[dict[str, np.ndarray]]]:
    """A function returning a fresh iterator over the batches of ``data`` on each call (see the module docstring).

    Raises:
        TypeError: ``data`` is none of the accepted kinds.
    """
    if isinstance(data, str | os.PathLike):
        batch = load_calibration_file(data)
        return lambda: iter([batch])
    if callable(data):
        source = data
        return lambda: (dict(batch) for batch in source())
    if isinstance(data, Sequence) and all(isinstance(batch, Mapping) for batch in data):
        batches = list(data)
        return lambda: (dict(batch) for batch in batches)
    raise TypeError(
        "calibration data must be a path to an .npz file, a sequence of dicts of input arrays, or a callable "
        f"returning an iterable of such dicts; got {type(data).__name__}"
    )


def _check_batch(
    batch: Mapping[str, np.ndarray], input_names: Sequence[str], index: int, optional: Sequence[str] = ()
) -> dict[str, np.ndarray]:
    """The feed of ``batch``: every name of ``input_names``, and those of ``optional`` (inputs with a default
    initializer, such as LoRA inputs) that it gives."""
    missing = [name for name in input_names if name not in batch]
    unknown = sorted(set(batch) - set(input_names) - set(optional))
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing input(s) {missing}")
        if unknown:
            parts.append(f"unknown name(s) {unknown}")
        raise ValueError(
            f"calibration batch {index}: {' and '.join(parts)}; the model's inputs are {list(input_names)}"
        )
    return {name: np.asarray(batch[name]) for name in [*input_names, *optional] if name in batch}


def _values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    values = {value.name: value for value in graph.inputs if value.name}
    for node in graph:
        values.update((out.name, out) for out in node.outputs if out.name)
    return values


class ActivationCollector:
    """One onnxruntime session of a model that can return its activations and take replacement weights.

    The session is built once from a copy of ``model`` in which the ``activations`` are added as graph outputs and
    the ``weights`` (initializer names) become overridable initializers (graph inputs with a default value), so
    each run may feed other values for them, e.g. the already quantized weights of layer-by-layer GPTQ. ``model``
    itself is left as it was.

    Raises:
        ValueError: an activation or weight that is not a value of the main graph.
    """

    def __init__(self, model: ir.Model, activations: Iterable[str], weights: Iterable[str] = ()):
        import onnxruntime as ort

        graph = model.graph
        values = _values_by_name(graph)
        wanted = list(dict.fromkeys(activations))
        unknown = [name for name in wanted if name not in values]
        overridable = [graph.initializers[name] for name in dict.fromkeys(weights) if name in graph.initializers]
        if unknown:
            raise ValueError(f"activation(s) {unknown} are not values of the main graph")
        # inputs with an initializer (overridable: a default value, e.g. LoRA inputs) are optional in a batch
        self.input_names = [value.name for value in graph.inputs if value.name and not value.is_initializer()]
        self._optional_inputs = [value.name for value in graph.inputs if value.name and value.is_initializer()]
        existing = {value.name for value in graph.outputs}
        added_outputs = [values[name] for name in wanted if name not in existing and name not in self.input_names]
        added_inputs = [value for value in overridable if not value.is_graph_input()]
        graph.outputs.extend(added_outputs)
        graph.inputs.extend(added_inputs)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            with tempfile.TemporaryDirectory(prefix="onnx_nf4_calibration_") as folder:
                # A model from bytes cannot reach external data files; one over 2 GB cannot be one protobuf.
                if tensor_bytes(model) > PROTOBUF_LIMIT_BYTES or any(True for _ in external_tensors(model)):
                    path = Path(folder) / "model.onnx"
                    ir.save(model, path, external_data="model.onnx.data")
                    source: str | bytes = str(path)
                else:
                    source = ir.serde.serialize_model(model).SerializeToString()
                try:
                    self._session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
                except Exception as err:  # onnxruntime's own exception types
                    raise ValueError(f"onnxruntime cannot load the float model to calibrate it: {err}") from err
        finally:
            for value in added_outputs:
                graph.outputs.remove(value)
            for value in added_inputs:
                graph.inputs.remove(value)

    def hessians(
        self,
        activations: Iterable[tuple[str, bool]],
        data: CalibrationData,
        *,
        weights: Mapping[str, np.ndarray] | None = None,
        exclude_padding: bool = True,
        on_batch: Callable[[int], None] | None = None,
    ) -> dict[tuple[str, bool], Hessian]:
        """Run the model on every calibration batch and sum ``X^T X`` of each requested activation.

        Args:
            activations: ``(value name, transposed)`` pairs, ``transposed`` when the layer reads the value
                transposed (Gemm ``transA=1``: ``X = A.T``).
            data: the calibration batches.
            weights: values fed for overridable weights (their dtype and shape), the others keep theirs.
            exclude_padding: drop the rows where the batch's ``attention_mask`` is 0 (see the module docstring).
            on_batch: called with the number of batches done after each one.

        Raises:
            ValueError: no batch, a batch whose names do not match the graph inputs, an activation that is not
                finite, or an activation whose last axis changes between batches.
        """
        wanted = list(dict.fromkeys(activations))
        fetch = [name for name in dict.fromkeys(name for name, _ in wanted) if name not in self.input_names]
        hessians: dict[tuple[str, bool], Hessian] = {}
        count = 0
        for count, batch in enumerate(calibration_batches(data)(), 1):
            feed = _check_batch(batch, self.input_names, count - 1, self._optional_inputs)
            mask = feed.get(ATTENTION_MASK) if exclude_padding else None
            mask = mask if mask is not None and mask.ndim == 2 else None
            try:
                outputs = self._session.run(fetch, {**feed, **(weights or {})}) if fetch else []  # [] fetches all
            except Exception as err:  # onnxruntime's own exception types (wrong dtype or shape of an input)
                raise ValueError(
                    f"calibration batch {count - 1}: onnxruntime cannot run the model on it: {err}"
                ) from err
            results = dict(zip(fetch, outputs, strict=True))
            for name, transposed in wanted:
                x = _rows(results[name] if name in results else feed[name], transposed, mask)
                h = hessians.setdefault((name, transposed), Hessian(np.zeros((x.shape[1],) * 2)))
                if h.matrix.shape[0] != x.shape[1]:
                    raise ValueError(f"activation {name!r} has {x.shape[1]} features in batch {count - 1}, "
                                     f"{h.matrix.shape[0]} before")  # fmt: skip
                if not np.all(np.isfinite(x)):
                    raise ValueError(
                        f"calibration batch {count - 1}: activation {name!r} holds NaN or Inf (the model overflows "
                        "on this input, or the input itself is not finite); GPTQ needs finite statistics"
                    )
                h.add(x)
                if not np.all(np.isfinite(np.einsum("ii->i", h.matrix))):
                    raise ValueError(
                        f"calibration batch {count - 1}: the statistics X^T X of activation {name!r} overflow "
                        f"float32 (largest magnitude {float(np.abs(x).max()):.3g}); GPTQ needs finite statistics"
                    )
            del results
            if on_batch is not None:
                on_batch(count)
        if count == 0:
            raise ValueError("the calibration data holds no batch")
        return hessians


def _rows(activation: np.ndarray, transposed: bool, mask: np.ndarray | None) -> np.ndarray:
    """The rows ``X[rows, K]`` of an activation (``A.T`` for Gemm's ``transA``), padding rows dropped."""
    a = np.asarray(activation)
    if transposed:
        return a.T
    x = a.reshape(-1, a.shape[-1])
    if mask is not None and a.ndim == 3 and a.shape[:2] == mask.shape:
        x = x[mask.reshape(-1) != 0]
    return x


def collect_hessians(
    model: ir.Model,
    activations: Iterable[tuple[str, bool]],
    data: CalibrationData,
    *,
    exclude_padding: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> dict[tuple[str, bool], Hessian]:
    """Run ``model`` (float) on the calibration data and sum ``X^T X`` for each requested activation.

    ``activations`` are ``(value name, transposed)`` pairs of the main graph; see
    :meth:`ActivationCollector.hessians` for the rest. ``model`` is unchanged on return.
    """
    wanted = list(dict.fromkeys(activations))
    collector = ActivationCollector(model, [name for name, _ in wanted])
    return collector.hessians(wanted, data, exclude_padding=exclude_padding, on_batch=on_batch)
