"""QLoRA deployment on a real checkpoint: one NF4 base folder, two LoRA adapters switched at run time.

Quantizes a float transformers checkpoint with transformers + bitsandbytes (NF4, on the CPU, as a QLoRA user
loads it), draws two seeded random peft LoRA adapters with different targets and ranks (stand-ins for trained
ones: peft's own format, non-zero B), exports the base with both adapters (``export_genai(..., adapters=...)``)
and with each alone, and compares greedy tokens of onnxruntime-genai (``og.Adapters`` /
``set_active_adapter``) with peft's ``generate()`` (bitsandbytes' float32 path) for each adapter and for none.
Prints the folder sizes, the export times and a JSON summary.

Command: ``python tools/lora_adapters_check.py HF_DIR WORK_DIR [--double-quant] [--tokens 32] [--scale 0.02]``
(needs onnx_nf4 importable, e.g. ``PYTHONPATH`` set to the repository, and the op library built).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llm_models

ADAPTERS = {
    "one": {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"], "seed": 1},
    "two": {
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ["q_proj", "k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "seed": 2,
    },
}


def quantize_checkpoint(hf_dir: Path, out_dir: Path, double_quant: bool) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        str(hf_dir), quantization_config=llm_models.bnb_config("nf4", double_quant), device_map="cpu", dtype="float32"
    )
    model.save_pretrained(str(out_dir), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(hf_dir)).save_pretrained(str(out_dir))
    return out_dir


def make_adapter(bnb_dir: Path, folder: Path, spec: dict, scale: float) -> Path:
    import peft
    import torch

    config = peft.LoraConfig(
        r=spec["r"], lora_alpha=spec["lora_alpha"], target_modules=spec["target_modules"], lora_dropout=0.0
    )
    model = peft.get_peft_model(llm_models.load_checkpoint(bnb_dir), config)
    generator = torch.Generator().manual_seed(spec["seed"])
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    model.save_pretrained(str(folder))
    return folder


def genai_tokens(folder: Path, files: dict[str, Path], prompt: list[int], adapter: str | None, new: int) -> list[int]:
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    adapters = og.Adapters(model)
    for name, path in files.items():
        adapters.load(str(path), name)
    params = og.GeneratorParams(model)
    total = len(prompt) + new
    params.set_search_options(do_sample=False, max_length=total, min_length=total, batch_size=1)
    generator = og.Generator(model, params)
    if adapter is not None:
        generator.set_active_adapter(adapters, adapter)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)[len(prompt) :]]


def peft_tokens(bnb_dir: Path, adapters: dict[str, Path], prompt: list[int], new: int) -> dict[str | None, list[int]]:
    import peft

    base = llm_models.load_checkpoint(bnb_dir)
    tokens: dict[str | None, list[int]] = {None: llm_models.greedy_torch(base, prompt, new)}
    names = list(adapters)
    model = peft.PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    for name in names:
        model.set_adapter(name)
        tokens[name] = llm_models.greedy_torch(model, prompt, new)
    return tokens


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("hf_dir", type=Path, help="float transformers checkpoint (with tokenizer)")
    parser.add_argument("work_dir", type=Path, help="folder for the checkpoints and exports (replaced)")
    parser.add_argument("--double-quant", action="store_true")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--scale", type=float, default=0.02, help="standard deviation of the random A and B")
    args = parser.parse_args()
    from onnx_nf4.genai.adapters import adapter_path
    from onnx_nf4.genai.export import export_genai

    llm_models._offline_env()
    shutil.rmtree(args.work_dir, ignore_errors=True)
    args.work_dir.mkdir(parents=True)
    bnb_dir = quantize_checkpoint(args.hf_dir, args.work_dir / "bnb", args.double_quant)
    adapters = {
        name: make_adapter(bnb_dir, args.work_dir / f"adapter_{name}", spec, args.scale)
        for name, spec in ADAPTERS.items()
    }
    timings, sizes = {}, {}
    for label, chosen in (("both", adapters), *((name, {name: path}) for name, path in adapters.items())):
        start = time.perf_counter()
        export_genai(bnb_dir, args.work_dir / f"genai_{label}", adapters=chosen)
        timings[label] = round(time.perf_counter() - start, 1)
        sizes[label] = folder_bytes(args.work_dir / f"genai_{label}")
    both = args.work_dir / "genai_both"
    files = {name: adapter_path(both, name) for name in adapters}
    prompt = llm_models.prompt_ids(bnb_dir, "Once upon a time, in a small village by the sea,")
    expected = peft_tokens(bnb_dir, adapters, prompt, args.tokens)
    results = {}
    for adapter in (None, *adapters):
        actual = genai_tokens(both, files, prompt, adapter, args.tokens)
        results[str(adapter)] = {
            "equal": actual == expected[adapter],
            "first_difference": next(
                (i for i, (a, b) in enumerate(zip(actual, expected[adapter], strict=True)) if a != b), None
            ),
            "genai": actual,
            "peft": expected[adapter],
        }
    model_bytes = sum(p.stat().st_size for p in both.iterdir() if p.name.startswith("model.onnx"))
    summary = {
        "double_quant": args.double_quant,
        "tokens": args.tokens,
        "scale": args.scale,
        "results": results,
        "export_seconds": timings,
        "folder_bytes": sizes,
        "model_bytes": model_bytes,
        "adapter_file_bytes": {name: path.stat().st_size for name, path in files.items()},
        "saved_bytes": sizes["one"] + sizes["two"] - sizes["both"],
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
