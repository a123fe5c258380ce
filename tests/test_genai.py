"""onnxruntime-genai folders: ``onnx-nf4 quantize IN_DIR OUT_DIR`` and ``onnx-nf4 export-genai``.

The models are tiny Llamas built offline from a transformers config with seeded random weights and a tokenizer
trained with ``tokenizers`` (``tools/llm_models.py``); nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
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

from onnx_nf4.cli import main
from onnx_nf4.genai.folder import GenaiFolderError, quantize_genai_folder
from onnx_nf4.runtime import CustomOpLibraryNotFoundError

sys.path.insert(0, str(REPO_ROOT / "tools"))
import llm_models

pytestmark = pytest.mark.slow
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def float_checkpoint(tiny_llama_checkpoint: Path) -> Path:
    return tiny_llama_checkpoint


@pytest.fixture(scope="module")
def float_genai(tiny_llama_genai: Path) -> Path:
    return tiny_llama_genai


@pytest.fixture(scope="module")
def prompt(float_checkpoint) -> list[int]:
    return llm_models.prompt_ids(float_checkpoint)


def _load_config(folder: Path) -> dict:
    return json.loads((folder / "genai_config.json").read_text())


def _initializers(model_path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(model_path))
    return {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}


def _nodes(model_path: Path, op_type: str) -> list[onnx.NodeProto]:
    return [node for node in onnx.load(str(model_path), load_external_data=False).graph.node if node.op_type == op_type]


# ----------------------------------------------------------------------------------------------------------------
# quantize IN_DIR OUT_DIR


def test_folder_default_and_com_microsoft_generate_the_same_tokens(float_genai, prompt, library, tmp_path, capsys):
    nf4_dir, bnb4_dir = tmp_path / "nf4", tmp_path / "bnb4"
    reports = quantize_genai_folder(float_genai, nf4_dir)
    assert main(["quantize", str(float_genai), str(bnb4_dir), "--format", "com.microsoft", "-q"]) == 0
    assert "model.onnx:" in capsys.readouterr().out

    assert list(reports) == ["model.onnx"] and len(reports["model.onnx"].layers) == 11  # 2 x 5 + lm_head
    assert len(_nodes(nf4_dir / "model.onnx", "MatMulNF4")) == 11
    assert len(_nodes(bnb4_dir / "model.onnx", "MatMulBnb4")) == 11
    assert not _nodes(nf4_dir / "model.onnx", "MatMul") and not _nodes(bnb4_dir / "model.onnx", "MatMul")

    library_name = Path(library).name
    assert _load_config(nf4_dir)["model"]["decoder"]["session_options"]["custom_ops_library"] == library_name
    assert (nf4_dir / library_name).read_bytes() == Path(library).read_bytes()
    assert "custom_ops_library" not in _load_config(bnb4_dir)["model"]["decoder"]["session_options"]
    assert not (bnb4_dir / library_name).exists()
    for folder in (nf4_dir, bnb4_dir):  # everything else copied as it was
        for name in ("tokenizer.json", "tokenizer_config.json"):
            assert (folder / name).read_bytes() == (float_genai / name).read_bytes()
        config = _load_config(folder)
        config["model"]["decoder"]["session_options"].pop("custom_ops_library", None)
        assert config == _load_config(float_genai)

    nf4_tokens = llm_models.greedy_genai(nf4_dir, prompt, NEW_TOKENS)
    assert len(nf4_tokens) == NEW_TOKENS
    assert llm_models.greedy_genai(bnb4_dir, prompt, NEW_TOKENS) == nf4_tokens


def test_folder_double_quant_and_other_files(float_genai, prompt, library, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(float_genai, source)
    (source / "extra").mkdir()
    (source / "extra" / "notes.txt").write_text("kept")
    out = tmp_path / "out"
    out.mkdir()  # an existing empty folder is accepted
    reports = quantize_genai_folder(source, out, double_quant=True, block_size=32)
    assert reports["model.onnx"].double_quant and reports["model.onnx"].block_size == 32
    assert (out / "extra" / "notes.txt").read_text() == "kept"
    copied = ["extra", "genai_config.json", "model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*copied, Path(library).name])
    assert len(llm_models.greedy_genai(out, prompt, NEW_TOKENS)) == NEW_TOKENS


def _accuracy_levels(model_path: Path) -> set[int | None]:
    return {
        next((attr.i for attr in node.attribute if attr.name == "accuracy_level"), None)
        for node in _nodes(model_path, "MatMulNF4")
    }


def test_folder_accuracy_level_4_runs_and_is_recorded(float_genai, prompt, library, tmp_path, capsys):
    assert main(["quantize", str(float_genai), str(tmp_path / "acc4"), "--accuracy-level", "4", "-q"]) == 0
    assert "accuracy level 4" in capsys.readouterr().out
    assert _accuracy_levels(tmp_path / "acc4" / "model.onnx") == {4}
    assert len(llm_models.greedy_genai(tmp_path / "acc4", prompt, NEW_TOKENS)) == NEW_TOKENS
    reports = quantize_genai_folder(float_genai, tmp_path / "api", accuracy_level=4)
    assert reports["model.onnx"].accuracy_level == 4


def test_folder_refuses_a_non_empty_output_folder(float_genai, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["quantize", str(float_genai), str(out), "-q"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("onnx-nf4: error:") and "exists and is not empty" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind


def test_folder_without_genai_config_is_refused(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    assert main(["quantize", str(tmp_path / "in"), str(tmp_path / "out")]) == 1
    assert "is a directory without genai_config.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_folder_without_the_op_library_is_refused_before_any_work(float_genai, tmp_path, monkeypatch, capsys):
    import onnx_nf4.runtime.library

    def missing() -> str:
        raise CustomOpLibraryNotFoundError("the onnx_nf4 custom-op library is not built; searched: nowhere")

    monkeypatch.setattr(onnx_nf4.runtime.library, "custom_op_library", missing)
    assert main(["quantize", str(float_genai), str(tmp_path / "out"), "-q"]) == 1
    assert "custom-op library is not built" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    # com.microsoft needs no library
    assert main(["quantize", str(float_genai), str(tmp_path / "out"), "-q", "--format", "com.microsoft"]) == 0


def test_folder_with_a_missing_model_file_is_refused(float_genai, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(float_genai, source)
    (source / "model.onnx").unlink()
    with pytest.raises(GenaiFolderError, match=r"model file 'model\.onnx' not found"):
        quantize_genai_folder(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------
# export-genai: bitsandbytes NF4 checkpoints keep bitsandbytes' bytes


@pytest.fixture(scope="module")
def bnb_checkpoints(tmp_path_factory) -> dict[bool, Path]:
    """Tiny Llamas quantized by transformers + bitsandbytes (NF4) on the CPU, by double quantization."""
    pytest.importorskip("bitsandbytes")
    return {
        double_quant: llm_models.make_llama_checkpoint(
            tmp_path_factory.mktemp("bnb") / "hf", llm_models.TINY, bnb="nf4", double_quant=double_quant
        )
        for double_quant in (False, True)
    }


double_quant_cases = pytest.mark.parametrize("double_quant", [False, True], ids=["nf4", "nf4-double-quant"])


def _bnb_layers(hf_dir: Path) -> dict:
    from onnx_nf4.torch.state_dict import bnb_weights

    return bnb_weights(hf_dir / "model.safetensors")


def _nf4_weights(model_path: Path) -> list[tuple[onnx.NodeProto, list[np.ndarray | None]]]:
    inits = _initializers(model_path)
    return [
        (node, [inits.get(name) if name else None for name in list(node.input[1:6]) + [""] * (6 - len(node.input))])
        for node in onnx.load(str(model_path)).graph.node
        if node.op_type == "MatMulNF4"
    ]


def _find_rows(rows: np.ndarray, columns: np.ndarray) -> int | None:
    """The offset at which ``rows`` (``[n, bytes]``) appear as consecutive columns of ``columns``, or ``None``."""
    for offset in range(columns.shape[0] - rows.shape[0] + 1):
        if np.array_equal(columns[offset : offset + rows.shape[0]], rows):
            return offset
    return None


@double_quant_cases
def test_export_genai_keeps_bitsandbytes_bytes_and_tokens(bnb_checkpoints, double_quant, library, tmp_path, capsys):
    hf_dir = bnb_checkpoints[double_quant]
    out = tmp_path / "genai"
    options = [] if double_quant else ["--builder-option", "fuse_mlp_gate_up=true"]  # q/k/v and gate/up fused
    assert main(["export-genai", str(hf_dir), str(out), *options]) == 0
    assert "MatMulNF4" not in capsys.readouterr().err

    model_path = out / "model.onnx"
    nf4 = _nf4_weights(model_path)
    layers = _bnb_layers(hf_dir)
    assert len(layers) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert len(nf4) == (14 if double_quant else 8)  # one node per layer, or per layer qkv, o, gate_up, down
    placed = 0
    for name, weight in layers.items():
        N, K = weight.shape
        rows = weight.packed.reshape(N, K // 2)
        hits = []
        for node, (packed, absmax, nested_absmax, code, offset) in nf4:
            at = _find_rows(rows, packed.reshape(packed.shape[0], -1))
            if at is None:
                continue
            hits.append(node.name)
            k_blocks = absmax.shape[1]
            assert absmax[at : at + N].tobytes() == weight.absmax.reshape(N, k_blocks).tobytes()
            if double_quant:
                assert absmax.dtype == np.uint8 and at == 0 and packed.shape[0] == N
                assert nested_absmax.tobytes() == weight.nested.nested_absmax.tobytes()
                assert code.tobytes() == weight.nested.code.tobytes()
                assert offset.tobytes() == np.float32(weight.nested.offset).tobytes()
            else:
                assert absmax.dtype == np.float32 and nested_absmax is None
        assert len(hits) == 1, (name, hits)
        placed += N
    assert placed == sum(packed.shape[0] for _, (packed, *_) in nf4)  # nothing but bitsandbytes' rows
    assert [node.name for node in _nodes(model_path, "MatMul")] == ["/lm_head/MatMul"]  # left float by bnb
    assert _accuracy_levels(model_path) <= {None, 0}  # bitsandbytes' arithmetic: float32 compute by default

    reference = llm_models.load_checkpoint(hf_dir)
    prompt = llm_models.prompt_ids(hf_dir)
    expected = llm_models.greedy_torch(reference, prompt, NEW_TOKENS)
    assert llm_models.greedy_genai(out, prompt, NEW_TOKENS) == expected


def test_export_genai_bitsandbytes_to_com_microsoft(bnb_checkpoints, tmp_path):
    from onnx_nf4.genai.export import export_genai

    hf_dir = bnb_checkpoints[False]
    export_genai(hf_dir, tmp_path / "genai", format="com.microsoft")
    assert len(_nodes(tmp_path / "genai" / "model.onnx", "MatMulBnb4")) == 10  # per layer qkv, o, gate, up, down
    assert "custom_ops_library" not in (tmp_path / "genai" / "genai_config.json").read_text()
    prompt = llm_models.prompt_ids(hf_dir)
    expected = llm_models.greedy_torch(llm_models.load_checkpoint(hf_dir), prompt, NEW_TOKENS)
    assert llm_models.greedy_genai(tmp_path / "genai", prompt, NEW_TOKENS) == expected


@double_quant_cases
def test_export_genai_quantize_float_quantizes_lm_head(bnb_checkpoints, double_quant, library, tmp_path):
    from onnx_nf4.genai.export import export_genai

    hf_dir = bnb_checkpoints[double_quant]
    reports = export_genai(hf_dir, tmp_path / "genai", quantize_float=True, block_size=32)
    assert not _nodes(tmp_path / "genai" / "model.onnx", "MatMul")
    assert "/lm_head/MatMul" in [layer.node for layer in reports["model.onnx"].layers]


def test_export_genai_accuracy_level_4_runs_and_is_recorded(bnb_checkpoints, library, tmp_path):
    out = tmp_path / "genai"
    assert main(["export-genai", str(bnb_checkpoints[False]), str(out), "--accuracy-level", "4"]) == 0
    assert _accuracy_levels(out / "model.onnx") == {4}
    prompt = llm_models.prompt_ids(bnb_checkpoints[False])
    assert len(llm_models.greedy_genai(out, prompt, NEW_TOKENS)) == NEW_TOKENS


def test_export_genai_refuses_accuracy_level_with_com_microsoft(float_checkpoint, tmp_path, capsys):
    argv = ["export-genai", str(float_checkpoint), str(tmp_path / "out"), "--accuracy-level", "4"]
    assert main([*argv, "--format", "com.microsoft"]) == 2  # a usage error
    assert "--accuracy-level 4 needs --format onnx_nf4" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_export_genai_float_checkpoint_equals_build_then_quantize(
    float_checkpoint, float_genai, prompt, library, tmp_path
):
    from onnx_nf4.genai.export import export_genai

    reports = export_genai(float_checkpoint, tmp_path / "exported", block_size=128)
    assert _accuracy_levels(tmp_path / "exported" / "model.onnx") == {4}  # a float checkpoint for the CPU: 4
    quantize_genai_folder(float_genai, tmp_path / "quantized", block_size=128, accuracy_level=4)
    assert reports["model.onnx"].block_size == 128 and len(reports["model.onnx"].layers) == 11
    exported = _initializers(tmp_path / "exported" / "model.onnx")
    quantized = _initializers(tmp_path / "quantized" / "model.onnx")
    assert exported.keys() == quantized.keys()
    assert all(np.array_equal(exported[name], quantized[name]) for name in exported)
    tokens = llm_models.greedy_genai(tmp_path / "exported", prompt, NEW_TOKENS)
    assert tokens == llm_models.greedy_genai(tmp_path / "quantized", prompt, NEW_TOKENS)


# ----------------------------------------------------------------------------------------------------------------
# export-genai: errors


def _export_error(hf_dir: Path, out: Path, capsys) -> str:
    capsys.readouterr()  # what building the checkpoint printed
    assert main(["export-genai", str(hf_dir), str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("onnx-nf4: error:")
    assert not out.exists()
    return err


def test_export_genai_refuses_fp4(tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    hf_dir = llm_models.make_llama_checkpoint(tmp_path / "hf", llm_models.TINY, bnb="fp4")
    assert "4-bit type 'fp4' is not supported" in _export_error(hf_dir, tmp_path / "out", capsys)


def test_export_genai_refuses_8_bit(tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    hf_dir = llm_models.make_llama_checkpoint(tmp_path / "hf", llm_models.TINY, bnb="int8")
    assert "8-bit bitsandbytes checkpoints (load_in_8bit) are not supported" in _export_error(
        hf_dir, tmp_path / "out", capsys
    )


def test_export_genai_refuses_other_quantization_methods(float_checkpoint, tmp_path, capsys):
    hf_dir = tmp_path / "hf"
    shutil.copytree(float_checkpoint, hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (hf_dir / "config.json").write_text(json.dumps(config))
    assert "quantization method 'gptq' is not supported" in _export_error(hf_dir, tmp_path / "out", capsys)


def test_export_genai_refuses_an_unsupported_architecture(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_dir = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=512, n_positions=64)).save_pretrained(hf_dir)
    llm_models.train_tokenizer(hf_dir)
    err = _export_error(hf_dir, tmp_path / "out", capsys)
    assert "architecture 'GPT2LMHeadModel' is not supported by onnxruntime-genai's model builder" in err


def test_export_genai_refuses_a_folder_without_config(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    assert "no config.json" in _export_error(tmp_path / "hf", tmp_path / "out", capsys)


def test_export_genai_refuses_a_non_empty_output_folder(float_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export-genai", str(float_checkpoint), str(out)]) == 1
    assert "exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_export_genai_refuses_double_quant_as_com_microsoft(bnb_checkpoints, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["export-genai", str(bnb_checkpoints[True]), str(out), "--format", "com.microsoft"]) == 1
    assert "double-quantized (bnb_4bit_use_double_quant)" in capsys.readouterr().err
    assert not out.exists()


def test_export_genai_refuses_fused_double_quantized_layers(bnb_checkpoints, tmp_path):
    from onnx_nf4.genai.export import export_genai

    with pytest.raises(ValueError, match="fuses double-quantized layers"):
        export_genai(bnb_checkpoints[True], tmp_path / "out", builder_options={"fuse_qkv": True})
    assert not (tmp_path / "out").exists()
