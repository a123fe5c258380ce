"""The bad-input sweep: every kind of broken input gets a clear error, and nothing crashes or is lost.

* API (:func:`onnx_nf4.quantize_model`, :func:`onnx_nf4.dequantize_model`): a documented exception type
  (``ModelLoadError`` for unreadable files, ``ValueError`` for bad settings and inconsistent NF4 nodes), or a
  layer left in float with the reason in ``report.skipped`` for weights NF4 cannot hold.
* CLI (``onnx_nf4.cli.entry``, run in this process so that an unexpected exception fails the test with its
  traceback): exit status 1 (2 for a usage error) and one line ``onnx-nf4: error: ...``.
* The C++ op (crafted ``MatMulNF4`` models whose attributes disagree with their tensors, run in onnxruntime
  with this package's library): an onnxruntime error. These run in a worker subprocess, so that a crash fails
  the case that caused it instead of killing pytest.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_nf4
from onnx_nf4 import dequantize_model, quantize_model
from onnx_nf4.cli import entry as cli
from onnx_nf4.model.io import ModelLoadError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import activations, run_reference, weight

K, N = 128, 64  # 8192 elements: above the default min_elements


def matmul_model(w: np.ndarray | onnx.TensorProto, *, check: bool = True) -> onnx.ModelProto:
    """``Y = A @ W`` with ``W`` an initializer (a raw ``TensorProto`` for dtypes numpy cannot build)."""
    tensor = w if isinstance(w, onnx.TensorProto) else numpy_helper.from_array(w, "W")
    tensor.name = "W"
    elem = tensor.data_type
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "W"], ["Y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("A", elem, ["M", tensor.dims[0]])],
        [helper.make_tensor_value_info("Y", elem, ["M", tensor.dims[1]])],
        [tensor],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    if check:
        onnx.checker.check_model(model)
    return model


def run_cli(capsys, *args: object) -> tuple[int, str]:
    status = cli.main([str(arg) for arg in args])
    return status, capsys.readouterr().err


def assert_cli_error(capsys, args: tuple, *fragments: str, status: int = 1) -> None:
    code, err = run_cli(capsys, *args)
    lines = err.strip().splitlines()
    assert code == status and len(lines) == 1 and lines[0].startswith("onnx-nf4: error:"), (code, err)
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def model_file(tmp_path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save(matmul_model(weight((K, N))), path)
    return path


# ---------------------------------------------------------------------------------------------- damaged files


@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 0.9999])
def test_truncated_model_file(model_file, tmp_path, capsys, fraction):
    data = model_file.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ModelLoadError, match=r"cut\.onnx"):
        quantize_model(cut)
    assert_cli_error(capsys, ("quantize", cut, tmp_path / "out.onnx"), "cut.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_corrupted_bytes_anywhere(model_file, tmp_path, capsys):
    """Overwrite 4 bytes at 60 places (headers, graph, tensor data): a clear error or a valid result, never more.

    Bytes inside the weight data give a model that quantizes (or a layer skipped for a NaN/Inf weight);
    bytes in the structure give ``ModelLoadError``. Anything else (another exception type, a traceback from the
    CLI, a written output after an error) fails.
    """
    data = model_file.read_bytes()
    corrupt, out = tmp_path / "corrupt.onnx", tmp_path / "out.onnx"
    positions = sorted({*range(0, 64, 4), *np.linspace(64, len(data) - 4, 44).astype(int).tolist()})
    outcomes = {"error": 0, "ok": 0}
    for pos in positions:
        for pattern in (b"\xff\xff\xff\xff", b"\x00\x00\x00\x00"):
            corrupt.write_bytes(data[:pos] + pattern + data[pos + 4 :])
            try:
                quantize_model(corrupt)
                outcomes["ok"] += 1
            except ModelLoadError as err:
                assert "corrupt.onnx" in str(err)
                outcomes["error"] += 1
            code, err = run_cli(capsys, "quantize", corrupt, out, "-q")
            assert code in (0, 1) and (code == 0 or len(err.strip().splitlines()) == 1), (pos, err)
            assert out.exists() == (code == 0), pos
            out.unlink(missing_ok=True)
    assert outcomes["error"] > 0 and outcomes["ok"] > 0, outcomes  # both kinds of damage were exercised


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\x00" * 1000,
        b"\xff" * 1000,
        np.random.default_rng(3).integers(0, 256, 100_000, dtype=np.uint8).tobytes(),
        b"ir_version: 8\ngraph { name: 'g' }\n",  # text format is not the binary format
        numpy_helper.from_array(np.ones((4, 4), np.float32), "W").SerializeToString(),  # another message
        helper.make_graph([], "g", [], []).SerializeToString(),
    ],
    ids=["empty", "zeros", "ones", "random", "text", "tensor_proto", "graph_proto"],
)
def test_protobuf_garbage(tmp_path, capsys, content):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(content)
    with pytest.raises(ModelLoadError, match=r"garbage\.onnx"):
        quantize_model(garbage)
    assert_cli_error(capsys, ("quantize", garbage, tmp_path / "out.onnx"), "garbage.onnx")
    assert_cli_error(capsys, ("inspect", garbage), "garbage.onnx")


# ---------------------------------------------------------------------------------------------- external data


def external_model(directory: Path, location: str, *, offset: int = 0, length: int | None = None) -> Path:
    """A model whose weight ``W`` is external at ``location``; ``W`` is written to ``directory / "w.data"``."""
    w = weight((K, N))
    (directory / "w.data").write_bytes(w.tobytes())
    tensor = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[K, N])
    tensor.data_location = TensorProto.EXTERNAL
    entries = {"location": location, "offset": str(offset), "length": str(w.nbytes if length is None else length)}
    for key, value in entries.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    path = directory / "model.onnx"
    onnx.save(matmul_model(tensor, check=False), path)
    return path


def test_external_data_reference_that_works(tmp_path):
    _, report = quantize_model(external_model(tmp_path, "w.data"))
    assert len(report.layers) == 1


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", r"'gone\.data' .*not found"),
        ("truncated", r"'w\.data' is truncated"),
        ("offset_past_end", r"'w\.data' is truncated"),
        ("length_disagrees", r"length 100, .* need 32768 bytes"),
        ("outside_directory", r"outside the model's directory"),
        ("symlink_outside", r"outside the model's directory"),
    ],
)
def test_bad_external_data(tmp_path, capsys, setup, message):
    directory = tmp_path / "model"
    directory.mkdir()
    if setup == "missing":
        path = external_model(directory, "gone.data")
    elif setup == "truncated":
        path = external_model(directory, "w.data")
        (directory / "w.data").write_bytes((directory / "w.data").read_bytes()[:1000])
    elif setup == "offset_past_end":
        path = external_model(directory, "w.data", offset=4096)
    elif setup == "length_disagrees":
        path = external_model(directory, "w.data", length=100)
    elif setup == "outside_directory":
        path = external_model(directory, "../w.data")
        (tmp_path / "w.data").write_bytes((directory / "w.data").read_bytes())
    else:
        path = external_model(directory, "link.data")
        (tmp_path / "w.data").write_bytes((directory / "w.data").read_bytes())
        (directory / "link.data").symlink_to(tmp_path / "w.data")
    with pytest.raises(ModelLoadError, match=message):
        quantize_model(path)
    assert_cli_error(capsys, ("quantize", path, tmp_path / "out.onnx"), "model.onnx")
    assert not (tmp_path / "out.onnx").exists()


# ------------------------------------------------------------------------------------------------- weights


@pytest.mark.parametrize(
    "w",
    [
        np.ones((K, N), np.int8),
        np.ones((K, N), np.int32),
        np.ones((K, N), bool),
        np.ones((K, N), np.complex64),
        np.ones((K, N), np.float64),
        np.ones((K, N), np.uint8),
    ],
    ids=lambda w: str(w.dtype),
)
def test_weights_of_other_dtypes_stay_as_they_are(w, tmp_path, capsys):
    model = matmul_model(w, check=False)
    out, report = quantize_model(model)
    assert not report.layers
    assert [s.node for s in report.skipped] == ["mm"] and str(w.dtype).upper()[:3] in report.skipped[0].reason.upper()
    assert [n.op_type for n in out.graph.node] == ["MatMul"]
    np.testing.assert_array_equal(numpy_helper.to_array(out.graph.initializer[0]), w)
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    code, _ = run_cli(capsys, "quantize", path, tmp_path / "out.onnx", "-q")
    assert code == 0  # nothing to quantize is not an error: the report says why


@pytest.mark.parametrize(
    ("value", "dtype"),
    [(np.nan, np.float32), (np.inf, np.float32), (-np.inf, np.float32), (np.inf, np.float16), (np.nan, np.float16)],
)
def test_nan_and_inf_weights_are_skipped_with_the_reason(value, dtype):
    w = weight((K, N), dtype=dtype)
    w[5, 7] = value
    out, report = quantize_model(matmul_model(w))
    assert not report.layers and "not finite" in report.skipped[0].reason
    assert f"({value} at flat index {5 * N + 7})" in report.skipped[0].reason  # e.g. "(nan at flat index 197)"
    assert [n.op_type for n in out.graph.node] == ["MatMul"]
    with pytest.raises(ValueError, match="not finite"):
        onnx_nf4.quantize_weight(w)


def test_a_float64_weight_beyond_float32_is_named_plainly():
    w = np.ones((4, 4), np.float64)
    w[2, 1] = -1e39
    with pytest.raises(ValueError, match=r"\(-1e\+39 at flat index 9\)"):
        onnx_nf4.quantize_weight(w)


def test_nan_in_a_bfloat16_weight():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    w = weight((K, N)).astype(ml_dtypes.bfloat16)
    w[0, 0] = np.nan
    tensor = helper.make_tensor("W", TensorProto.BFLOAT16, [K, N], w.view(np.uint16).tobytes(), raw=True)
    _, report = quantize_model(matmul_model(tensor))
    assert not report.layers and "not finite" in report.skipped[0].reason


@pytest.mark.parametrize("shape", [(0, N), (K, 0), (0, 0)])
@pytest.mark.parametrize("min_elements", [0, 4096])
def test_zero_size_weights_are_skipped(shape, min_elements):
    out, report = quantize_model(matmul_model(np.zeros(shape, np.float32)), min_elements=min_elements)
    assert not report.layers and len(report.skipped) == 1
    assert [n.op_type for n in out.graph.node] == ["MatMul"]


@pytest.mark.parametrize("block_size", [0, 1, 8, 15, 24, 48, 100, 8192, -64, 2**40])
def test_unsupported_block_sizes(block_size, model_file):
    with pytest.raises(ValueError, match="power of two"):
        quantize_model(model_file, block_size=block_size)
    with pytest.raises(ValueError, match="power of two"):
        onnx_nf4.quantize_weight(weight((K, N)), block_size)


@pytest.mark.parametrize(("k", "block_size"), [(100, 64), (40, 64), (130, 16), (4097, 4096), (1, 16)])
def test_k_not_a_multiple_of_the_block(k, block_size):
    """Each column is padded to whole blocks: the rewritten model computes ``A @ decoded(W)``."""
    w = weight((k, N))
    out, report = quantize_model(matmul_model(w), block_size=block_size, min_elements=0)
    assert len(report.layers) == 1
    a = activations((3, k))
    decoded = onnx_nf4.dequantize_weight(onnx_nf4.quantize_weight(w, block_size))
    np.testing.assert_allclose(run_reference(out, {"A": a})[0], a @ decoded, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------- crafted NF4 models

BK, BN, BBS = 96, 8, 32  # the crafted node's valid sizes: k_blocks = 3


def _valid(double_quant: bool) -> dict[str, np.ndarray]:
    q = onnx_nf4.quantize_weight(weight((BK, BN)), BBS, double_quant=double_quant)
    tensors = {"B": q.packed, "absmax": q.absmax}
    if q.nested is not None:
        tensors.update(
            nested_absmax=q.nested.nested_absmax,
            nested_code=q.nested.code,
            absmax_offset=np.asarray(q.nested.offset, np.float32),
        )
    return tensors


def _with(double_quant: bool = False, **changes) -> dict[str, np.ndarray | None]:
    tensors: dict[str, np.ndarray | None] = dict(_valid(double_quant))
    tensors.update(changes)
    return tensors


#: name -> (tensors after A (None: omitted), attribute changes (None: removed), A's shape, feed B/absmax as
#: graph inputs instead of initializers). Every one must be refused by the op.
CRAFTED: dict[str, tuple[dict, dict, tuple[int, ...], bool]] = {
    "K_larger_than_B": (_with(), {"K": 1000}, (2, 1000), False),
    "K_smaller_than_B": (_with(), {"K": 33}, (2, 33), False),
    "N_larger_than_B": (_with(), {"N": 100}, (2, BK), False),
    "N_smaller_than_B": (_with(), {"N": 2}, (2, BK), False),
    "block_size_disagrees": (_with(), {"block_size": 64}, (2, BK), False),
    "block_size_24": (_with(), {"block_size": 24}, (2, BK), False),
    "block_size_8": (_with(), {"block_size": 8}, (2, BK), False),
    "block_size_zero": (_with(), {"block_size": 0}, (2, BK), False),
    "block_size_negative": (_with(), {"block_size": -32}, (2, BK), False),
    "block_size_2_pow_40": (_with(), {"block_size": 2**40}, (2, BK), False),
    "K_zero": (_with(), {"K": 0}, (2, 0), False),
    "N_zero": (_with(), {"N": 0}, (2, BK), False),
    "K_negative": (_with(), {"K": -96}, (2, BK), False),
    "N_negative": (_with(), {"N": -8}, (2, BK), False),
    "K_and_N_2_pow_62": (_with(), {"K": 2**62, "N": 2**62}, (2, BK), False),
    "N_2_pow_61_overflows_the_size": (_with(), {"N": 2**61}, (2, BK), False),
    "K_missing": (_with(), {"K": None}, (2, BK), False),
    "B_short": (_with(B=np.zeros((BN, 3, 15), np.uint8)), {}, (2, BK), False),
    "B_empty": (_with(B=np.zeros((0,), np.uint8)), {}, (2, BK), False),
    "B_flat_right_size": (_with(B=np.zeros((BN * 3 * 16,), np.uint8)), {}, (2, BK), False),
    "B_int8": (_with(B=np.zeros((BN, 3, 16), np.int8)), {}, (2, BK), False),
    "B_short_runtime_input": (_with(B=np.zeros((BN, 2, 16), np.uint8)), {}, (2, BK), True),
    "absmax_short": (_with(absmax=np.ones((BN, 2), np.float32)), {}, (2, BK), False),
    "absmax_long": (_with(absmax=np.ones((BN + 1, 3), np.float32)), {}, (2, BK), False),
    "absmax_float16": (_with(absmax=np.ones((BN, 3), np.float16)), {}, (2, BK), False),
    "absmax_int32": (_with(absmax=np.ones((BN, 3), np.int32)), {}, (2, BK), False),
    "absmax_short_runtime_input": (_with(absmax=np.ones((BN, 1), np.float32)), {}, (2, BK), True),
    "uint8_absmax_without_nested": (_with(absmax=np.ones((BN, 3), np.uint8)), {}, (2, BK), False),
    "float_absmax_with_nested": (_with(True, absmax=np.ones((BN, 3), np.float32)), {}, (2, BK), False),
    "nested_absmax_empty": (_with(True, nested_absmax=np.zeros(0, np.float32)), {}, (2, BK), False),
    "nested_absmax_float16": (_with(True, nested_absmax=np.ones(1, np.float16)), {}, (2, BK), False),
    "nested_code_255": (_with(True, nested_code=np.zeros(255, np.float32)), {}, (2, BK), False),
    "nested_code_2d": (_with(True, nested_code=np.zeros((16, 16), np.float32)), {}, (2, BK), False),
    "nested_code_missing": (_with(True, nested_code=None), {}, (2, BK), False),
    "absmax_offset_two_values": (_with(True, absmax_offset=np.zeros(2, np.float32)), {}, (2, BK), False),
    "absmax_offset_missing": (_with(True, absmax_offset=None), {}, (2, BK), False),
    "nested_block_size_7": (_with(True), {"nested_block_size": 7}, (2, BK), False),
    "nested_block_size_zero": (_with(True), {"nested_block_size": 0}, (2, BK), False),
    "nested_block_size_negative": (_with(True), {"nested_block_size": -256}, (2, BK), False),
    "nested_block_size_16_needs_2": (_with(True), {"nested_block_size": 16}, (2, BK), False),
    "bias_short": (_with(bias=np.zeros(BN - 1, np.float32)), {}, (2, BK), False),
    "bias_float16": (_with(bias=np.zeros(BN, np.float16)), {}, (2, BK), False),
    "A_last_dim_differs": (_with(), {}, (2, BK + 1), False),
    "A_scalar": (_with(), {}, (), False),
}

WORKER = r"""
import json, sys
sys.path.insert(0, {tests_dir!r})
import test_bad_inputs as t
for name in sys.argv[1:]:
    print(json.dumps({{"start": name}}), flush=True)
    try:
        y = t.run_crafted(name)
        print(json.dumps({{"case": name, "outcome": "ok", "message": str(y.shape)}}), flush=True)
    except Exception as err:
        print(json.dumps({{"case": name, "outcome": "error", "message": str(err)}}), flush=True)
"""


def crafted_model(name: str) -> bytes:
    tensors, changes, a_shape, as_inputs = CRAFTED[name]
    order = ["B", "absmax", "nested_absmax", "nested_code", "absmax_offset", "bias"]
    given = [key for key in order if tensors.get(key) is not None]
    last = max(order.index(key) for key in given)
    inputs = ["A"] + [key if tensors.get(key) is not None else "" for key in order[: last + 1]]
    attrs = {"K": BK, "N": BN, "block_size": BBS, **changes}
    node = helper.make_node(
        "MatMulNF4", inputs, ["Y"], domain="onnx_nf4", name="nf4", **{k: v for k, v in attrs.items() if v is not None}
    )
    fed = {"B", "absmax"} if as_inputs else set()
    graph_inputs = [helper.make_tensor_value_info("A", TensorProto.FLOAT, None if not a_shape else ["M", None])]
    graph_inputs += [
        helper.make_tensor_value_info(key, helper.np_dtype_to_tensor_dtype(tensors[key].dtype), None)
        for key in given
        if key in fed
    ]
    graph = helper.make_graph(
        [node],
        "g",
        graph_inputs,
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(tensors[key]), key) for key in given if key not in fed],
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("onnx_nf4", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString()


def run_crafted(name: str) -> np.ndarray:
    """Create a session for crafted case ``name`` and run it (in the worker process)."""
    import onnxruntime as ort

    from onnx_nf4.runtime import session_options

    tensors, _, a_shape, as_inputs = CRAFTED[name]
    feeds = {"A": np.ones(a_shape, np.float32)}
    if as_inputs:
        feeds.update(B=tensors["B"], absmax=tensors["absmax"])
    sess = ort.InferenceSession(crafted_model(name), session_options(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


@pytest.fixture(scope="module")
def crafted_outcomes() -> dict[str, dict]:
    """Run every crafted case in worker processes; a case that kills its worker is recorded as a crash."""
    pytest.importorskip("onnxruntime")
    from onnx_nf4.runtime import CustomOpLibraryNotFoundError, custom_op_library

    try:
        custom_op_library()
    except CustomOpLibraryNotFoundError as exc:
        pytest.skip(str(exc))
    script = WORKER.format(tests_dir=str(Path(__file__).resolve().parent))
    pending, outcomes = list(CRAFTED), {}
    while pending:
        proc = subprocess.run([sys.executable, "-c", script, *pending], capture_output=True, text=True, timeout=300)
        started = None
        for line in proc.stdout.splitlines():
            record = json.loads(line)
            if "start" in record:
                started = record["start"]
            else:
                outcomes[record["case"]] = record
        if proc.returncode != 0:
            assert started is not None and started not in outcomes, proc.stderr[-3000:]
            outcomes[started] = {"case": started, "outcome": "crash", "message": f"exit {proc.returncode}"}
        pending = [name for name in pending if name not in outcomes]
    return outcomes


@pytest.mark.parametrize("name", list(CRAFTED))
def test_crafted_model_is_an_onnxruntime_error(crafted_outcomes, name):
    outcome = crafted_outcomes[name]
    assert outcome["outcome"] == "error", outcome
    assert "MatMulNF4" in outcome["message"] or "nf4" in outcome["message"], outcome


def test_crafted_model_valid_baseline_runs():
    """The crafted cases break a node that runs (so each error comes from the change it makes)."""
    pytest.importorskip("onnxruntime")
    CRAFTED["_valid"] = (_with(True, bias=np.zeros(BN, np.float32)), {}, (2, BK), False)
    try:
        assert run_crafted("_valid").shape == (2, BN)
    finally:
        del CRAFTED["_valid"]


DEQUANTIZE_CASES = [
    name for name in CRAFTED if not name.startswith(("A_", "bias", "K_missing")) and not name.endswith("runtime_input")
]


@pytest.mark.parametrize("name", DEQUANTIZE_CASES)
def test_dequantize_and_inspect_crafted_models(name, tmp_path, capsys):
    """``dequantize_model`` refuses every inconsistent node with a ``ValueError`` naming it; inspect never crashes."""
    path = tmp_path / "crafted.onnx"
    path.write_bytes(crafted_model(name))
    with pytest.raises(ValueError, match=r"MatMulNF4 node 'nf4'"):
        dequantize_model(path)
    assert_cli_error(capsys, ("dequantize", path, tmp_path / "out.onnx"), "MatMulNF4 node 'nf4'")
    code, err = run_cli(capsys, "inspect", path)
    assert code in (0, 1) and (code == 0 or len(err.strip().splitlines()) == 1), err
    assert not (tmp_path / "out.onnx").exists()


def test_quantizing_an_already_quantized_model_leaves_it(tmp_path):
    """A model that is already NF4 (here a crafted, inconsistent one) is not touched by the pass."""
    path = tmp_path / "crafted.onnx"
    path.write_bytes(crafted_model("K_larger_than_B"))
    _, report = quantize_model(path, tmp_path / "out.onnx")
    assert not report.layers and not report.skipped
    out = ir.load(tmp_path / "out.onnx")
    assert [n.op_type for n in out.graph] == ["MatMulNF4"]
