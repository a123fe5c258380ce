"""Llama checkpoints built offline for tests and benchmarks, and the onnxruntime-genai model builder.

Nothing is downloaded. ``make_llama_checkpoint(out_dir, spec)`` writes a transformers ``LlamaForCausalLM`` folder
(``config.json``, ``model.safetensors``, ``generation_config.json``) whose weights are random but fixed by
``spec.seed``, plus a small byte-level BPE tokenizer trained with ``tokenizers`` on the built-in ``CORPUS``
(``tokenizer.json`` / ``tokenizer_config.json``, loadable by transformers and by onnxruntime-genai). With
``bnb="nf4"`` (or ``"fp4"``, ``"int8"``) the model is quantized by transformers + bitsandbytes on the CPU
(``BitsAndBytesConfig(load_in_4bit=True, ...)``) and saved with ``save_pretrained``, as a QLoRA user would.

``build_genai(hf_dir, out_dir, precision)`` runs ``python -m onnxruntime_genai.models.builder`` offline (its
cache is a temporary folder; needs onnx_nf4 importable, e.g. ``PYTHONPATH`` set to the repository) and returns
``out_dir``; ``greedy_genai`` / ``greedy_torch`` generate
tokens greedily in onnxruntime-genai and in PyTorch.

Presets: ``TINY`` (a few hundred kB, for tests) and ``LLAMA_SHAPED`` (4 layers of a 1B-class Llama: hidden 2048,
32 query / 4 key-value heads, MLP 5632, vocabulary 32000; about 0.5 G parameters, 2 GB in float32).

Command line: ``python tools/llm_models.py OUT_DIR [--preset tiny|llama] [--bnb nf4] [--double-quant]
[--genai fp32|int4 GENAI_DIR]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

#: Public-domain-style text the tokenizer is trained on (and prompts are taken from).
CORPUS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "A journey of a thousand miles begins with a single step.",
    "The cat sat quietly on the warm windowsill, watching the rain fall on the garden.",
    "Quantum computers use qubits that can exist in superpositions of states.",
    "She booked a flight to Lisbon for the first week of June and packed a small bag.",
    "The central bank raised interest rates by a quarter of a percentage point.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "My grandmother's apple pie recipe calls for cinnamon and a pinch of nutmeg.",
    "Neural networks learn representations by adjusting weights through backpropagation.",
    "The museum's new exhibition features sculptures and pottery from ancient Greece.",
    "Regular exercise lowers the risk of heart disease and improves mood and sleep.",
    "A gentle breeze carried the scent of pine trees through the quiet valley.",
    "The compiler reported a type error on line forty-two of the main module.",
    "Volcanic eruptions can cool the global climate for several years.",
    "Please remember to water the tomatoes and the roses while I am away.",
    "The orchestra performed the ninth symphony to a sold-out hall.",
    "Electric cars are becoming cheaper as battery prices keep falling.",
    "The detective noticed a faint smudge of mud on the carpet by the door.",
    "Honeybees communicate the location of flowers through a waggle dance.",
    "The spacecraft entered orbit around Mars after a seven-month journey.",
    "Once upon a time, in a small village by the sea, there lived an old fisherman.",
    "Every morning he walked to the harbour, mended his nets and talked to the gulls.",
    "The library opens at nine o'clock and closes at six in the evening.",
    "Numbers such as 3, 14, 159 and 2026 appear in tables, dates and prices.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The children built a sandcastle with towers, walls and a deep moat.",
)

BOS, EOS, UNK = "<s>", "</s>", "<unk>"


@dataclasses.dataclass(frozen=True)
class LlamaSpec:
    """Shape of a ``LlamaForCausalLM`` (sizes in elements) and the seed of its random weights."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    seed: int = 0
    max_positions: int = 2048
    tokenizer_vocab: int = 512  # the trained tokenizer's size (<= vocab; extra embedding rows are never produced)


TINY = LlamaSpec(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512, seed=0, max_positions=256)
LLAMA_SHAPED = LlamaSpec(hidden=2048, layers=4, heads=32, kv_heads=4, intermediate=5632, vocab=32000, seed=0)
PRESETS = {"tiny": TINY, "llama": LLAMA_SHAPED}


def _offline_env() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def train_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 512) -> None:
    """Train a byte-level BPE tokenizer on ``CORPUS`` and save it in ``out_dir`` for transformers and genai.

    Token ids 0, 1, 2 are ``<unk>``, ``<s>``, ``</s>``; ``<s>`` is prepended to every encoding.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[UNK, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, unk_token=UNK, model_max_length=2048
    )
    fast.save_pretrained(str(out_dir))


def llama_config(spec: LlamaSpec):
    """The ``transformers.LlamaConfig`` of ``spec`` (float32, untied embeddings, bos 1 / eos 2)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.max_positions,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        torch_dtype="float32",
        architectures=["LlamaForCausalLM"],
    )


def random_llama(spec: LlamaSpec):
    """A float32 ``LlamaForCausalLM`` in eval mode with weights drawn from ``torch.manual_seed(spec.seed)``.

    Linear weights and embeddings are normal with std 0.02 (transformers' initializer); the RMSNorm weights are
    ``1 + N(0, 0.1)`` so that they are not all equal.
    """
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(llama_config(spec)).eval().float()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
    return model


def bnb_config(quant_type: str = "nf4", double_quant: bool = False):
    """``BitsAndBytesConfig`` for ``quant_type`` ``nf4`` / ``fp4`` (4-bit, float32 compute) or ``int8`` (8-bit).

    bitsandbytes leaves ``lm_head`` float (transformers' default ``llm_int8_skip_modules``).
    """
    import torch
    from transformers import BitsAndBytesConfig

    if quant_type == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32,
    )


def make_llama_checkpoint(
    out_dir: str | os.PathLike,
    spec: LlamaSpec = TINY,
    *,
    bnb: str | None = None,
    double_quant: bool = False,
) -> Path:
    """Write a transformers checkpoint folder of ``spec`` (with its tokenizer) to ``out_dir``; return it.

    ``bnb``: ``None`` for float32 weights; ``"nf4"``, ``"fp4"`` or ``"int8"`` for a checkpoint quantized by
    bitsandbytes on the CPU through transformers (``double_quant`` is ``bnb_4bit_use_double_quant``).
    """
    _offline_env()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = random_llama(spec)
    model.generation_config.do_sample = False
    if bnb is None:
        model.save_pretrained(str(out), safe_serialization=True)
    else:
        from transformers import AutoModelForCausalLM

        with tempfile.TemporaryDirectory(prefix="llama_float_") as float_dir:
            model.save_pretrained(float_dir, safe_serialization=True)
            del model
            config = bnb_config(bnb, double_quant)
            quantized = AutoModelForCausalLM.from_pretrained(
                float_dir, quantization_config=config, device_map="cpu", dtype="float32"
            )
            quantized.save_pretrained(str(out), safe_serialization=True)
    train_tokenizer(out, min(spec.tokenizer_vocab, spec.vocab))
    return out


def build_genai(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    precision: str = "fp32",
    execution_provider: str = "cpu",
    extra_options: dict[str, object] | None = None,
) -> Path:
    """Run onnxruntime-genai's model builder on ``hf_dir`` offline (:func:`onnx_nf4.genai.export.run_builder`).

    ``precision``: ``fp32`` or ``int4`` (``MatMulNBits``, block 32 by default) on ``cpu``; ``extra_options`` are
    the builder's ``--extra_options``. Returns ``out_dir``.
    """
    _offline_env()
    from onnx_nf4.genai.export import run_builder

    return run_builder(
        hf_dir, out_dir, precision=precision, execution_provider=execution_provider, extra_options=extra_options
    )


def prompt_ids(hf_dir: str | os.PathLike, text: str = CORPUS[20]) -> list[int]:
    """``text`` tokenized by the checkpoint's tokenizer (with ``<s>``)."""
    _offline_env()
    from transformers import AutoTokenizer

    return list(AutoTokenizer.from_pretrained(str(hf_dir))(text)["input_ids"])


def greedy_genai(genai_dir: str | os.PathLike, prompt: Sequence[int], new_tokens: int = 32) -> list[int]:
    """Exactly ``new_tokens`` tokens generated greedily by onnxruntime-genai after ``prompt`` (EOS suppressed)."""
    import onnxruntime_genai as og

    model = og.Model(str(genai_dir))
    params = og.GeneratorParams(model)
    total = len(prompt) + new_tokens
    params.set_search_options(do_sample=False, max_length=total, min_length=total, batch_size=1)
    generator = og.Generator(model, params)
    generator.append_tokens(list(prompt))
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)[len(prompt) :]]


def greedy_torch(model, prompt: Sequence[int], new_tokens: int = 32) -> list[int]:
    """Exactly ``new_tokens`` tokens generated greedily by ``model.generate`` (transformers) after ``prompt``."""
    import torch

    ids = torch.tensor([list(prompt)], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
        )
    return [int(t) for t in out[0, len(prompt) :]]


def load_checkpoint(hf_dir: str | os.PathLike, *, bnb_float32: bool = True):
    """The checkpoint of ``hf_dir`` as a ``LlamaForCausalLM`` on the CPU (bitsandbytes layers as saved).

    On a CPU with AVX512-BF16, bitsandbytes' ``Linear4bit`` (0.50) repacks its weight on the first call and
    multiplies in bfloat16; ``bnb_float32=True`` keeps it on its float32 path (decode ``NF4[code] * absmax``, then a
    float32 product), the path it takes on every other CPU.
    """
    _offline_env()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), device_map="cpu").eval()
    if bnb_float32:
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    return model


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="checkpoint folder to write")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bnb", choices=["nf4", "fp4", "int8"], help="quantize with bitsandbytes on the CPU")
    parser.add_argument("--double-quant", action="store_true")
    parser.add_argument("--genai", nargs=2, metavar=("PRECISION", "GENAI_DIR"), help="also run the genai builder")
    args = parser.parse_args(argv)
    spec = dataclasses.replace(PRESETS[args.preset], seed=args.seed)
    hf_dir = make_llama_checkpoint(args.out_dir, spec, bnb=args.bnb, double_quant=args.double_quant)
    print(json.dumps(dataclasses.asdict(spec)), "->", hf_dir)
    if args.genai:
        print("genai:", build_genai(hf_dir, args.genai[1], args.genai[0]))


if __name__ == "__main__":
    main()
