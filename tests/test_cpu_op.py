"""The C++ ``MatMulNF4`` CPU op against the numpy reference (``onnx_nf4.op.reference.matmul_nf4``).

Needs the compiled library (``pip install .`` or ``tools/build_dev.sh``); skipped without it. The SIMD kernel
sets are each checked by re-running a few cases in a subprocess with ``ONNX_NF4_CPU_ISA`` capped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from models import float32_tolerance, reference_matmul
from onnx import helper, numpy_helper

import onnx_nf4
from onnx_nf4.runtime import CustomOpLibraryNotFoundError, custom_op_library, session_options

ort = pytest.importorskip("onnxruntime")
try:
    custom_op_library()
except CustomOpLibraryNotFoundError as exc:  # pragma: no cover - depends on the build
    pytest.skip(str(exc), allow_module_level=True)


def nf4_node_model(
    q: onnx_nf4.QuantizedWeight,
    a_shape: list[int | str],
    *,
    dtype=np.float32,
    bias: np.ndarray | None = None,
    accuracy_level: int = 0,
    float32_io: bool = False,
) -> onnx.ModelProto:
    """One ``MatMulNF4`` node with the weight of ``q`` as initializers; input ``A`` of ``a_shape``.

    ``float32_io``: the graph's A and Y are float32, cast to and from ``dtype`` around the node (for bfloat16,
    which onnxruntime's Python API cannot feed).
    """
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = [numpy_helper.from_array(q.packed, "B"), numpy_helper.from_array(q.absmax, "absmax")]
    inputs = ["A", "B", "absmax"]
    if q.nested is not None:
        inits += [
            numpy_helper.from_array(q.nested.nested_absmax, "nested_absmax"),
            numpy_helper.from_array(q.nested.code, "nested_code"),
            numpy_helper.from_array(np.asarray(q.nested.offset, dtype=np.float32), "absmax_offset"),
        ]
        inputs += ["nested_absmax", "nested_code", "absmax_offset"]
    if bias is not None:
        inputs += [""] * (6 - len(inputs)) + ["bias"]
        inits.append(numpy_helper.from_array(bias, "bias"))
    attrs = {"K": q.K, "N": q.N, "block_size": q.block_size, "accuracy_level": accuracy_level}
    if q.nested is not None:
        attrs["nested_block_size"] = q.nested.block_size
    nodes = [helper.make_node("MatMulNF4", inputs, ["Y"], domain="onnx_nf4", name="nf4", **attrs)]
    io_elem = elem
    if float32_io:
        io_elem = onnx.TensorProto.FLOAT
        nodes[0].input[0], nodes[0].output[0] = "A_cast", "Y_cast"
        nodes.insert(0, helper.make_node("Cast", ["A"], ["A_cast"], to=elem))
        nodes.append(helper.make_node("Cast", ["Y_cast"], ["Y"], to=io_elem))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("A", io_elem, a_shape)],
        [helper.make_tensor_value_info("Y", io_elem, None)],
        inits,
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("onnx_nf4", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def run_op(model: onnx.ModelProto, a: np.ndarray, threads: int = 2) -> np.ndarray:
    sess = ort.InferenceSession(
        model.SerializeToString(), session_options(intra_op_num_threads=threads), providers=["CPUExecutionProvider"]
    )
    return sess.run(None, {"A": a})[0]


def assert_float32_close(y: np.ndarray, ref: np.ndarray, q: onnx_nf4.QuantizedWeight, a: np.ndarray, bias=None) -> None:
    """``y`` within the spec's float32 bound of the reference ``ref`` (``models.float32_tolerance``)."""
    err = np.abs(y.astype(np.float64) - ref.astype(np.float64))
    tol = float32_tolerance(q, a, bias)
    assert (err <= tol).all(), f"max error {err.max():.3e}, worst ratio to bound {(err / tol).max():.2f}"


def make_case(K: int, N: int, bs: int, *, double_quant: bool = False, zero_blocks: bool = False, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((K, N)) * 0.05).astype(np.float32)
    if zero_blocks:
        w[: min(K, bs), :] = 0.0  # the first block of every column is all zero
        w[:, N // 2] = 0.0  # and one whole column
    return onnx_nf4.quantize_weight(w, bs, double_quant=double_quant)


# (K, N, block_size, A shape with K last)
SHAPES = [
    (64, 8, 64, [1, 64]),
    (100, 7, 32, [3, 100]),  # K not a multiple of the block size
    (40, 5, 64, [17, 40]),  # K < block size
    (300, 1, 64, [17, 300]),  # N = 1
    (256, 96, 16, [20, 256]),  # smallest block
    (1000, 33, 128, [128, 1000]),
    (520, 70, 4096, [3, 520]),  # largest block
    (128, 40, 64, [2, 3, 128]),  # batched 3-D A
    (96, 24, 32, [0, 96]),  # M = 0
    (96, 24, 32, [2, 0, 96]),
    (72, 50, 16, [5, 72]),  # K % 32 != 0 with block 16
    (9000, 6, 64, [1, 9000]),  # one row longer than L1: K walked in pieces
    (3000, 20, 64, [5, 3000]),  # five rows: pieces too
    (203, 53, 32, [61, 203]),  # packed GEMM: partial row slivers, column groups and 16-k steps
    (77, 100, 16, [2, 25, 77]),  # packed GEMM from a batched A, block 16
]


@pytest.mark.parametrize(("K", "N", "bs", "a_shape"), SHAPES)
def test_float32_matches_reference(K, N, bs, a_shape):
    q = make_case(K, N, bs)
    a = np.random.default_rng(1).standard_normal(a_shape).astype(np.float32)
    y = run_op(nf4_node_model(q, ["M"] * (len(a_shape) - 1) + [K]), a)
    ref = reference_matmul(q, a)
    assert y.shape == (*a_shape[:-1], N) and y.dtype == np.float32
    assert_float32_close(y, ref, q, a)


@pytest.mark.parametrize("M", [1, 3, 17, 128])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("K", "N"), [(200, 45), (520, 301)])  # 520 x 301: enough work per row to use the threads
def test_rows_and_threads(M, threads, K, N):
    q = make_case(K, N, 64, seed=M)
    a = np.random.default_rng(M).standard_normal((M, K)).astype(np.float32)
    y = run_op(nf4_node_model(q, ["M", K]), a, threads=threads)
    assert_float32_close(y, reference_matmul(q, a), q, a)


@pytest.mark.parametrize("M", [1, 3, 17, 128])
def test_bias_double_quant_and_zero_blocks(M):
    K, N = 384, 300  # N * k_blocks = 1800 absmax entries: several nested blocks, the last one partial
    q = make_case(K, N, 64, double_quant=True, zero_blocks=True, seed=M)
    bias = np.random.default_rng(5).standard_normal(N).astype(np.float32)
    a = np.random.default_rng(M).standard_normal((M, K)).astype(np.float32)
    y = run_op(nf4_node_model(q, ["M", K], bias=bias), a)
    ref = reference_matmul(q, a, bias)
    assert_float32_close(y, ref, q, a, bias)
    assert np.all(y[:, N // 2] == bias[N // 2])  # an all-zero column contributes exactly nothing


def test_exact_for_representable_products():
    """With A = one-hot rows the product is a single weight: the op must return it bit for bit."""
    q = make_case(130, 20, 64, double_quant=True)
    a = np.eye(130, dtype=np.float32)[[0, 63, 64, 129]]
    y = run_op(nf4_node_model(q, ["M", 130]), a)
    np.testing.assert_array_equal(y, reference_matmul(q, a))
    np.testing.assert_array_equal(y, onnx_nf4.dequantize_weight(q)[[0, 63, 64, 129]])


@pytest.mark.parametrize("K", [1, 3, 37])
@pytest.mark.parametrize("scale", [8e-41, 1e-39, 3e-44])
def test_subnormal_weights_within_the_bound(K, scale):
    """Block scales so small that every weight ``fl32(NF4[q] * s)`` is subnormal: the reference rounds each weight
    to the subnormal grid and multiplies that rounding by ``|A|``, the kernels scale exact sums (a property-test
    case, K = 1 with a double-quantized scale near 8e-41, differed by two steps of 2^-149); the spec's bound has a
    ``2^-149 * sum_k |A|`` term for it."""
    for seed in range(8):
        rng = np.random.default_rng(seed)
        kb = -(-K // 32)
        packed = rng.integers(0, 256, (1, kb, 16), dtype=np.uint8)
        q = onnx_nf4.QuantizedWeight(K, 1, 32, packed, np.full((1, kb), scale, np.float32))
        a = rng.standard_normal((12, K)).astype(np.float32)
        assert_float32_close(run_op(nf4_node_model(q, ["M", K]), a), reference_matmul(q, a), q, a)


def test_float16_activations():
    K, N = 160, 48
    q = make_case(K, N, 32)
    a = np.random.default_rng(2).standard_normal((5, K)).astype(np.float16)
    bias = np.random.default_rng(3).standard_normal(N).astype(np.float16)
    y = run_op(nf4_node_model(q, ["M", K], dtype=np.float16, bias=bias), a)
    assert y.dtype == np.float16
    ref = reference_matmul(q, a, bias).astype(np.float32)
    # float32 accumulation, one rounding to float16 at the end
    np.testing.assert_allclose(y.astype(np.float32), ref, rtol=2e-3, atol=2e-3)


def test_bfloat16_activations():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    K, N = 160, 48
    q = make_case(K, N, 32)
    a = np.random.default_rng(2).standard_normal((4, K)).astype(ml_dtypes.bfloat16).astype(np.float32)
    y = run_op(nf4_node_model(q, ["M", K], dtype=ml_dtypes.bfloat16, float32_io=True), a)
    ref = reference_matmul(q, a.astype(ml_dtypes.bfloat16)).astype(np.float32)
    np.testing.assert_allclose(y.astype(np.float32), ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize(("K", "bs", "M"), [(512, 64, 1), (300, 128, 5), (200, 32, 3), (96, 16, 2), (256, 64, 40)])
def test_accuracy_level_4_error(K, bs, M):
    """int8 activations: the documented error (docs/cpu_kernel.md) stays below 2% of the output norm."""
    q = make_case(K, 64, bs)
    a = np.random.default_rng(4).standard_normal((M, K)).astype(np.float32)
    y = run_op(nf4_node_model(q, ["M", K], accuracy_level=4), a)
    ref = reference_matmul(q, a)
    rel = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    assert rel < 2e-2
    assert not np.array_equal(y, ref) or M >= 32  # small M really takes the int8 path


ISA_SCRIPT = r"""
import json, sys
import numpy as np
sys.path.insert(0, {tests_dir!r})
import test_cpu_op as t
out = []
for (K, N, bs, M, acc) in [(300, 37, 64, 1, 0), (300, 37, 64, 5, 0), (300, 37, 16, 20, 0), (1000, 70, 128, 40, 0),
                            (203, 53, 32, 61, 0), (9000, 9, 64, 1, 0), (512, 37, 64, 3, 4), (256, 37, 32, 2, 4),
                            (96, 20, 16, 2, 4)]:
    q = t.make_case(K, N, bs, double_quant=(K == 300), seed=K + M)
    a = np.random.default_rng(M).standard_normal((M, K)).astype(np.float32)
    y = t.run_op(t.nf4_node_model(q, ["M", K], accuracy_level=acc), a)
    ref = t.reference_matmul(q, a)
    if acc == 0:
        t.assert_float32_close(y, ref, q, a)
    out.append(float(np.linalg.norm(y - ref) / np.linalg.norm(ref)))
import ctypes
lib = ctypes.CDLL(t.custom_op_library())
lib.OnnxNF4CpuKernelSet.restype = ctypes.c_char_p
print(json.dumps({{"set": lib.OnnxNF4CpuKernelSet().decode(), "errors": out}}))
"""


@pytest.mark.parametrize("isa", ["avx512", "avx2vnni", "avx2", "portable"])
def test_every_kernel_set(isa):
    """Every kernel set this CPU runs (ONNX_NF4_CPU_ISA caps the choice) gives the reference's results."""
    env = dict(os.environ, ONNX_NF4_CPU_ISA=isa)
    script = ISA_SCRIPT.format(tests_dir=str(Path(__file__).resolve().parent))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["set"] != isa:
        pytest.skip(f"this CPU does not run the {isa} kernels (chosen: {result['set']})")
    assert all(e < 2e-2 for e in result["errors"][6:])  # accuracy_level 4 cases


def infinite_scale_case(M: int, N: int = 5, K: int = 60, bs: int = 32, seed: int = 0):
    """A weight whose column 1 has scale +Inf in its last block, with only code 15 (1.0) among the real k of that
    block and code 0 (-1.0) in every padding nibble, and ``A >= 0.5``: column 1 of ``Y`` is +Inf (rules 2 and 3;
    padding never contributes), whereas a kernel that let the padding reach the arithmetic would produce NaN."""
    rng = np.random.default_rng(seed)
    q = make_case(K, N, bs, seed=seed)
    codes = np.stack([q.packed.reshape(N, -1) >> 4, q.packed.reshape(N, -1) & 0xF], axis=-1).reshape(N, -1)
    last = (q.k_blocks - 1) * bs
    codes[1, last:K] = 15
    codes[:, K:] = 0
    packed = ((codes[:, 0::2] << 4) | codes[:, 1::2]).astype(np.uint8).reshape(q.packed.shape)
    absmax = q.absmax.copy()
    absmax[1, -1] = np.inf
    a = rng.uniform(0.5, 1.5, (M, K)).astype(np.float32)
    return onnx_nf4.QuantizedWeight(K, N, bs, packed, absmax), a


INFINITE_SCALE_SCRIPT = r"""
import json, sys
import numpy as np
sys.path.insert(0, {tests_dir!r})
import test_cpu_op as t
out = []
for M in (1, 2, 3, 5, 9, 16, 17, 40, 48, 61):
    q, a = t.infinite_scale_case(M)
    y = t.run_op(t.nf4_node_model(q, ["M", q.K]), a)
    ref = t.reference_matmul(q, a)
    finite = np.ones(q.N, bool)
    finite[1] = False
    err = np.abs(y - ref)[:, finite]
    assert (err <= t.float32_tolerance(q, a)[:, finite]).all(), err.max()
    out.append([M, bool(np.all(y[:, 1] == np.inf)), bool(np.all(ref[:, 1] == np.inf))])
print(json.dumps(out))
"""


INFINITE_SCALE_INT8_SCRIPT = r"""
import json, sys
import numpy as np
sys.path.insert(0, {tests_dir!r})
import test_cpu_op as t
out = []
for K, bs in ((60, 32), (120, 64), (250, 128)):
    for M in (1, 2, 3, 5, 9, 16, 17, 40):
        q, a = t.infinite_scale_case(M, K=K, bs=bs)
        y = t.run_op(t.nf4_node_model(q, ["M", q.K], accuracy_level=4), a)
        others = np.delete(y, 1, axis=1)
        out.append([K, M, bool(np.all(y[:, 1] == np.inf)), bool(np.isfinite(others).all())])
print(json.dumps(out))
"""


@pytest.mark.parametrize("isa", ["avx512", "avx2vnni", "avx2", "portable"])
def test_infinite_scale_gives_inf_with_int8_activations(isa):
    """``accuracy_level = 4`` on every path (weight streaming and packed panels, with and without the unsigned-weight
    bias of VNNI): a column whose last block has an infinite scale is +Inf, never NaN (the bias correction stays in
    the block's integer sum), and padding does not reach the arithmetic."""
    env = dict(os.environ, ONNX_NF4_CPU_ISA=isa)
    script = INFINITE_SCALE_INT8_SCRIPT.format(tests_dir=str(Path(__file__).resolve().parent))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for K, M, column_inf, others_finite in json.loads(proc.stdout.strip().splitlines()[-1]):
        assert column_inf, f"K={K} M={M}: column 1 is not +Inf in every row"
        assert others_finite, f"K={K} M={M}"


@pytest.mark.parametrize("isa", ["avx512", "avx2vnni", "avx2", "portable"])
def test_padding_never_reaches_the_arithmetic(isa):
    """Every float32 path of every kernel set (rows 1 to 61: weight streaming, Y^T tiles, packed GEMM) gives +Inf,
    not NaN, for a column whose last block has an infinite scale and padding codes that decode to -Inf. On a CPU
    without AVX-512 the ``avx512`` cap runs the best kernel set there."""
    env = dict(os.environ, ONNX_NF4_CPU_ISA=isa)
    script = INFINITE_SCALE_SCRIPT.format(tests_dir=str(Path(__file__).resolve().parent))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for M, kernel_inf, reference_inf in json.loads(proc.stdout.strip().splitlines()[-1]):
        assert reference_inf, M
        assert kernel_inf, f"M={M}: column 1 is not +Inf in every row"


@pytest.mark.parametrize("double_quant", [False, True])
def test_minilm_embeddings_match_reference(minilm_fp32_path, minilm_inputs, tmp_path, double_quant):
    """The NF4 MiniLM in onnxruntime with the C++ op gives the embeddings of the reference runtime
    (``onnx.reference`` with ``onnx_nf4.op.reference.REFERENCE_OPS``), on 4 of the sentences."""
    from onnx.reference import ReferenceEvaluator

    from onnx_nf4.op.reference import REFERENCE_OPS

    path = tmp_path / "minilm_nf4.onnx"
    onnx_nf4.quantize_model(str(minilm_fp32_path), str(path), block_size=64, double_quant=double_quant)
    model = onnx.load(str(path))
    assert any(n.op_type == "MatMulNF4" for n in model.graph.node)
    feeds = {name: value[:4] for name, value in minilm_inputs.items()}
    ours = ort.InferenceSession(str(path), session_options(intra_op_num_threads=2), providers=["CPUExecutionProvider"])
    ref = ReferenceEvaluator(model, new_ops=REFERENCE_OPS).run(None, feeds)
    for y, r, out in zip(ours.run(None, feeds), ref, ours.get_outputs(), strict=True):
        np.testing.assert_allclose(y, r, rtol=1e-4, atol=2e-5, err_msg=out.name)
