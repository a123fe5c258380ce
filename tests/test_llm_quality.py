"""``onnx-nf4 perplexity`` and ``--method gptq`` on onnxruntime-genai folders, on a tiny seeded Llama.

The model is built offline (``tools/llm_models.py``: random weights fixed by a seed, a tokenizer trained on the
built-in corpus). Perplexity is checked against a direct computation (onnxruntime logits of a hand-made feed,
numpy log-softmax, the same windows) and against PyTorch on the checkpoint the folder was built from.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from oracle_vectors import REPO_ROOT

pytest.importorskip("onnxruntime_genai")
pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import onnxruntime as ort

from onnx_nf4.cli import main
from onnx_nf4.genai.calibration import decoder_calibration
from onnx_nf4.genai.folder import GenaiFolderError, quantize_genai_folder
from onnx_nf4.genai.perplexity import perplexity

sys.path.insert(0, str(REPO_ROOT / "tools"))
import llm_models

pytestmark = pytest.mark.slow
WINDOW = 24
#: Evaluation and calibration texts: disjoint halves of the tokenizer's corpus.
EVAL_TEXT = " ".join(llm_models.CORPUS[::2])
CALIBRATION_TEXT = " ".join(llm_models.CORPUS[1::2])


@pytest.fixture(scope="module")
def checkpoint(tiny_llama_checkpoint: Path) -> Path:
    return tiny_llama_checkpoint


@pytest.fixture(scope="module")
def fp32(tiny_llama_genai: Path) -> Path:
    return tiny_llama_genai


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("texts")
    paths = {"eval": folder / "eval.txt", "calibration": folder / "calibration.txt"}
    paths["eval"].write_text(EVAL_TEXT, encoding="utf-8")
    paths["calibration"].write_text(CALIBRATION_TEXT, encoding="utf-8")
    return paths


def _token_ids(folder: Path, text: str) -> np.ndarray:
    from tokenizers import Tokenizer

    return np.array(Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text, add_special_tokens=False).ids)


def _direct_nll(folder: Path, ids: np.ndarray, window: int, library: str | None = None) -> tuple[float, int]:
    """Sum of -log p over every token after the first of each window, from a feed built here by hand."""
    config = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    options = ort.SessionOptions()
    if library:
        options.register_custom_ops_library(library)
    session = ort.InferenceSession(str(folder / config["filename"]), options, providers=["CPUExecutionProvider"])
    total, count = 0.0, 0
    for start in range(0, len(ids), window):
        part = ids[start : start + window]
        if len(part) < 2:
            continue
        feed = {}
        for value in session.get_inputs():
            if value.name == "input_ids":
                feed[value.name] = part[None, :].astype(np.int64)
            elif value.name == "attention_mask":
                feed[value.name] = np.ones((1, len(part)), np.int64)
            elif value.name == "position_ids":
                feed[value.name] = np.arange(len(part), dtype=np.int64)[None, :]
            else:
                feed[value.name] = np.zeros((1, config["num_key_value_heads"], 0, config["head_size"]), np.float32)
        shifted = session.run(["logits"], feed)[0][0].astype(np.float64)
        shifted -= shifted.max(axis=1, keepdims=True)
        log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        total -= float(log_softmax[np.arange(len(part) - 1), part[1:]].sum())
        count += len(part) - 1
    return total, count


def _torch_nll(checkpoint: Path, ids: np.ndarray, window: int) -> float:
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(ids), window):
            part = torch.tensor(ids[start : start + window])[None, :]
            if part.shape[1] < 2:
                continue
            logp = torch.log_softmax(model(part).logits[0].double(), dim=-1)
            total -= float(logp[torch.arange(part.shape[1] - 1), part[0, 1:]].sum())
    return total


def test_perplexity_equals_a_direct_computation_and_pytorch(checkpoint, fp32) -> None:
    ids = _token_ids(fp32, EVAL_TEXT)
    assert len(ids) % WINDOW not in (0, 1)  # a last, shorter window is scored too
    result = perplexity(fp32, EVAL_TEXT, window=WINDOW)
    total, count = _direct_nll(fp32, ids, WINDOW)
    assert result.tokens == count == len(ids) - math.ceil(len(ids) / WINDOW)
    assert result.windows == math.ceil(len(ids) / WINDOW) and result.text_tokens == len(ids)
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-9)
    assert result.perplexity == pytest.approx(math.exp(_torch_nll(checkpoint, ids, WINDOW) / count), rel=1e-4)
    assert math.exp(result.nll) == pytest.approx(result.perplexity)
    # Every token is scored from its own window only: a window of 2 scores each even-position pair alone.
    assert perplexity(fp32, EVAL_TEXT, window=2).tokens == len(ids) // 2


def test_perplexity_command_on_an_nf4_folder_with_its_library(fp32, texts, library, tmp_path, capsys) -> None:
    nf4 = tmp_path / "nf4"
    quantize_genai_folder(fp32, nf4, block_size=32)
    assert main(["perplexity", str(nf4), str(texts["eval"]), "--window", str(WINDOW), "--json", "-q"]) == 0
    record = json.loads(capsys.readouterr().out)
    ids = _token_ids(nf4, EVAL_TEXT)
    total, count = _direct_nll(nf4, ids, WINDOW, library)
    assert record["tokens"] == count and record["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-9)
    assert record["tokens_per_second"] > 0 and record["window"] == WINDOW
    assert main(["perplexity", str(nf4), str(texts["eval"]), "--window", str(WINDOW), "-q"]) == 0
    text = capsys.readouterr().out
    assert f"perplexity: {record['perplexity']:.4f}" in text and "tokens/s" in text and f"{count} scored" in text


def test_perplexity_refuses_bad_inputs(fp32, tmp_path, capsys) -> None:
    (tmp_path / "one.txt").write_text("The", encoding="utf-8")
    assert main(["perplexity", str(fp32), str(tmp_path / "one.txt"), "-q"]) == 1
    assert "at least 2 are needed" in capsys.readouterr().err
    assert main(["perplexity", str(fp32), str(tmp_path / "none.txt"), "-q"]) == 1
    assert "text file not found" in capsys.readouterr().err
    assert main(["perplexity", str(tmp_path), str(tmp_path / "one.txt"), "-q"]) == 1
    assert "genai_config.json" in capsys.readouterr().err
    assert main(["perplexity", str(fp32), str(tmp_path / "one.txt"), "--window", "4096", "-q"]) == 1
    assert "exceeds the model's context length (256)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["perplexity", str(fp32), str(tmp_path / "one.txt"), "--window", "1"])
    assert "at least 2 tokens" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# --method gptq on genai folders


def test_gptq_folder_from_text_is_deterministic_and_no_worse_than_rtn(fp32, texts, library, tmp_path, capsys) -> None:
    args = ["--block-size", "32", "--method", "gptq", "--calibration", str(texts["calibration"]), "-q"]
    for name in ("gptq_a", "gptq_b"):
        assert main(["quantize", str(fp32), str(tmp_path / name), *args]) == 0
    assert "output error" in capsys.readouterr().out
    a, b = (tmp_path / name / "model.onnx" for name in ("gptq_a", "gptq_b"))
    assert a.read_bytes() == b.read_bytes()
    assert (a.parent / "model.onnx.data").read_bytes() == (b.parent / "model.onnx.data").read_bytes()
    assert sum(node.op_type == "MatMulNF4" for node in onnx.load(str(a), load_external_data=False).graph.node) == 11
    quantize_genai_folder(fp32, tmp_path / "rtn", block_size=32)
    scores = {name: perplexity(tmp_path / name, EVAL_TEXT, window=WINDOW).perplexity for name in ("rtn", "gptq_a")}
    reference = perplexity(fp32, EVAL_TEXT, window=WINDOW).perplexity
    # Random weights: every variant is close to the float model; GPTQ must not be the worse one by much.
    assert abs(scores["gptq_a"] / reference - 1) <= abs(scores["rtn"] / reference - 1) + 0.01, (scores, reference)


def test_gptq_folder_from_an_npz_of_input_ids(fp32, texts, library, tmp_path) -> None:
    ids = _token_ids(fp32, CALIBRATION_TEXT)[: 2 * WINDOW].reshape(2, WINDOW)
    np.savez(tmp_path / "ids.npz", input_ids=ids)
    (feed,) = list(decoder_calibration(fp32, tmp_path / "ids.npz")())
    assert np.array_equal(feed["input_ids"], ids) and feed["attention_mask"].shape == ids.shape
    assert all(value.shape[2] == 0 for name, value in feed.items() if name.startswith("past_key_values"))
    reports = quantize_genai_folder(
        fp32, tmp_path / "out", block_size=32, method="gptq", calibration=tmp_path / "ids.npz"
    )
    assert all(layer.output_error is not None for layer in reports["model.onnx"].layers)


def test_gptq_folder_calibration_errors(fp32, texts, library, tmp_path, capsys) -> None:
    def fails(calibration: Path, message: str, status: int = 1) -> None:
        target = tmp_path / "out"
        args = ["quantize", str(fp32), str(target), "--method", "gptq", "--calibration", str(calibration), "-q"]
        assert main(args) == status
        assert message in capsys.readouterr().err
        assert not target.exists()

    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    fails(tmp_path / "empty.txt", "the calibration text has 0 token(s)")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    fails(tmp_path / "latin1.txt", "not UTF-8")
    np.savez(tmp_path / "renamed.npz", input_ids=np.ones((1, 8), np.int64), tokens=np.ones((1, 8), np.int64))
    fails(tmp_path / "renamed.npz", "unknown name(s) ['tokens']")
    np.savez(tmp_path / "no_ids.npz", ids=np.ones((1, 8), np.int64))
    fails(tmp_path / "no_ids.npz", "needs 'input_ids'; the file holds ['ids']")
    (tmp_path / "empty.npz").write_bytes(b"")
    fails(tmp_path / "empty.npz", "not a readable .npz file")
    fails(tmp_path / "missing.txt", "calibration file not found")
    assert main(["quantize", str(fp32), str(tmp_path / "out"), "--method", "gptq", "-q"]) == 2
    assert "--method gptq needs --calibration" in capsys.readouterr().err
    with pytest.raises(GenaiFolderError, match="the file holds"):
        decoder_calibration(fp32, tmp_path / "no_ids.npz")


def test_export_genai_gptq_equals_build_then_quantize(checkpoint, fp32, texts, library, tmp_path, capsys) -> None:
    args = ["--block-size", "32", "--method", "gptq", "--calibration", str(texts["calibration"]), "-q"]
    assert main(["export-genai", str(checkpoint), str(tmp_path / "exported"), *args]) == 0
    # export-genai gives a float checkpoint built for the CPU accuracy level 4 by default (docs/llm.md).
    assert main(["quantize", str(fp32), str(tmp_path / "quantized"), *args, "--accuracy-level", "4"]) == 0
    assert "output error" in capsys.readouterr().out
    for name in ("model.onnx", "model.onnx.data"):
        assert (tmp_path / "exported" / name).read_bytes() == (tmp_path / "quantized" / name).read_bytes()
    assert main(["export-genai", str(checkpoint), str(tmp_path / "none"), "--method", "gptq", "-q"]) == 2
    assert "--method gptq needs --calibration" in capsys.readouterr().err
