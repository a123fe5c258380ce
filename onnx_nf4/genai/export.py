"""transformers checkpoints to onnxruntime-genai NF4 folders (``onnx-nf4 export-genai``, :func:`export_genai`).

Two paths, both through onnxruntime-genai's model builder (``python -m onnxruntime_genai.models.builder``, the
optional extra ``genai``), which writes a float32 genai folder (``genai_config.json``, ``model.onnx`` with its
external data, the tokenizer):

* **A float checkpoint** is built and then quantized with the usual options
  (:func:`onnx_nf4.genai.folder.quantize_genai_folder`).
* **A bitsandbytes NF4 checkpoint** (``quantization_config`` with ``load_in_4bit`` and ``bnb_4bit_quant_type:
  nf4``, with or without ``bnb_4bit_use_double_quant``) keeps bitsandbytes' own bytes. Its weights are decoded
  exactly to float32 for the builder (:func:`onnx_nf4.genai.hf_checkpoint.write_float_checkpoint`); each builder
  ``MatMul`` weight ``W[K, N]`` is then matched by value to the layers it was built from: a run of columns of ``W``
  equal (bit for bit) to the decoded ``Wt[N_L, K]`` rows of layer ``L``. A fused projection (q/k/v, gate/up) is a
  concatenation of such runs along N, and since ``MatMulNF4`` blocks run along K inside one column, its NF4 weight
  is the concatenation of the layers' codes and absmax along N: every row of every bitsandbytes packed weight is
  a column of the ``MatMulNF4`` weight, byte for byte. A double-quantized layer has its own absmax offset, which
  one ``MatMulNF4`` node cannot hold for several layers, so double-quantized checkpoints are built with the
  builder's q/k/v fusion off (``fuse_qkv=false``): each projection keeps its double-quantized bytes in its own node.
  Weights bitsandbytes left in float (``lm_head`` by default) stay float unless ``quantize_float`` is set.

With ``adapters`` (peft LoRA folders by name), the targeted layers of the built model get LoRA graph inputs and
each adapter is written as ``adapters/<name>.onnx_adapter`` into the folder (:mod:`onnx_nf4.genai.adapters`): one
base serves every adapter, switched at run time.

Every step writes into temporary folders beside ``out_dir``; ``out_dir`` appears only when complete.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from ..codec.layout import QuantizedWeight, dequantize_weight
from ..methods import check_calibration
from ..model.io import load_model
from ..passes import ProgressCallback
from ..passes.options import QuantizeOptions
from ..passes.report import QuantizationReport
from .adapters import PreparedAdapters, builder_options_for_adapters
from .config import DECODER_CALIBRATION
from .folder import check_output_folder, quantize_genai_folder, require_library, write_genai_folder
from .hf_checkpoint import CheckpointError, checkpoint_kind, read_config, write_float_checkpoint

__all__ = [
    "BUILD_PRECISION",
    "CPU_ACCURACY_LEVEL",
    "EXECUTION_PROVIDERS",
    "BuilderError",
    "default_accuracy_level",
    "export_genai",
    "map_fused_weights",
    "run_builder",
]

#: The execution providers ``export_genai`` builds for (the builder's ``-e``), and the builder precision of each:
#: float32 on the CPU; float16 on CUDA, where the builder's GroupQueryAttention needs float16 or bfloat16.
BUILD_PRECISION = {"cpu": "fp32", "cuda": "fp16"}
_PRECISION_DTYPES = {"fp32": np.dtype(np.float32), "fp16": np.dtype(np.float16)}
EXECUTION_PROVIDERS = tuple(BUILD_PRECISION)
#: The ``accuracy_level`` of a float checkpoint's ``MatMulNF4`` nodes built for the CPU when none is asked for: 4,
#: int8 activations, as onnxruntime-genai's builder does for its int4 (on SmolLM2-135M: 1.5-1.8x the prefill speed
#: of float32 compute, a decode from 0.91x to 1.5x, for 2.1% more perplexity; docs/llm.md, "accuracy level").
CPU_ACCURACY_LEVEL = 4
_GRAPH_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


class BuilderError(RuntimeError):
    """onnxruntime-genai's model builder failed (the message holds its output) or is not installed."""


def run_builder(
    hf_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    precision: str = "fp32",
    execution_provider: str = "cpu",
    extra_options: Mapping[str, object] | None = None,
) -> Path:
    """Run ``python -m onnxruntime_genai.models.builder -i HF_DIR -o OUT_DIR -p PRECISION -e EP``; return OUT_DIR.

    ``extra_options`` become ``--extra_options KEY=VALUE ...`` (booleans as ``true`` / ``false``). The builder's
    cache folder (``-c``) is temporary. Raises :class:`BuilderError` with the builder's output when it fails, and
    :class:`~onnx_nf4.genai.hf_checkpoint.CheckpointError` when it does not support the checkpoint's architecture.
    """
    try:
        import onnxruntime_genai.models.builder  # noqa: F401  (present: the subprocess can run it)
    except ImportError as err:
        raise BuilderError(
            f"onnxruntime-genai's model builder is not installed ({err}); pip install 'onnx_nf4[genai]'"
        ) from None
    out = Path(out_dir)
    options = [
        f"{key}={str(value).lower() if isinstance(value, bool) else value}"
        for key, value in (extra_options or {}).items()
    ]
    with tempfile.TemporaryDirectory(prefix="onnx_nf4_builder_cache_") as cache:
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(Path(hf_dir).absolute())]
        cmd += ["-o", str(out.absolute()), "-p", precision, "-e", execution_provider, "-c", cache]
        if options:
            cmd += ["--extra_options", *options]
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=cache, check=False)
    if result.returncode != 0 or not (out / "genai_config.json").is_file():
        output = f"{result.stdout}\n{result.stderr}".strip()
        if "is not currently supported" in output:
            architecture = read_config(hf_dir).get("architectures", ["?"])[0]
            raise CheckpointError(
                f"architecture {architecture!r} is not supported by onnxruntime-genai's model builder"
            )
        tail = "\n".join(output.splitlines()[-20:])
        raise BuilderError(f"onnxruntime-genai's model builder failed (exit status {result.returncode}):\n{tail}")
    return out


def _concatenate(layers: list[tuple[str, QuantizedWeight]], weight_name: str) -> QuantizedWeight:
    """The ``MatMulNF4`` weight of layers fused along N (their columns side by side, bytes unchanged)."""
    if len(layers) == 1:
        return layers[0][1]
    first = layers[0][1]
    names = ", ".join(name for name, _ in layers)
    if any(q.nested is not None for _, q in layers):
        raise ValueError(
            f"graph weight {weight_name!r} fuses double-quantized layers ({names}); one MatMulNF4 node holds one "
            "absmax offset, so build without that fusion"
        )
    if any(q.K != first.K or q.block_size != first.block_size for _, q in layers):
        raise ValueError(f"graph weight {weight_name!r} fuses layers of different K or block size ({names})")
    return QuantizedWeight(
        K=first.K,
        N=sum(q.N for _, q in layers),
        block_size=first.block_size,
        packed=np.concatenate([q.packed for _, q in layers], axis=0),
        absmax=np.concatenate([q.absmax for _, q in layers], axis=0),
    )


def map_fused_weights(
    graph_weights: Mapping[str, np.ndarray], layers: Mapping[str, QuantizedWeight]
) -> tuple[dict[str, QuantizedWeight], dict[str, list[str]]]:
    """Match float ``MatMul`` weights to the NF4 layers whose decoded columns they are made of.

    Args:
        graph_weights: float ``W[K, N]`` by initializer name (float32, or float16 compared with the decoded
            float32 weights rounded to float16).
        layers: NF4 weights by layer name; layer ``L`` decodes to ``Wt_L[N_L, K]`` (``dequantize_weight(q).T``).

    Returns:
        ``(prequantized, sources)``: for each graph weight made entirely of whole layers' columns, in order, the
        concatenated NF4 weight (by initializer name) and the layer names it was built from. Graph weights that
        match no layer are left out (float layers).

    Raises:
        ValueError: a graph weight that starts like a layer but is not a concatenation of whole layers, or a
            layer used by no graph weight.
    """
    decoded32 = {name: np.ascontiguousarray(dequantize_weight(q).T) for name, q in layers.items()}
    decoded: dict[np.dtype, dict[str, np.ndarray]] = {}  # the decoded weights rounded to each graph dtype
    by_first_row: dict[np.dtype, dict[bytes, list[str]]] = {}
    for w in graph_weights.values():
        if w.dtype in _GRAPH_DTYPES and w.dtype not in decoded:
            decoded[w.dtype] = {name: wt.astype(w.dtype) for name, wt in decoded32.items()}
            by_first_row[w.dtype] = {}
            for name, wt in decoded[w.dtype].items():
                by_first_row[w.dtype].setdefault(wt[0].tobytes(), []).append(name)
    prequantized: dict[str, QuantizedWeight] = {}
    sources: dict[str, list[str]] = {}
    for weight_name, w in graph_weights.items():
        if w.dtype not in _GRAPH_DTYPES or w.ndim != 2:
            continue
        wt = np.ascontiguousarray(w.T)
        candidates, first_rows = decoded[w.dtype], by_first_row[w.dtype]
        found: list[str] = []
        column = 0
        while column < wt.shape[0]:
            match = next(
                (
                    name
                    for name in first_rows.get(wt[column].tobytes(), [])
                    if np.array_equal(wt[column : column + candidates[name].shape[0]], candidates[name])
                ),
                None,
            )
            if match is None:
                break
            found.append(match)
            column += candidates[match].shape[0]
        if not found:
            continue
        if column != wt.shape[0]:
            raise ValueError(
                f"graph weight {weight_name!r} [K={wt.shape[1]}, N={wt.shape[0]}]: columns 0..{column - 1} are the "
                f"NF4 layers {found}, but column {column} matches no layer"
            )
        prequantized[weight_name] = _concatenate([(name, layers[name]) for name in found], weight_name)
        sources[weight_name] = found
    used = {name for names in sources.values() for name in names}
    unused = [name for name in layers if name not in used]
    if unused:
        raise ValueError(
            f"{len(unused)} NF4 layer(s) appear in no MatMul weight of the built model, e.g. {unused[:3]}; the "
            "builder transformed their weights, so they cannot be mapped exactly"
        )
    return prequantized, sources


def _float_matmul_weights(model) -> dict[str, np.ndarray]:
    from ..torch.graph_weights import graph_weights

    return {
        weight.name: (weight.tensor.numpy().T if weight.transposed else weight.tensor.numpy())
        for weight in graph_weights(model)
    }


def default_accuracy_level(hf_dir: str | os.PathLike[str], execution_provider: str, format: str = "onnx_nf4") -> int:
    """The ``accuracy_level`` :func:`export_genai` writes when none is asked for: :data:`CPU_ACCURACY_LEVEL` for a
    float checkpoint built for the CPU in the ``onnx_nf4`` format; 0 (float32 compute) otherwise: for CUDA, for
    ``com.microsoft`` (``MatMulBnb4`` has no accuracy level) and for a bitsandbytes checkpoint, whose export computes
    what bitsandbytes computes. A folder whose config cannot be read gets the float checkpoint's level (the export
    then reports the folder)."""
    if execution_provider != "cpu" or format != "onnx_nf4":
        return 0
    try:
        bnb = checkpoint_kind(read_config(hf_dir)).bnb_nf4
    except CheckpointError:
        bnb = False
    return 0 if bnb else CPU_ACCURACY_LEVEL


def export_genai(
    hf_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    options: QuantizeOptions | None = None,
    *,
    execution_provider: str = "cpu",
    quantize_float: bool = False,
    builder_options: Mapping[str, object] | None = None,
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
    adapters: Mapping[str, str | os.PathLike[str]] | None = None,
) -> dict[str, QuantizationReport]:
    """Export a transformers checkpoint folder to an onnxruntime-genai folder with NF4 weights.

    Args:
        hf_dir: a transformers checkpoint folder (``save_pretrained``), float or bitsandbytes NF4.
        out_dir: the genai folder to create (must not exist, or be empty).
        options: the :class:`~onnx_nf4.QuantizeOptions`; the keyword arguments ``block_size`` ...
            ``accuracy_level`` override its fields as in :func:`onnx_nf4.quantize_model`. With a bitsandbytes
            checkpoint, ``block_size``, ``double_quant`` and ``min_elements`` apply to the ``quantize_float`` layers
            only (bitsandbytes' layers keep their own); ``format``, ``exclude`` and ``accuracy_level`` apply to all.
            With neither ``options`` nor ``accuracy_level``, the level is :func:`default_accuracy_level`'s (4 for a
            float checkpoint built for the CPU).
        execution_provider: ``"cpu"`` or ``"cuda"`` (the builder's ``-e``; the graph is built in float32 for the
            CPU and in float16 for CUDA, see :data:`BUILD_PRECISION`).
        quantize_float: for a bitsandbytes checkpoint, also quantize the layers it left float (``lm_head``); a
            float checkpoint is always quantized.
        builder_options: extra options for the model builder (its ``--extra_options``, e.g.
            ``{"fuse_mlp_gate_up": True}``).
        method, calibration, calibration_tokens, calibration_passes: a float checkpoint only, as in
            :func:`onnx_nf4.genai.folder.quantize_genai_folder` (``method="gptq"`` calibrates the built decoder on
            a text file, tokenized with the checkpoint's tokenizer, or an ``.npz`` of decoder inputs).
        on_progress: ``on_progress(done, total, layer)`` while a float checkpoint's folder is quantized.
        adapters: peft LoRA adapter folders by the name each is activated by: the targeted layers get LoRA graph
            inputs (rank 0, the base, when no adapter is active) and each adapter is written to
            ``adapters/<name>.onnx_adapter`` (see :mod:`onnx_nf4.genai.adapters`). The builder's q/k/v fusion is
            off unless ``builder_options`` sets ``fuse_qkv``.

    Returns:
        The quantization report of each model file of the folder.

    Raises:
        onnx_nf4.genai.hf_checkpoint.CheckpointError: not a checkpoint folder, 8-bit or FP4 bitsandbytes, another
            quantization method, or an architecture the builder does not support.
        BuilderError: the builder is not installed or failed.
        onnx_nf4.genai.folder.GenaiFolderError: ``out_dir`` exists and is not empty.
        ValueError: invalid options (before any work).
        onnx_nf4.runtime.CustomOpLibraryNotFoundError: format ``onnx_nf4`` but the op library is not built.
        onnx_nf4.torch.adapters.AdapterError: an adapter that is missing, unsupported, or for another base.
    """
    from ..torch.adapters import read_adapters

    if execution_provider not in EXECUTION_PROVIDERS:
        raise ValueError(f"execution_provider must be one of {EXECUTION_PROVIDERS}, got {execution_provider!r}")
    if accuracy_level is None and options is None:
        accuracy_level = default_accuracy_level(hf_dir, execution_provider, format or "onnx_nf4")
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
    lora = read_adapters(adapters)
    precision = BUILD_PRECISION[execution_provider]
    kind = checkpoint_kind(read_config(hf_dir))
    if kind.bnb_nf4 and options.method != "rtn":
        raise CheckpointError(
            f"method {options.method!r} chooses codes for float weights; a bitsandbytes checkpoint keeps its own"
        )
    out_dir = Path(out_dir)
    check_output_folder(out_dir)
    if kind.double_quant and options.format != "onnx_nf4":
        raise CheckpointError(
            "the checkpoint is double-quantized (bnb_4bit_use_double_quant), which com.microsoft::MatMulBnb4 "
            "cannot store; use format onnx_nf4"
        )
    extra_options = dict(builder_options or {})
    if kind.double_quant:
        extra_options.setdefault("fuse_qkv", False)
    if lora:
        extra_options = builder_options_for_adapters(extra_options)
    build = {"precision": precision, "execution_provider": execution_provider, "extra_options": extra_options}
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.", dir=out_dir.absolute().parent) as work:
        built = Path(work) / "genai_float"
        if not kind.bnb_nf4:
            _build(Path(hf_dir), built, build, PreparedAdapters(lora, Path(hf_dir), _PRECISION_DTYPES[precision]))
            return quantize_genai_folder(
                built,
                out_dir,
                options,
                calibration=calibration,
                calibration_tokens=calibration_tokens,
                calibration_passes=calibration_passes,
                on_progress=on_progress,
            )
        float_dir = Path(work) / "hf_float"
        layers = write_float_checkpoint(hf_dir, float_dir)
        _build(float_dir, built, build, PreparedAdapters(lora, float_dir, _PRECISION_DTYPES[precision]))

        def quantize_file(source: Path, target: Path, external_data: bool | None) -> QuantizationReport:
            from ..torch.graph_weights import quantize_with_prequantized

            model = load_model(source)
            prequantized, _ = map_fused_weights(_float_matmul_weights(model), layers)
            file_options = (
                options if options.external_data is not None else options.replace(external_data=external_data)
            )
            return quantize_with_prequantized(
                model, target, prequantized, quantize_float=quantize_float, options=file_options
            )

        return write_genai_folder(built, out_dir, quantize_file)


def _build(float_dir: Path, built: Path, build: Mapping, adapters: PreparedAdapters) -> None:
    """Run the builder on ``float_dir``; then give the built model its LoRA inputs and write the adapter files.

    ``adapters`` were checked against ``float_dir`` before (nothing to do without adapters).
    """
    run_builder(float_dir, built, **build)
    if adapters.adapters:
        adapters.add_to_folder(built)
