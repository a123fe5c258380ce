"""Generate a synthetic LLM-like float32 ONNX model whose weights live in external data, in bounded memory.

The graph is a decoder stack shaped like a LLaMA block, without the attention itself (what matters here is the
number, size and kind of the weights, and that the model runs)::

    x = Gather(embed_tokens, input_ids)                                  # [B, S, hidden]
    for each layer i:
        h = MatMul(MatMul(LayerNorm(x), layers.i.self_attn.q_proj), layers.i.self_attn.o_proj)
        x = x + h
        n = LayerNorm(x)
        x = x + MatMul(SiLU(MatMul(n, layers.i.mlp.gate_proj)) * MatMul(n, layers.i.mlp.up_proj),
                       layers.i.mlp.down_proj)
    logits = MatMul(LayerNorm(x), lm_head)                               # [B, S, vocab]

Every 2-D weight (the embedding table too, which stays float when quantized: it feeds a ``Gather``) is
normal(0, 0.02) float32, generated from a seed and written to the data file(s) chunk by chunk
(:data:`CHUNK_BYTES` at a time), so the generator's memory does not grow with the model. The ``.onnx`` file
references the data with ``location`` / ``offset`` / ``length`` entries: one data file ``<model>.data``, or one
file per weight (``--per-tensor-files``). The small LayerNorm parameters stay inside the protobuf.

The defaults (12 layers, hidden 2048, MLP 5632, vocabulary 32000) give 2.59 GB of float32 weights, the largest
single weight being the 262 MB embedding / ``lm_head``.

Usage: ``python tools/make_large_model.py OUT.onnx [--layers 12] [--hidden 2048] [--ffn 5632] [--vocab 32000]
[--per-tensor-files] [--seed 0]``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

__all__ = ["CHUNK_BYTES", "LargeModelInfo", "make_large_model", "weight_chunks", "weight_shapes"]

#: Bytes of weight data generated and written at a time.
CHUNK_BYTES = 16 * 2**20

#: Standard deviation of every generated weight (a typical initialization of a transformer's linear layers).
WEIGHT_STD = 0.02

OPSET = 18
IR_VERSION = 10


@dataclass(frozen=True)
class LargeModelInfo:
    """What :func:`make_large_model` wrote."""

    model_path: Path
    data_files: tuple[Path, ...]
    weight_bytes: int  # float32 bytes of every external weight
    largest_weight_bytes: int
    weights: dict[str, tuple[int, int]]  # name -> shape [rows, cols], in file order


def weight_shapes(layers: int, hidden: int, ffn: int, vocab: int) -> dict[str, tuple[int, int]]:
    """The external weights of the model, name -> ``(rows, cols)`` (``[K, N]`` for a ``MatMul`` weight)."""
    shapes = {"embed_tokens": (vocab, hidden)}
    for i in range(layers):
        shapes[f"layers.{i}.self_attn.q_proj"] = (hidden, hidden)
        shapes[f"layers.{i}.self_attn.o_proj"] = (hidden, hidden)
        shapes[f"layers.{i}.mlp.gate_proj"] = (hidden, ffn)
        shapes[f"layers.{i}.mlp.up_proj"] = (hidden, ffn)
        shapes[f"layers.{i}.mlp.down_proj"] = (ffn, hidden)
    shapes["lm_head"] = (hidden, vocab)
    return shapes


def weight_chunks(shape: tuple[int, int], seed: int, index: int) -> Iterator[np.ndarray]:
    """The float32 weight ``index`` of a model generated with ``seed``, as consecutive row blocks (C order).

    The same ``(shape, seed, index)`` always gives the same values, so a test can regenerate any one weight
    without reading the data file: ``np.concatenate(list(weight_chunks(...)))``.
    """
    rows, cols = shape
    rng = np.random.default_rng([seed, index])
    step = max(1, CHUNK_BYTES // (4 * cols))
    for start in range(0, rows, step):
        block = rng.standard_normal((min(step, rows - start), cols), dtype=np.float32)
        block *= np.float32(WEIGHT_STD)
        yield block


def _external_tensor(name: str, shape: tuple[int, int], location: str, offset: int) -> TensorProto:
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
    tensor.data_location = TensorProto.EXTERNAL
    length = 4 * shape[0] * shape[1]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def _write_weights(
    model_path: Path, shapes: dict[str, tuple[int, int]], seed: int, per_tensor_files: bool
) -> tuple[list[TensorProto], list[Path]]:
    """Write every weight's bytes; return their external ``TensorProto`` and the data files written."""
    tensors: list[TensorProto] = []
    files: list[Path] = []
    handle = None
    offset = 0
    try:
        for index, (name, shape) in enumerate(shapes.items()):
            if handle is None or per_tensor_files:
                if handle is not None:
                    handle.close()
                location = f"{model_path.name}.{name}.data" if per_tensor_files else f"{model_path.name}.data"
                files.append(model_path.with_name(location))
                handle = open(files[-1], "wb")  # noqa: SIM115 - closed below, one handle at a time
                offset = 0
            tensors.append(_external_tensor(name, shape, files[-1].name, offset))
            for block in weight_chunks(shape, seed, index):
                block.tofile(handle)
                offset += block.nbytes
    finally:
        if handle is not None:
            handle.close()
    return tensors, files


def _layer_norm(prefix: str, x: str, out: str, hidden: int, inits: list[TensorProto]) -> onnx.NodeProto:
    scale, bias = f"{prefix}.weight", f"{prefix}.bias"
    inits.append(helper.make_tensor(scale, TensorProto.FLOAT, [hidden], np.ones(hidden, np.float32)))
    inits.append(helper.make_tensor(bias, TensorProto.FLOAT, [hidden], np.zeros(hidden, np.float32)))
    return helper.make_node("LayerNormalization", [x, scale, bias], [out], name=prefix, axis=-1, epsilon=1e-5)


def _graph(layers: int, hidden: int, vocab: int, weights: list[TensorProto]) -> onnx.GraphProto:
    inits: list[TensorProto] = list(weights)
    nodes = [helper.make_node("Gather", ["embed_tokens", "input_ids"], ["h0"], name="embed")]
    x = "h0"
    for i in range(layers):
        p = f"layers.{i}"

        def node(op: str, inputs: list[str], out: str, p: str = p) -> str:
            nodes.append(helper.make_node(op, inputs, [f"{p}.{out}"], name=f"{p}.{out}"))
            return f"{p}.{out}"

        nodes.append(_layer_norm(f"{p}.input_layernorm", x, f"{p}.ln1", hidden, inits))
        q = node("MatMul", [f"{p}.ln1", f"{p}.self_attn.q_proj"], "q")
        o = node("MatMul", [q, f"{p}.self_attn.o_proj"], "o")
        x1 = node("Add", [x, o], "attn_residual")
        nodes.append(_layer_norm(f"{p}.post_attention_layernorm", x1, f"{p}.ln2", hidden, inits))
        gate = node("MatMul", [f"{p}.ln2", f"{p}.mlp.gate_proj"], "gate")
        up = node("MatMul", [f"{p}.ln2", f"{p}.mlp.up_proj"], "up")
        silu = node("Mul", [gate, node("Sigmoid", [gate], "gate_sigmoid")], "silu")
        down = node("MatMul", [node("Mul", [silu, up], "gated"), f"{p}.mlp.down_proj"], "down")
        x = node("Add", [x1, down], "mlp_residual")
    nodes.append(_layer_norm("norm", x, "final_norm", hidden, inits))
    nodes.append(helper.make_node("MatMul", ["final_norm", "lm_head"], ["logits"], name="lm_head"))
    return helper.make_graph(
        nodes,
        "synthetic_llm",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", vocab])],
        inits,
    )


def make_large_model(
    path: str | os.PathLike[str],
    *,
    layers: int = 12,
    hidden: int = 2048,
    ffn: int = 5632,
    vocab: int = 32000,
    per_tensor_files: bool = False,
    seed: int = 0,
) -> LargeModelInfo:
    """Write the model to ``path`` and its weights to external data beside it (see the module docstring).

    Memory stays at one :data:`CHUNK_BYTES` chunk plus the protobuf (which holds no weight data).
    The directory is created if needed; existing files of the same names are overwritten.
    """
    model_path = Path(path).absolute()
    model_path.parent.mkdir(parents=True, exist_ok=True)
    shapes = weight_shapes(layers, hidden, ffn, vocab)
    weights, files = _write_weights(model_path, shapes, seed, per_tensor_files)
    opsets = [helper.make_opsetid("", OPSET)]
    model = helper.make_model(_graph(layers, hidden, vocab, weights), opset_imports=opsets, ir_version=IR_VERSION)
    model_path.write_bytes(model.SerializeToString())
    onnx.checker.check_model(str(model_path), full_check=True)  # by path: checks the data files, reads no weight
    sizes = [4 * rows * cols for rows, cols in shapes.values()]
    return LargeModelInfo(model_path, tuple(files), sum(sizes), max(sizes), shapes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path, help="the .onnx file to write (data files go beside it)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--per-tensor-files", action="store_true", help="one external data file per weight")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    info = make_large_model(
        args.output,
        layers=args.layers,
        hidden=args.hidden,
        ffn=args.ffn,
        vocab=args.vocab,
        per_tensor_files=args.per_tensor_files,
        seed=args.seed,
    )
    print(
        f"wrote {info.model_path} with {len(info.weights)} weights, {info.weight_bytes / 1e9:.2f} GB of float32 "
        f"in {len(info.data_files)} data file(s) (largest weight {info.largest_weight_bytes / 1e6:.0f} MB)"
    )


if __name__ == "__main__":
    main()
