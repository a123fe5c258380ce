"""Concurrency: one ``InferenceSession`` run from 8 threads at once, and several sessions loading the library.

The model chains three ``MatMulNF4`` layers (float32 absmax, double quantization with bias, and
``accuracy_level=4``, whose int8 path uses scratch buffers), so that every kernel kind runs concurrently, on rows
from 1 (the matrix-vector path) to 64 (the tiled path). Results must be bit-identical to serial runs: the
kernels may not share mutable state between calls.
"""

from __future__ import annotations

import gc
import itertools
import threading

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnx_nf4
from onnx_nf4.runtime import CustomOpLibraryNotFoundError, custom_op_library, session_options

ort = pytest.importorskip("onnxruntime")
try:
    custom_op_library()
except CustomOpLibraryNotFoundError as exc:  # pragma: no cover - depends on the build
    pytest.skip(str(exc), allow_module_level=True)

THREADS = 8
ROUNDS = 15
DIMS = [256, 384, 192, 128]  # K of layer i is DIMS[i], N is DIMS[i + 1]


def three_layer_model() -> bytes:
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    x = "A"
    for i, (K, N) in enumerate(itertools.pairwise(DIMS)):
        w = (rng.standard_normal((K, N)) * 0.05).astype(np.float32)
        q = onnx_nf4.quantize_weight(w, 64, double_quant=i == 1)
        names = [f"B{i}", f"absmax{i}"]
        inits += [numpy_helper.from_array(q.packed, names[0]), numpy_helper.from_array(q.absmax, names[1])]
        attrs = {"K": K, "N": N, "block_size": 64, "accuracy_level": 4 if i == 2 else 0}
        if q.nested is not None:
            names += [f"nested_absmax{i}", f"nested_code{i}", f"absmax_offset{i}", f"bias{i}"]
            inits += [
                numpy_helper.from_array(q.nested.nested_absmax, names[2]),
                numpy_helper.from_array(q.nested.code, names[3]),
                numpy_helper.from_array(np.asarray(q.nested.offset, np.float32), names[4]),
                numpy_helper.from_array(rng.standard_normal(N).astype(np.float32), names[5]),
            ]
            attrs["nested_block_size"] = q.nested.block_size
        y = f"Y{i}" if i < len(DIMS) - 2 else "Y"
        nodes.append(helper.make_node("MatMulNF4", [x, *names], [y], domain="onnx_nf4", name=f"nf4_{i}", **attrs))
        x = y
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("A", onnx.TensorProto.FLOAT, ["M", DIMS[0]])],
        [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, ["M", DIMS[-1]])],
        inits,
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("onnx_nf4", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString()


MODEL = three_layer_model()
INPUTS = [
    np.random.default_rng(10 + t).standard_normal((rows, DIMS[0])).astype(np.float32)
    for t, rows in enumerate([1, 2, 3, 7, 16, 33, 64, 5])
]


def new_session(threads: int = 2) -> ort.InferenceSession:
    return ort.InferenceSession(
        MODEL, session_options(intra_op_num_threads=threads), providers=["CPUExecutionProvider"]
    )


def run_in_threads(work, count: int) -> list:
    """Run ``work(i)`` in ``count`` threads started together; return the results, re-raising any error."""
    barrier = threading.Barrier(count)
    results: list = [None] * count
    errors: list[BaseException] = []

    def body(i: int) -> None:
        try:
            barrier.wait()
            results[i] = work(i)
        except BaseException as err:  # collected and re-raised in the main thread
            errors.append(err)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("intra_op_threads", [1, 2])
def test_one_session_from_eight_threads_equals_serial_runs(intra_op_threads):
    sess = new_session(intra_op_threads)
    serial = [sess.run(None, {"A": a})[0] for a in INPUTS]

    def work(i: int) -> list[np.ndarray]:
        return [sess.run(None, {"A": INPUTS[(i + r) % THREADS]})[0] for r in range(ROUNDS)]

    for i, outputs in enumerate(run_in_threads(work, THREADS)):
        for r, y in enumerate(outputs):
            np.testing.assert_array_equal(y, serial[(i + r) % THREADS], err_msg=f"thread {i}, round {r}")


def test_two_sessions_each_load_the_library_and_outlive_each_other():
    """Each ``session_options()`` registers the library again; sessions work side by side and alone."""
    first, second = new_session(), new_session()
    expected = [first.run(None, {"A": a})[0] for a in INPUTS]
    for a, y in zip(INPUTS, expected, strict=True):
        np.testing.assert_array_equal(second.run(None, {"A": a})[0], y)
    del first
    gc.collect()  # the first session and its options are gone: the library must stay usable by the second
    for a, y in zip(INPUTS, expected, strict=True):
        np.testing.assert_array_equal(second.run(None, {"A": a})[0], y)
    del second
    gc.collect()
    np.testing.assert_array_equal(new_session().run(None, {"A": INPUTS[3]})[0], expected[3])


def test_sessions_created_and_run_in_parallel():
    """Eight threads each create their own session (eight registrations at once) and run it."""
    expected = [new_session().run(None, {"A": a})[0] for a in INPUTS]

    def work(i: int) -> np.ndarray:
        return new_session(1).run(None, {"A": INPUTS[i]})[0]

    for i, y in enumerate(run_in_threads(work, THREADS)):
        np.testing.assert_array_equal(y, expected[i], err_msg=f"thread {i}")
