"""NF4 embedding lookups (``onnx_nf4.lookup::GatherNF4``) and tied embeddings stored once.

Rows are compared bit for bit with the codec (:func:`onnx_nf4.codec.layout.dequantize_weight` of ``E.T``), run by
stock onnxruntime (the lookup is a function of standard ops) or with the op library where a ``MatMulNF4`` is tied.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_nf4 import dequantize_model, quantize_model
from onnx_nf4.codec.double_quant import quantize_absmax
from onnx_nf4.codec.layout import QuantizedWeight, dequantize_weight, quantize_weight
from onnx_nf4.model.io import load_model
from onnx_nf4.model.summary import summarize_model
from onnx_nf4.op.lookup import LOOKUP_DOMAIN, LOOKUP_DQ_OP, LOOKUP_OP, NF4_PAIRS
from onnx_nf4.runtime import session_options

_DTYPES = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}


def gather_model(table: np.ndarray, index_shape: list, *, opset: int = 17, bf16: bool = False) -> onnx.ModelProto:
    """``Gather(E, ids)`` with ``E`` an initializer (float32/float16, or bfloat16 from float32 when ``bf16``)."""
    _V, H = table.shape
    if bf16:
        init = helper.make_tensor("E", TensorProto.BFLOAT16, table.shape, table.reshape(-1).tolist())
        elem = TensorProto.BFLOAT16
    else:
        init, elem = numpy_helper.from_array(table, "E"), _DTYPES[table.dtype.type]
    graph = helper.make_graph(
        [helper.make_node("Gather", ["E", "ids"], ["emb"], name="embed")],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, index_shape)],
        [helper.make_tensor_value_info("emb", elem, [*index_shape, H])],
        [init],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def run(model: onnx.ModelProto, feeds: dict, library: bool = False) -> list[np.ndarray]:
    options = session_options() if library else None
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def codec_rows(table: np.ndarray, block_size: int, double_quant: bool = False) -> np.ndarray:
    """The float32 table the codec decodes: ``dequantize_weight(quantize_weight(E.T)).T``."""
    q = quantize_weight(np.ascontiguousarray(table.T), block_size, double_quant=double_quant)
    return dequantize_weight(q).T


def lookup_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if node.domain == LOOKUP_DOMAIN]


RNG = np.random.default_rng(21)


@pytest.mark.parametrize(
    ("V", "H", "block_size", "double_quant"),
    [(37, 100, 64, False), (1, 24, 16, False), (5, 64, 64, False), (300, 72, 32, True), (70, 33, 16, True)],
)
def test_rows_are_bit_identical_to_the_codec(V, H, block_size, double_quant):
    table = RNG.standard_normal((V, H)).astype(np.float32) * 3
    table[0, : H // 2] = 0  # a half-zero row (an all-zero block when H >= 2 * block_size)
    q, report = quantize_model(
        gather_model(table, ["a", "b"]), embedding_block_size=block_size, double_quant=double_quant,
        embedding_min_rows=0, min_elements=0,
    )  # fmt: skip
    (node,) = lookup_nodes(q)
    assert node.op_type == (LOOKUP_DQ_OP if double_quant else LOOKUP_OP)
    assert [layer.op_type for layer in report.layers] == ["Gather"] and report.layers[0].shape == (H, V)
    ids = RNG.integers(-V, V, size=(3, 7))
    (emb,) = run(q, {"ids": ids})
    assert emb.dtype == np.float32 and emb.shape == (3, 7, H)
    assert emb.tobytes() == codec_rows(table, block_size, double_quant)[ids].tobytes()


def test_double_quant_absmax_decodes_like_the_codec_across_nested_blocks():
    """Many rows, so that the absmax of one row spans two nested blocks of 256 (kb = 7 does not divide 256)."""
    V, H, bs = 200, 7 * 16, 16
    table = RNG.standard_normal((V, H)).astype(np.float32) * RNG.uniform(0.1, 10, size=(V, 1)).astype(np.float32)
    q, _ = quantize_model(gather_model(table, ["n"]), embedding_block_size=bs, double_quant=True, embedding_min_rows=0)
    ids = np.arange(-V, V)
    (emb,) = run(q, {"ids": ids})
    assert emb.tobytes() == codec_rows(table, bs, True)[ids].tobytes()


@pytest.mark.parametrize("index_shape", [[], [0], [4], [2, 0, 3], [2, 3, 2]])
def test_indices_of_any_shape(index_shape):
    table = RNG.standard_normal((9, 40)).astype(np.float32)
    q, _ = quantize_model(gather_model(table, [f"d{i}" for i in range(len(index_shape))]), embedding_min_rows=0,
                          min_elements=0, block_size=16)  # fmt: skip
    ids = RNG.integers(-9, 9, size=index_shape)
    (emb,) = run(q, {"ids": ids})
    assert emb.shape == (*index_shape, 40)
    assert emb.tobytes() == codec_rows(table, 16)[ids].tobytes()


@pytest.mark.parametrize("bad", [9, -10, 1 << 40])
def test_out_of_range_index_is_an_onnxruntime_error(bad):
    table = RNG.standard_normal((9, 40)).astype(np.float32)
    q, _ = quantize_model(gather_model(table, ["n"]), embedding_min_rows=0, min_elements=0, block_size=16)
    with pytest.raises(Exception, match="out of"):
        run(q, {"ids": np.array([0, bad])})


def test_float16_and_bfloat16_tables_give_the_float32_rows_rounded_once():
    table = RNG.standard_normal((20, 48)).astype(np.float16)
    q, _ = quantize_model(gather_model(table, ["n"]), embedding_min_rows=0, min_elements=0, block_size=16)
    ids = np.arange(-20, 20)
    (emb,) = run(q, {"ids": ids})
    expected = codec_rows(table, 16)[ids].astype(np.float16)
    assert emb.dtype == np.float16 and emb.tobytes() == expected.tobytes()

    table32 = RNG.standard_normal((20, 48)).astype(np.float32)
    table_bf16 = (table32.view(np.uint32) & 0xFFFF0000).view(np.float32)  # exactly representable in bfloat16
    q, _ = quantize_model(gather_model(table_bf16, ["n"], bf16=True), embedding_min_rows=0, min_elements=0,
                          block_size=16)  # fmt: skip
    (node,) = lookup_nodes(q)
    assert helper.get_attribute_value(next(a for a in node.attribute if a.name == "to")) == TensorProto.BFLOAT16
    q.graph.node.append(helper.make_node("Cast", ["emb"], ["emb32"], to=TensorProto.FLOAT))  # numpy has no bf16
    q.graph.output[0].name = "emb32"
    q.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT
    (emb,) = run(q, {"ids": ids})
    rows = codec_rows(table_bf16, 16)[ids]
    bits = rows.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even
    assert (emb.view(np.uint32) >> 16).astype(np.uint16).tobytes() == rounded.tobytes()
    assert not (emb.view(np.uint32) & 0xFFFF).any()


def test_pair_table_is_high_nibble_first():
    from onnx_nf4.codec.blockwise import unpack_nibbles
    from onnx_nf4.codec.codebook import NF4_CODE

    codes = unpack_nibbles(np.arange(256, dtype=np.uint8), 512).reshape(256, 2)
    assert NF4_PAIRS.tobytes() == NF4_CODE[codes].tobytes()


def test_opset_below_13_and_small_tables_stay_float_with_reasons():
    table = RNG.standard_normal((64, 64)).astype(np.float32)
    q, report = quantize_model(gather_model(table, ["n"]), min_elements=0)  # default embedding_min_rows
    assert not lookup_nodes(q) and "embedding_min_rows" in report.skipped[0].reason
    q, report = quantize_model(gather_model(table, ["n"], opset=12), min_elements=0, embedding_min_rows=0)
    assert not lookup_nodes(q) and "opset 12" in report.skipped[0].reason
    q, report = quantize_model(gather_model(table, ["n"]), min_elements=0, embedding_min_rows=0, exclude=["^E$"])
    assert not lookup_nodes(q) and "excluded" in report.skipped[0].reason


# ------------------------------------------------------------------------------------------------------------
# Tied embeddings: every graph form stores one NF4 tensor for the Gather and the MatMul / Gemm.

V, H = 64, 128


def tied_model(form: str, table: np.ndarray) -> onnx.ModelProto:
    """A Gather and an lm_head over the same values, in one of the forms exporters write."""
    inits = [numpy_helper.from_array(table, "E")]
    gather = helper.make_node("Gather", ["E", "ids"], ["emb"], name="embed")
    if form == "gemm_transB":
        nodes = [gather, helper.make_node("Gemm", ["x", "E"], ["logits"], transB=1, name="lm_head")]
    elif form == "matmul_transpose":
        nodes = [gather, helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0]),
                 helper.make_node("MatMul", ["x", "Et"], ["logits"], name="lm_head")]  # fmt: skip
    elif form == "folded_copy":
        inits.append(numpy_helper.from_array(np.ascontiguousarray(table.T), "lm_head.weight"))
        nodes = [gather, helper.make_node("MatMul", ["x", "lm_head.weight"], ["logits"], name="lm_head")]
    else:  # "builder": onnxruntime-genai gathers from Transpose(lm_head weight)
        inits = [numpy_helper.from_array(np.ascontiguousarray(table.T), "lm_head.MatMul.weight")]
        nodes = [helper.make_node("Transpose", ["lm_head.MatMul.weight"], ["Et"], perm=[1, 0]),
                 helper.make_node("Gather", ["Et", "ids"], ["emb"], name="embed"),
                 helper.make_node("MatMul", ["x", "lm_head.MatMul.weight"], ["logits"], name="lm_head")]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"]),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", H]),
        ],
        [
            helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["b", "s", H]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", V]),
        ],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers and of the ``Constant`` nodes of the functions (the lookup's tables)."""
    constants = [node.attribute[0].t for f in model.functions for node in f.node if node.op_type == "Constant"]
    tensors = [*model.graph.initializer, *(t for t in constants if t.dims or t.data_type)]
    return sum(numpy_helper.to_array(tensor).nbytes for tensor in tensors)


@pytest.mark.parametrize("form", ["gemm_transB", "matmul_transpose", "folded_copy", "builder"])
@pytest.mark.parametrize("fmt", ["onnx_nf4", "com.microsoft"])
def test_tied_embedding_is_stored_once(form, fmt):
    table = RNG.standard_normal((V, H)).astype(np.float32)
    model = tied_model(form, table)
    q, report = quantize_model(model, format=fmt, block_size=32, min_elements=0)  # V < embedding_min_rows: tied
    assert sorted(layer.op_type for layer in report.layers)[0] == "Gather"
    assert [layer.shared for layer in report.layers] == [False, True]
    (lookup,) = lookup_nodes(q)
    matmul = next(node for node in q.graph.node if node.op_type in ("MatMulNF4", "MatMulBnb4"))
    packed = {matmul.input[1]}
    reshapes = {node.output[0]: node.input[0] for node in q.graph.node if node.op_type == "Reshape"}
    assert {reshapes.get(lookup.input[1], lookup.input[1])} == packed  # one tensor feeds both
    assert not {"Transpose", "Gather", "MatMul", "Gemm"} & {node.op_type for node in q.graph.node}
    tables = [init.name for init in q.graph.initializer if sorted(init.dims) == [V, H]]
    assert tables == []  # no float copy of the table left
    assert report.tensor_bytes_after == tensor_bytes(q)
    weights = [numpy_helper.to_array(init) for init in q.graph.initializer if init.data_type != TensorProto.INT64]
    assert sum(w.nbytes for w in weights) == V * H // 2 + V * (H // 32) * 4  # codes and absmax, once

    ids = RNG.integers(-V, V, size=(2, 5))
    x = RNG.standard_normal((2, H)).astype(np.float32)
    emb, logits = run(q, {"ids": ids, "x": x}, library=fmt == "onnx_nf4")
    rows = codec_rows(table, 32)
    assert emb.tobytes() == rows[ids].tobytes()
    np.testing.assert_allclose(logits, x @ rows.T, rtol=1e-4, atol=1e-4)


def test_tied_table_with_rows_across_blocks_in_com_microsoft_is_stored_twice_and_reported():
    """MatMulBnb4's flat blocks span rows when H % block_size != 0: the lookup then has its own tensors."""
    table = RNG.standard_normal((V, 100)).astype(np.float32)
    model = tied_model("gemm_transB", np.zeros((V, H), np.float32))
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(table, "E"))
    model.graph.input[1].type.tensor_type.shape.dim[1].dim_value = 100
    model.graph.output[0].type.tensor_type.shape.dim[2].dim_value = 100
    q, report = quantize_model(model, format="com.microsoft", block_size=32, min_elements=0)
    assert [layer.shared for layer in report.layers] == [False, False]
    ids = np.array([[0, -1]])
    (emb, _) = run(q, {"ids": ids, "x": np.zeros((1, 100), np.float32)})
    assert emb.tobytes() == codec_rows(table, 32)[ids].tobytes()


def test_the_14_percent_growth_case_shrinks_and_the_report_counts_float_copies_kept():
    """Gemm(x, E, transB=1) + Gather(E): once the float E stayed beside its NF4 copy; now one NF4 tensor. With the
    Gather excluded, the float E stays for it and the report's bytes say so."""
    table = RNG.standard_normal((V, H)).astype(np.float32)
    model = tied_model("gemm_transB", table)
    q, report = quantize_model(model, block_size=32, min_elements=0)
    assert report.tensor_bytes_after < report.tensor_bytes_before / 4  # with the lookup's 2 KiB pair table
    assert report.bytes_after == sum(layer.bytes_after for layer in report.layers if not layer.shared)

    q, report = quantize_model(model, block_size=32, min_elements=0, exclude=["embed"])
    assert [layer.op_type for layer in report.layers] == ["Gemm"]
    (kept,) = report.kept_float
    assert kept.name == "E" and kept.nbytes == table.nbytes and "embed" in kept.reason
    assert report.bytes_after == report.layers[0].bytes_after + table.nbytes
    assert report.tensor_bytes_after == tensor_bytes(q) > report.tensor_bytes_before


def test_weights_of_other_ops_are_listed_as_left_float():
    w = RNG.standard_normal((V, H)).astype(np.float32)
    node = helper.make_node("EmbedLayerNormalization", ["ids", "", "table"], ["y"], domain="com.microsoft",
                            name="embed")  # fmt: skip
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("ids", TensorProto.INT32, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, H])], [numpy_helper.from_array(w, "table")],
    )  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    _, report = quantize_model(model)
    (left,) = report.left_float
    assert left.name == "table" and left.nbytes == w.nbytes and "com.microsoft::EmbedLayerNormalization" in left.reason


def test_inspect_and_dequantize_cover_lookups():
    table = RNG.standard_normal((V, H)).astype(np.float32)
    q, _ = quantize_model(tied_model("gemm_transB", table), block_size=32, min_elements=0, double_quant=True)
    summary = summarize_model(load_model(q))
    ops = sorted(layer.op for layer in summary.quantized)
    assert ops == ["onnx_nf4.lookup::GatherNF4DQ", "onnx_nf4::MatMulNF4"]
    assert len({layer.tensors for layer in summary.quantized}) == 1
    back = dequantize_model(q)
    assert not lookup_nodes(back) and not back.functions
    ids = np.array([[3, -3]])
    x = RNG.standard_normal((1, H)).astype(np.float32)
    assert run(back, {"ids": ids, "x": x})[0].tobytes() == run(q, {"ids": ids, "x": x}, library=True)[0].tobytes()


def test_prequantized_table_is_written_as_given():
    """The bytes of a given QuantizedWeight (e.g. bitsandbytes' EmbeddingNF4) reach the lookup unchanged."""
    table = RNG.standard_normal((V, H)).astype(np.float32)
    given = quantize_weight(np.ascontiguousarray(table.T), 64)
    codes, nested = quantize_absmax(given.absmax, 256)
    given = QuantizedWeight(H, V, 64, given.packed, codes.reshape(given.absmax.shape), nested)
    q, _ = quantize_model(gather_model(table, ["n"]), embedding_min_rows=0, prequantized={"E": given})
    inits = {init.name: numpy_helper.to_array(init) for init in q.graph.initializer}
    (lookup,) = lookup_nodes(q)
    assert inits[lookup.input[1]].tobytes() == given.packed.tobytes()
    assert inits[lookup.input[2]].tobytes() == given.absmax.tobytes()


@pytest.mark.parametrize("H", [128, 96])  # 96: bitsandbytes' blocks of 64 straddle rows, re-blocked exactly at 32
def test_bitsandbytes_embedding_nf4_is_exported_with_its_own_bytes(tmp_path, H):
    torch = pytest.importorskip("torch")
    bnb = pytest.importorskip("bitsandbytes")
    from onnx_nf4.torch import export

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = bnb.nn.EmbeddingNF4(50, H)
            self.embed.weight = bnb.nn.Params4bit(
                torch.randn(50, H, generator=torch.Generator().manual_seed(H)), requires_grad=False,
                quant_type="nf4", module=self.embed,
            )  # fmt: skip
            self.embed = self.embed.to("cpu")  # bitsandbytes quantizes here

        def forward(self, ids):
            return self.embed(ids) * 2

    net = Net().eval()
    ids = torch.tensor([[0, 7, 49], [3, 3, 1]])
    report = export(net, (ids,), tmp_path / "net.onnx", dynamo=False)
    assert [layer.op_type for layer in report.layers] == ["Gather"]
    q = onnx.load(tmp_path / "net.onnx")
    (lookup,) = lookup_nodes(q)
    inits = {init.name: numpy_helper.to_array(init) for init in q.graph.initializer}
    state = net.embed.weight.quant_state
    codes = net.embed.weight.data.numpy().reshape(-1)
    assert inits[lookup.input[1]].tobytes() == codes.tobytes()  # bitsandbytes' packed bytes, unchanged
    absmax = inits[lookup.input[2]]
    assert np.repeat(state.absmax.numpy(), absmax.size // state.absmax.numel()).tobytes() == absmax.tobytes()
    with torch.no_grad():
        if H % state.blocksize == 0:
            expected = net(ids).numpy()  # bitsandbytes' own forward
        else:  # its CPU dequantize_4bit of the 2-D table disagrees with its flat blocks; the flat decode is exact
            flat = copy.deepcopy(state)
            flat.shape = torch.Size((50 * H,))
            table = bnb.functional.dequantize_4bit(net.embed.weight.data, flat).reshape(50, H)
            expected = (table[ids] * 2).numpy()
    (got,) = run(q, {q.graph.input[0].name: ids.numpy()})
    assert got.tobytes() == expected.tobytes()


def test_cli_quantize_and_inspect_show_the_lookup_and_true_sizes(tmp_path, capsys):
    from onnx_nf4.cli import entry as cli

    table = RNG.standard_normal((V, H)).astype(np.float32)
    source, target = tmp_path / "tied.onnx", tmp_path / "tied_nf4.onnx"
    onnx.save(tied_model("gemm_transB", table), source)
    assert cli.main(["quantize", str(source), str(target), "--min-elements", "0", "--block-size", "32", "-q"]) == 0
    out = capsys.readouterr().out
    assert "embed" in out and "shared" in out and "all constant tensors: 32.0 KiB -> " in out
    assert target.stat().st_size < source.stat().st_size / 3
    assert cli.main(["inspect", str(target)]) == 0
    out = capsys.readouterr().out
    assert "onnx_nf4.lookup::GatherNF4" in out and "128x64" in out


def test_tables_and_tied_weights_use_the_embedding_block_size():
    table = RNG.standard_normal((V, H)).astype(np.float32)
    model = tied_model("gemm_transB", table)
    q, report = quantize_model(model, min_elements=0)  # block 64, tables min(64, 32)
    assert report.table_block_size == 32
    (matmul,) = [node for node in q.graph.node if node.op_type == "MatMulNF4"]
    assert helper.get_attribute_value(next(a for a in matmul.attribute if a.name == "block_size")) == 32
    ids = np.array([[1, -2]])
    assert run(q, {"ids": ids, "x": np.zeros((1, H), np.float32)}, library=True)[0].tobytes() == (
        codec_rows(table, 32)[ids].tobytes()
    )
    q, _ = quantize_model(model, min_elements=0, exclude=["embed"])  # no table: the Gemm keeps block 64
    (matmul,) = [node for node in q.graph.node if node.op_type == "MatMulNF4"]
    assert helper.get_attribute_value(next(a for a in matmul.attribute if a.name == "block_size")) == 64
    q, _ = quantize_model(model, min_elements=0, embedding_block_size=128)
    (matmul,) = [node for node in q.graph.node if node.op_type == "MatMulNF4"]
    assert helper.get_attribute_value(next(a for a in matmul.attribute if a.name == "block_size")) == 128
