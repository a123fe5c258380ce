"""The real model: all-MiniLM-L6-v2 quantized by the ``onnx-nf4`` command line, run on 24 real sentences.

Embeddings are mean-pooled ``last_hidden_state`` (sentence-transformers' pooling). The NF4 models run on the
numpy reference runtime (``onnx_nf4::MatMulNF4`` format) and on stock onnxruntime (``com.microsoft`` format), and
are compared with the float32 model and with the model that onnxruntime's own ``MatMulBnb4Quantizer`` produces.
Run with ``pytest -s`` to see the measured cosines.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

ort = pytest.importorskip("onnxruntime")

REPO_ROOT = Path(__file__).resolve().parents[1]
BLOCK_SIZE = 64
LINEAR_LAYERS = 36  # 6 encoder layers x (query, key, value, attention output, intermediate, output)
ATTENTION_MATMULS = 12  # 6 layers x (Q @ K^T, softmax @ V): B is an activation
WORD_EMBEDDING = "bert.embeddings.word_embeddings.weight"
#: The models compared with onnxruntime's MatMulBnb4Quantizer (which quantizes MatMuls only) keep the embedding float.
MATMULS_ONLY = ("--embedding-min-rows", "1000000")


def quantize_with_cli(source: Path, target: Path, *options: str) -> str:
    """``python -m onnx_nf4 quantize SOURCE TARGET OPTIONS``; returns its stdout (the per-layer report)."""
    proc = subprocess.run(
        [sys.executable, "-m", "onnx_nf4", "quantize", str(source), str(target), *options],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    return proc.stdout


def ort_run(path: Path, inputs: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["last_hidden_state"], inputs)[0]


def nodes(path: Path, op_type: str) -> list[onnx.NodeProto]:
    return [node for node in onnx.load(path).graph.node if node.op_type == op_type]


def rewritten_weight_ratio(path: Path, op_type: str) -> float:
    """Bytes of the distinct tensors holding the NF4 weights / bytes of the float32 weights they replace."""
    model = onnx.load(path)
    sizes = {init.name: len(init.raw_data) for init in model.graph.initializer}
    stored: set[str] = set()
    float_bytes = 0
    for node in model.graph.node:
        if node.op_type != op_type:
            continue
        attrs = {attr.name: attr.i for attr in node.attribute}
        float_bytes += 4 * attrs["K"] * attrs["N"]
        weight_inputs = node.input[1:6] if op_type == "MatMulNF4" else node.input[1:3]
        stored.update(name for name in weight_inputs if name)
    assert all(name in sizes for name in stored)
    return sum(sizes[name] for name in stored) / float_bytes


def report_cosine(label: str, cos: np.ndarray) -> None:
    print(f"\n[minilm] {label}: cosine min {cos.min():.6f} mean {cos.mean():.6f} over {cos.size} sentences")


@pytest.fixture(scope="module")
def reference_run(minilm):
    """``tools/example.py``'s ``run_reference(path, inputs)``: the numpy reference runtime with ``MatMulNF4``."""
    import example  # tools/ is on sys.path once the minilm fixture has run

    return example.run_reference


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("minilm_nf4")


@pytest.fixture(scope="module")
def nf4_path(minilm_fp32_path: Path, work: Path) -> tuple[Path, str]:
    out = work / "minilm_nf4.onnx"
    return out, quantize_with_cli(minilm_fp32_path, out, "--block-size", str(BLOCK_SIZE), *MATMULS_ONLY)


@pytest.fixture(scope="module")
def bnb4_path(minilm_fp32_path: Path, work: Path) -> Path:
    out = work / "minilm_bnb4.onnx"
    quantize_with_cli(
        minilm_fp32_path, out, "--block-size", str(BLOCK_SIZE), "--format", "com.microsoft", *MATMULS_ONLY
    )
    return out


@pytest.fixture(scope="module")
def ort_quantizer_path(minilm_fp32_path: Path, work: Path) -> Path:
    """The model of onnxruntime's own ``MatMulBnb4Quantizer`` (NF4, block size 64)."""
    from onnxruntime.quantization.matmul_bnb4_quantizer import MatMulBnb4Quantizer

    quantizer = MatMulBnb4Quantizer(onnx.load(minilm_fp32_path), MatMulBnb4Quantizer.NF4, BLOCK_SIZE)
    quantizer.process()
    out = work / "minilm_ort_quantizer.onnx"
    onnx.save(quantizer.model.model, out)
    return out


@pytest.fixture(scope="module")
def embed(minilm, minilm_inputs):
    def embed(hidden: np.ndarray) -> np.ndarray:
        return minilm.mean_pool(hidden, minilm_inputs["attention_mask"])

    return embed


@pytest.fixture(scope="module")
def fp32_embeddings(minilm_fp32_path: Path, minilm_inputs, embed) -> np.ndarray:
    return embed(ort_run(minilm_fp32_path, minilm_inputs))


@pytest.fixture(scope="module")
def ort_quantizer_embeddings(ort_quantizer_path: Path, minilm_inputs, embed) -> np.ndarray:
    return embed(ort_run(ort_quantizer_path, minilm_inputs))


@pytest.fixture(scope="module")
def nf4_reference_embeddings(nf4_path, reference_run, minilm_inputs, embed) -> np.ndarray:
    """Embeddings of the CLI's onnx_nf4-format model on the numpy reference runtime."""
    path, _ = nf4_path
    return embed(reference_run(path, minilm_inputs))


def test_cli_rewrites_the_36_linear_layers_and_skips_the_attention_matmuls(nf4_path, minilm_fp32_path) -> None:
    path, report = nf4_path
    assert len(nodes(minilm_fp32_path, "MatMul")) == LINEAR_LAYERS + ATTENTION_MATMULS
    assert len(nodes(path, "MatMulNF4")) == LINEAR_LAYERS
    remaining = nodes(path, "MatMul")
    assert len(remaining) == ATTENTION_MATMULS
    assert all("/attention/self/" in node.name for node in remaining)
    # The report lists each of them as skipped, with the reason.
    for node in remaining:
        line = next(line for line in report.splitlines() if line.startswith(node.name + " "))
        assert "B is not a constant" in line
    assert f"skipped {ATTENTION_MATMULS + 3} layer(s):" in report  # + the 3 embedding tables (MATMULS_ONLY)
    assert f"quantized {LINEAR_LAYERS} layer(s) to NF4, format onnx_nf4, block size {BLOCK_SIZE}" in report


def test_by_default_the_word_embedding_is_an_nf4_lookup_and_the_small_tables_stay_float(minilm_fp32_path, work):
    path = work / "minilm_default.onnx"
    report = quantize_with_cli(minilm_fp32_path, path)
    assert f"quantized {LINEAR_LAYERS + 1} layer(s) to NF4, format onnx_nf4, block size 64 (embedding tables 32)" in (
        report
    )
    model = onnx.load(path)
    assert WORD_EMBEDDING not in {init.name for init in model.graph.initializer}
    (lookup,) = (node for node in model.graph.node if node.domain == "onnx_nf4.lookup")
    inits = {init.name: init for init in model.graph.initializer}
    assert list(inits[lookup.input[1]].dims) == [30522, 384 // 32, 16]  # packed codes, block 32
    tables = [node for node in model.graph.node if node.op_type == "Gather" and node.input[0] in inits]
    assert sorted(list(inits[node.input[0]].dims) for node in tables) == [[2, 384], [512, 384]]


def test_reference_runtime_embeddings_match_fp32_and_onnxruntime_quantizer(
    nf4_reference_embeddings, fp32_embeddings, ort_quantizer_embeddings, minilm
) -> None:
    nf4 = nf4_reference_embeddings
    vs_fp32 = minilm.cosine(nf4, fp32_embeddings)
    vs_ort = minilm.cosine(nf4, ort_quantizer_embeddings)
    report_cosine("onnx_nf4 format (reference runtime) vs fp32", vs_fp32)
    report_cosine("onnx_nf4 format (reference runtime) vs MatMulBnb4Quantizer model", vs_ort)
    report_cosine("MatMulBnb4Quantizer model vs fp32", minilm.cosine(ort_quantizer_embeddings, fp32_embeddings))
    assert vs_fp32.size == 24
    assert vs_fp32.mean() >= 0.97
    assert vs_ort.min() >= 0.99999


def test_com_microsoft_format_on_stock_onnxruntime(
    bnb4_path, ort_quantizer_path, minilm_inputs, embed, fp32_embeddings, ort_quantizer_embeddings, minilm
) -> None:
    assert len(nodes(bnb4_path, "MatMulBnb4")) == LINEAR_LAYERS
    bnb4 = embed(ort_run(bnb4_path, minilm_inputs))
    vs_fp32 = minilm.cosine(bnb4, fp32_embeddings)
    vs_ort = minilm.cosine(bnb4, ort_quantizer_embeddings)
    report_cosine("com.microsoft format (onnxruntime) vs fp32", vs_fp32)
    report_cosine("com.microsoft format (onnxruntime) vs MatMulBnb4Quantizer model", vs_ort)
    assert vs_fp32.mean() >= 0.97
    assert vs_ort.min() >= 0.99999
    # Same codes and scales as onnxruntime's quantizer, node by node.
    ours, theirs = onnx.load(bnb4_path), onnx.load(ort_quantizer_path)
    ours_init = {init.name: init for init in ours.graph.initializer}
    theirs_init = {init.name: init for init in theirs.graph.initializer}
    pairs = list(zip(nodes(bnb4_path, "MatMulBnb4"), nodes(ort_quantizer_path, "MatMulBnb4"), strict=True))
    for a, b in pairs:
        for i in (1, 2):
            assert ours_init[a.input[i]].raw_data == theirs_init[b.input[i]].raw_data, (a.name, i)


def test_rewritten_weights_take_at_most_0145_of_their_fp32_bytes(nf4_path, bnb4_path) -> None:
    path, _ = nf4_path
    ratios = {
        "onnx_nf4": rewritten_weight_ratio(path, "MatMulNF4"),
        "com.microsoft": rewritten_weight_ratio(bnb4_path, "MatMulBnb4"),
    }
    print(f"\n[minilm] NF4 bytes / fp32 bytes of the rewritten weights: {ratios}")
    assert all(ratio <= 0.145 for ratio in ratios.values())


def test_double_quant_takes_at_most_013_and_keeps_the_accuracy(
    minilm_fp32_path, work, reference_run, minilm_inputs, embed, fp32_embeddings, minilm
) -> None:
    out = work / "minilm_nf4_dq.onnx"
    quantize_with_cli(minilm_fp32_path, out, "--block-size", str(BLOCK_SIZE), "--double-quant")
    ratio = rewritten_weight_ratio(out, "MatMulNF4")
    cos = minilm.cosine(embed(reference_run(out, minilm_inputs)), fp32_embeddings)
    print(f"\n[minilm] --double-quant: NF4 bytes / fp32 bytes {ratio:.4f}")
    report_cosine("onnx_nf4 format, double quantization (reference runtime) vs fp32", cos)
    assert ratio <= 0.13
    assert cos.mean() >= 0.97


def test_onnx_nf4_format_on_onnxruntime_with_the_custom_op_library(
    nf4_path, nf4_reference_embeddings, minilm_inputs, embed, fp32_embeddings, minilm
) -> None:
    from onnx_nf4.runtime import CustomOpLibraryNotFoundError, session_options

    try:
        options = session_options()
    except CustomOpLibraryNotFoundError as err:
        pytest.skip(str(err))
    path, _ = nf4_path
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    custom = embed(session.run(["last_hidden_state"], minilm_inputs)[0])
    vs_reference = minilm.cosine(custom, nf4_reference_embeddings)
    vs_fp32 = minilm.cosine(custom, fp32_embeddings)
    report_cosine("onnx_nf4 format (onnxruntime + custom ops) vs reference runtime", vs_reference)
    report_cosine("onnx_nf4 format (onnxruntime + custom ops) vs fp32", vs_fp32)
    assert vs_reference.min() >= 0.99999
    assert vs_fp32.mean() >= 0.97
