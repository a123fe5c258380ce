"""LoRA adapters switched at run time over one NF4 base (QLoRA deployment).

``export-genai --adapter NAME=PEFT_DIR`` and ``onnx_nf4.torch.export(..., adapters=...)``: the base keeps
bitsandbytes' bytes, each peft adapter becomes an ``.onnx_adapter`` file, and onnxruntime-genai (``og.Adapters``)
and onnxruntime (``LoraAdapter`` + ``RunOptions``) reproduce peft with each adapter and the base with none. The
models are tiny and seeded (``tools/llm_models.py``, ``tests/bnb_models.py``); nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from oracle_vectors import REPO_ROOT

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")
ort = pytest.importorskip("onnxruntime")

from safetensors.numpy import save_file  # noqa: E402

from onnx_nf4.cli import main  # noqa: E402
from onnx_nf4.torch import AdapterError, adapter_file, export  # noqa: E402
from onnx_nf4.torch.adapters import read_peft_adapter  # noqa: E402
from onnx_nf4.torch.state_dict import bnb_quantized_weights  # noqa: E402

sys.path.insert(0, str(REPO_ROOT / "tools"))
import llm_models  # noqa: E402

NEW_TOKENS = 24
#: Two adapters with different targets and ranks; lora_alpha = 2 r, so peft's scaling (2) folds into B exactly.
ADAPTERS = {
    "one": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], "seed": 1},
    "two": {"r": 8, "lora_alpha": 16, "target_modules": ["k_proj", "o_proj", "gate_proj", "up_proj"], "seed": 2},
}


def _randomize_lora(model, seed: int) -> None:
    """Random non-zero A and B (peft initializes B to zero, which would make the adapter the base)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def _save_adapter(model, folder: Path, spec: dict) -> Path:
    config = peft.LoraConfig(
        r=spec["r"], lora_alpha=spec["lora_alpha"], target_modules=spec["target_modules"], lora_dropout=0.0
    )
    peft_model = peft.get_peft_model(model, config)
    _randomize_lora(peft_model, spec["seed"])
    peft_model.save_pretrained(str(folder))
    return folder


# ----------------------------------------------------------------------------------------------------------------
# onnxruntime-genai: tiny bitsandbytes Llama, two adapters


@pytest.fixture(scope="module")
def bnb_checkpoints(tmp_path_factory) -> dict[bool, Path]:
    return {
        double_quant: llm_models.make_llama_checkpoint(
            tmp_path_factory.mktemp("bnb") / "hf", llm_models.TINY, bnb="nf4", double_quant=double_quant
        )
        for double_quant in (False, True)
    }


@pytest.fixture(scope="module")
def llama_adapters(bnb_checkpoints, tmp_path_factory) -> dict[str, Path]:
    """peft adapters trained (here: drawn at random) on the NF4 base, saved with ``save_pretrained``."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: _save_adapter(llm_models.load_checkpoint(bnb_checkpoints[False]), root / name, spec)
        for name, spec in ADAPTERS.items()
    }


def _greedy_genai(folder: Path, prompt: list[int], adapter: str | None, files: dict[str, Path]) -> list[int]:
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    adapters = og.Adapters(model)
    for name, path in files.items():
        adapters.load(str(path), name)
    params = og.GeneratorParams(model)
    total = len(prompt) + NEW_TOKENS
    params.set_search_options(do_sample=False, max_length=total, min_length=total, batch_size=1)
    generator = og.Generator(model, params)
    if adapter is not None:
        generator.set_active_adapter(adapters, adapter)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)[len(prompt) :]]


def _peft_tokens(hf_dir: Path, adapters: dict[str, Path], prompt: list[int]) -> dict[str | None, list[int]]:
    """Greedy tokens of peft's ``generate()`` with each adapter, and with none (bitsandbytes' float32 path)."""
    base = llm_models.load_checkpoint(hf_dir)  # support_avx512bf16_for_cpu = False on every Linear4bit
    tokens: dict[str | None, list[int]] = {None: llm_models.greedy_torch(base, prompt, NEW_TOKENS)}
    names = list(adapters)
    model = peft.PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    for name in names:
        model.set_adapter(name)
        tokens[name] = llm_models.greedy_torch(model, prompt, NEW_TOKENS)
    with model.disable_adapter():
        assert llm_models.greedy_torch(model, prompt, NEW_TOKENS) == tokens[None]
    return tokens


def _nf4_node_tensors(model_path: Path) -> set[tuple[bytes, ...]]:
    model = onnx.load(str(model_path))
    inits = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}
    return {
        tuple(inits[name].tobytes() for name in node.input[1:] if name)
        for node in model.graph.node
        if node.op_type == "MatMulNF4"
    }


def _bnb_layer_tensors(hf_dir: Path) -> set[tuple[bytes, ...]]:
    layers = bnb_quantized_weights(hf_dir / "model.safetensors")
    out = set()
    for q in layers.values():
        tensors = [q.packed.tobytes(), q.absmax.tobytes()]
        if q.nested is not None:
            nested = q.nested
            tensors += [nested.nested_absmax.tobytes(), nested.code.tobytes(), np.float32(nested.offset).tobytes()]
        out.add(tuple(tensors))
    return out


def _model_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model.onnx"))


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


double_quant_cases = pytest.mark.parametrize("double_quant", [False, True], ids=["nf4", "nf4-double-quant"])


@pytest.fixture(scope="module")
def genai_folders(bnb_checkpoints, llama_adapters, library, tmp_path_factory) -> dict[bool, tuple[Path, str]]:
    """``onnx-nf4 export-genai HF_DIR OUT_DIR --adapter one=... --adapter two=...`` of each checkpoint, with what
    it printed."""
    folders = {}
    for double_quant, hf_dir in bnb_checkpoints.items():
        out = tmp_path_factory.mktemp("genai") / "both"
        argv = ["export-genai", str(hf_dir), str(out), *(f"--adapter={n}={p}" for n, p in llama_adapters.items())]
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            assert main(argv) == 0
        folders[double_quant] = (out, printed.getvalue())
    return folders


@pytest.mark.slow
@double_quant_cases
def test_genai_adapters_match_peft(bnb_checkpoints, llama_adapters, genai_folders, double_quant):
    hf_dir = bnb_checkpoints[double_quant]
    out, printed = genai_folders[double_quant]
    files = {name: out / "adapters" / f"{name}.onnx_adapter" for name in llama_adapters}
    for name, path in files.items():
        assert f"adapter {name}: {path}" in printed and path.is_file()

    # the base is bitsandbytes' bytes, one MatMulNF4 per layer (q/k/v unfused for the LoRA inputs)
    assert _nf4_node_tensors(out / "model.onnx") == _bnb_layer_tensors(hf_dir)
    # every targeted layer has A / B graph inputs with rank-0 defaults; one adapter file holds them all
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    lora_inputs = {i.name for i in graph.input if ".lora_" in i.name}
    assert len(lora_inputs) == 2 * 7 * 2  # A and B, 7 projections, 2 layers
    defaults = {init.name: list(init.dims) for init in graph.initializer if init.name in lora_inputs}
    assert defaults.keys() == lora_inputs and all(0 in dims for dims in defaults.values())
    for path in files.values():
        assert set(ort.AdapterFormat.read_adapter(str(path)).get_parameters()) == lora_inputs

    prompt = llm_models.prompt_ids(hf_dir)
    expected = _peft_tokens(hf_dir, llama_adapters, prompt)
    assert len({tuple(t) for t in expected.values()}) == 3  # each adapter changes the generation
    for adapter in (None, *llama_adapters):
        assert _greedy_genai(out, prompt, adapter, files) == expected[adapter], adapter
    assert llm_models.greedy_genai(out, prompt, NEW_TOKENS) == expected[None]  # no og.Adapters at all


@pytest.mark.slow
def test_genai_one_folder_serves_every_adapter(bnb_checkpoints, llama_adapters, genai_folders, tmp_path):
    from onnx_nf4.genai.export import export_genai

    hf_dir, (both_dir, _) = bnb_checkpoints[False], genai_folders[False]
    singles = [tmp_path / name for name in llama_adapters]
    for folder, (name, path) in zip(singles, llama_adapters.items(), strict=True):
        export_genai(hf_dir, folder, adapters={name: path})
    both = _folder_bytes(both_dir)
    base = _model_bytes(both_dir)
    assert sum(_folder_bytes(folder) for folder in singles) - both >= base
    # an adapter file holds the LoRA weights, not the base: a small fraction of the model
    assert all((both_dir / "adapters" / f"{n}.onnx_adapter").stat().st_size < base / 4 for n in ADAPTERS)


@pytest.mark.slow
def test_genai_adapters_on_a_float_checkpoint(float_checkpoint, llama_adapters, library, tmp_path):
    """A float checkpoint is quantized (GPTQ, calibrated on the built decoder) as without adapters; with none active
    it generates what that folder does."""
    from onnx_nf4.genai.export import export_genai

    text = tmp_path / "calibration.txt"
    text.write_text(" ".join(llm_models.CORPUS))
    gptq = {"method": "gptq", "calibration": text}
    export_genai(float_checkpoint, tmp_path / "plain", builder_options={"fuse_qkv": False}, **gptq)  # as with adapters
    export_genai(float_checkpoint, tmp_path / "lora", adapters=llama_adapters, **gptq)
    plain = _nf4_node_tensors(tmp_path / "plain" / "model.onnx")
    # q, o, gate, up, down of 2 layers + lm_head; k and v ([64, 32]) are below min_elements (4096) and stay float
    assert len(plain) == 11 and _nf4_node_tensors(tmp_path / "lora" / "model.onnx") == plain
    prompt = llm_models.prompt_ids(float_checkpoint)
    files = {name: tmp_path / "lora" / "adapters" / f"{name}.onnx_adapter" for name in llama_adapters}
    base = llm_models.greedy_genai(tmp_path / "plain", prompt, NEW_TOKENS)
    assert _greedy_genai(tmp_path / "lora", prompt, None, files) == base
    assert all(_greedy_genai(tmp_path / "lora", prompt, name, files) != base for name in files)


# ----------------------------------------------------------------------------------------------------------------
# onnx_nf4.torch.export(..., adapters=...) and plain onnxruntime (LoraAdapter + RunOptions)


def _bnb_two_layers(double_quant: bool):
    from bnb_models import small_model

    _, quantized = small_model(seed=0, blocksize=64, double_quant=double_quant)
    return quantized


@pytest.fixture(scope="module")
def small_adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("small_adapters")
    specs = {
        "a": {"r": 4, "lora_alpha": 8, "target_modules": ["up", "down"], "seed": 1},
        "b": {"r": 2, "lora_alpha": 4, "target_modules": ["down"], "seed": 2},
    }
    return {name: _save_adapter(_bnb_two_layers(False), root / name, spec) for name, spec in specs.items()}


@double_quant_cases
def test_torch_export_adapters_in_onnxruntime(small_adapters, double_quant, library, tmp_path):
    from bnb_models import REL_TOL, bnb_tensors, graph_tensors, nf4_nodes, ort_session, relative_error

    base = _bnb_two_layers(double_quant)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(3))
    path = tmp_path / "model.onnx"
    report = export(base, (x,), path, adapters=small_adapters, dynamo=False)
    assert len(report.layers) == 2
    assert {graph_tensors(inputs) for _, inputs in nf4_nodes(path)} == {bnb_tensors(base.up), bnb_tensors(base.down)}

    session = ort_session(path)
    feed = {session.get_inputs()[0].name: x.numpy()}
    with torch.no_grad():
        expected_base = base(x).numpy()
    (actual,) = session.run(None, feed)
    assert relative_error(actual, expected_base) <= REL_TOL
    for name, folder in small_adapters.items():
        with torch.no_grad():
            expected = peft.PeftModel.from_pretrained(_bnb_two_layers(double_quant), str(folder)).eval()(x).numpy()
        assert relative_error(expected, expected_base) > 0.1  # the adapter matters
        adapter = ort.LoraAdapter()
        adapter.Load(str(adapter_file(path, name)))
        run_options = ort.RunOptions()
        run_options.add_active_adapter(adapter)
        (actual,) = session.run(None, feed, run_options)
        assert relative_error(actual, expected) <= REL_TOL, name


def test_torch_export_adapter_file_holds_transposed_scaled_weights(small_adapters, tmp_path):
    from safetensors.numpy import load_file

    path = tmp_path / "model.onnx"
    export(_bnb_two_layers(False), (torch.zeros(1, 128),), path, adapters=small_adapters, dynamo=False)
    params = {
        name: value.numpy()
        for name, value in ort.AdapterFormat.read_adapter(str(adapter_file(path, "b"))).get_parameters().items()
    }
    saved = load_file(str(small_adapters["b"] / "adapter_model.safetensors"))
    a, b = (saved[f"base_model.model.down.lora_{x}.weight"] for x in "AB")
    assert params.keys() == {f"{m}.lora_{x}.weight" for m in ("up", "down") for x in "AB"}
    assert np.array_equal(params["down.lora_A.weight"], a.T) and np.array_equal(params["down.lora_B.weight"], 2 * b.T)
    assert params["up.lora_A.weight"].shape == (128, 0) and params["up.lora_B.weight"].shape == (0, 128)  # not "b"'s


def test_torch_export_refuses_a_peft_model_and_another_base(small_adapters, tmp_path):
    from bnb_models import TwoLayers

    peft_model = peft.PeftModel.from_pretrained(_bnb_two_layers(False), str(small_adapters["a"]))
    with pytest.raises(AdapterError, match=r"pass the base model without peft LoRA layers"):
        export(peft_model, (torch.zeros(1, 128),), tmp_path / "m.onnx", adapters=small_adapters, dynamo=False)
    with pytest.raises(AdapterError, match=r"'up' was trained for in_features=128, out_features=128, but the base"):
        export(TwoLayers(k=64).eval(), (torch.zeros(1, 64),), tmp_path / "m.onnx", adapters=small_adapters)
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------------------------
# errors: checked before any build


def _write_adapter(folder: Path, tensors: dict[str, np.ndarray] | None = None, **config) -> Path:
    folder.mkdir()
    settings = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], **config}
    (folder / "adapter_config.json").write_text(json.dumps(settings))
    if tensors is None:
        rng = np.random.default_rng(0)
        prefix = "base_model.model.model.layers.0.self_attn.q_proj"
        tensors = {
            f"{prefix}.lora_A.weight": rng.standard_normal((4, 64), dtype=np.float32),
            f"{prefix}.lora_B.weight": rng.standard_normal((64, 4), dtype=np.float32),
        }
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


Q = "base_model.model.model.layers.0.self_attn.q_proj"
BAD_ADAPTERS = {
    "dora": ({"use_dora": True}, None, r"DoRA \(weight-decomposed LoRA, use_dora=True\) is not supported; supported: "),
    "loha": ({"peft_type": "LOHA"}, None, r"peft type 'LOHA' is not supported; supported: peft LoRA adapters"),
    "rank-0-config": ({"r": 0}, None, r"rank r=0; a LoRA adapter needs r >= 1"),
    "rank-0-tensors": (
        {},
        {f"{Q}.lora_A.weight": np.zeros((0, 64), np.float32), f"{Q}.lora_B.weight": np.zeros((64, 0), np.float32)},
        r"has rank 0",
    ),
    "modules-to-save": ({"modules_to_save": ["lm_head"]}, None, r"modules_to_save .* is not supported"),
    "pissa": ({"init_lora_weights": "pissa"}, None, r"init_lora_weights='pissa' also changed the base weights"),
    "embedding": (
        {},
        {
            "base_model.model.model.embed_tokens.lora_embedding_A": np.zeros((4, 512), np.float32),
            "base_model.model.model.embed_tokens.lora_embedding_B": np.zeros((64, 4), np.float32),
        },
        r"is embedding LoRA",
    ),
    "other-base-shape": (
        {},
        {f"{Q}.lora_A.weight": np.ones((4, 32), np.float32), f"{Q}.lora_B.weight": np.ones((64, 4), np.float32)},
        r"'model.layers.0.self_attn.q_proj' was trained for in_features=32, out_features=64, but the base layer has "
        r"in_features=64, out_features=64 \(an adapter for another base model\)",
    ),
    "other-base-layer": (
        {},
        {
            "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": np.ones((4, 64), np.float32),
            "base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight": np.ones((64, 4), np.float32),
        },
        r"'model.layers.9.self_attn.q_proj' is not a Linear layer of the base model",
    ),
}


@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory) -> Path:
    return llm_models.make_llama_checkpoint(tmp_path_factory.mktemp("llama") / "hf", llm_models.TINY)


@pytest.mark.parametrize("case", list(BAD_ADAPTERS))
def test_export_genai_refuses_bad_adapters(case, float_checkpoint, library, tmp_path, capsys):
    config, tensors, message = BAD_ADAPTERS[case]
    adapter = _write_adapter(tmp_path / "adapter", tensors, **config)
    out = tmp_path / "out"
    assert main(["export-genai", str(float_checkpoint), str(out), "--adapter", f"x={adapter}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("onnx-nf4: error:") and "adapter 'x'" in err
    assert re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # nothing written


def test_missing_adapter_files_are_named(tmp_path):
    with pytest.raises(AdapterError, match=r"adapter 'x': .*missing is not a directory"):
        read_peft_adapter(tmp_path / "missing", "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match=r"has no adapter_config.json \(not a peft adapter folder\)"):
        read_peft_adapter(tmp_path / "empty", "x")
    folder = _write_adapter(tmp_path / "bin")
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(AdapterError, match=r"no adapter_model.safetensors \(adapter_model.bin found: save with"):
        read_peft_adapter(folder, "x")
    with pytest.raises(AdapterError, match=r"adapter name 'a/b': use letters"):
        read_peft_adapter(folder, "a/b")


def test_cli_refuses_an_adapter_name_given_twice(float_checkpoint, tmp_path, capsys):
    adapter = _write_adapter(tmp_path / "adapter")
    argv = ["export-genai", str(float_checkpoint), str(tmp_path / "out"), "--adapter", f"x={adapter}"]
    assert main([*argv, "--adapter", f"x={adapter}"]) == 1
    assert "the name 'x' is given twice" in capsys.readouterr().err


def test_a_targeted_layer_fused_with_another_is_refused(tmp_path):
    """A builder fusion that merges a targeted layer (``fuse_mlp_gate_up``): its weight is no MatMul of its own."""
    import onnx_ir as ir

    from onnx_nf4.genai.adapters import PreparedAdapters
    from onnx_nf4.torch.adapters import read_adapters

    rng = np.random.default_rng(0)
    prefix = "model.layers.0.mlp"
    gate, up = (rng.standard_normal((128, 64), dtype=np.float32) for _ in range(2))
    (tmp_path / "hf").mkdir()
    save_file(
        {f"{prefix}.gate_proj.weight": gate, f"{prefix}.up_proj.weight": up}, str(tmp_path / "hf" / "x.safetensors")
    )
    a, b = rng.standard_normal((4, 64), dtype=np.float32), rng.standard_normal((128, 4), dtype=np.float32)
    tensors = {
        f"base_model.model.{prefix}.gate_proj.lora_A.weight": a,
        f"base_model.model.{prefix}.gate_proj.lora_B.weight": b,
    }
    adapters = read_adapters({"x": _write_adapter(tmp_path / "adapter", tensors, target_modules=["gate_proj"])})
    prepared = PreparedAdapters(adapters, tmp_path / "hf", np.dtype(np.float32))

    def graph(weight: np.ndarray) -> ir.Model:
        x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])
        y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, weight.shape[1]])
        node = onnx.helper.make_node("MatMul", ["x", "w"], ["y"], name="/mlp/MatMul")
        initializer = onnx.numpy_helper.from_array(weight, "w")
        return ir.serde.deserialize_model(
            onnx.helper.make_model(onnx.helper.make_graph([node], "g", [x], [y], [initializer]))
        )

    fused = graph(np.concatenate([gate.T, up.T], axis=1))
    with pytest.raises(AdapterError, match=r"'model.layers.0.mlp.gate_proj': no MatMul of the built model has its"):
        prepared.add_inputs(fused)
    alone = graph(np.ascontiguousarray(gate.T))
    base = ort.InferenceSession(ir.serde.serialize_model(alone).SerializeToString(), providers=["CPUExecutionProvider"])
    prepared.add_inputs(alone)
    names = [f"{prefix}.gate_proj.lora_A.weight", f"{prefix}.gate_proj.lora_B.weight"]
    assert [v.name for v in alone.graph.inputs] == ["x", *names] and alone.graph.outputs[0].name == "y"
    session = ort.InferenceSession(
        ir.serde.serialize_model(alone).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    x = rng.standard_normal((1, 64), dtype=np.float32)
    (expected,) = base.run(None, {"x": x})
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], expected)  # the base: an empty LoRA term
    (with_lora,) = session.run(None, {"x": x, names[0]: a.T.copy(), names[1]: 2 * b.T})
    np.testing.assert_allclose(with_lora, x @ gate.T + (x @ a.T) @ (2 * b.T), rtol=1e-5, atol=1e-5)
