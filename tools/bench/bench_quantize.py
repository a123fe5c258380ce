"""Speed of NF4 quantization: in process (compiled encoder, numpy reference, onnxruntime) and the CLI end to end.

In process, on a ``W[4096, 11008]`` float32 weight (K = 4096, N = 11008: an LLM MLP projection), block size 64,
all methods interleaved in each repetition (the median of ``--repeats`` is reported, with the process CPU time, which
shows how many cores a method kept busy):

* ``quantize_blockwise(W)`` (flat layout) and ``quantize_weight(W)`` (MatMulNF4 layout, read from the row-major
  ``W``, i.e. transposed on the fly) with the compiled encoder on 1 and 2 threads;
* ``quantize_weight`` of the ``nn.Linear``-ordered weight (``W.T`` contiguous, read in place);
* onnxruntime's native quantizer ``onnxruntime.capi._pybind_state.quantize_matmul_bnb4`` on the contiguous
  ``W.T`` it needs (what ``MatMulBnb4Quantizer`` calls), alone and with the transposed copy it makes first;
* the numpy reference (``backend="numpy"``), once.

End to end: ``onnx-nf4 quantize IN OUT -q`` (default options) in a fresh process on

* a 2.28 GB chain of 34 ``MatMul`` with 4096 x 4096 float32 weights in one external data file (generated here);
* optionally ``--genai-model PATH``: a model of onnxruntime-genai's builder (e.g. the Llama-shaped one of
  ``tools/llm_models.py``).

For each: wall time, weights quantized per second, peak RSS (``VmHWM``, :mod:`peak_rss`), and where the time goes,
from an instrumented in-process run of the same steps (``load_model``, the pass, ``save_model``) with the time of
reading the input's data file alone (from the page cache) and the share of ``save_model`` (writing, fsync).

Usage: ``python tools/bench/bench_quantize.py [--markdown tools/bench/RESULTS_quantize.md] [--repeats 7]
[--skip-cli] [--cli-repeats 3] [--workdir DIR] [--genai-model PATH]``. Needs the built library
(``tools/build_dev.sh``), onnxruntime and about 3 GB of free disk for the CLI part.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

import onnx_nf4
from onnx_nf4.codec import native as native_codec
from onnx_nf4.codec.blockwise import quantize_blockwise
from onnx_nf4.codec.layout import quantize_weight

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "tools"))
from peak_rss import cli_command, split_peak  # noqa: E402

K, N, BLOCK = 4096, 11008, 64
CHAIN_LAYERS, CHAIN_DIM = 34, 4096


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def in_process(repeats: int) -> list[dict]:
    from onnxruntime.capi._pybind_state import quantize_matmul_bnb4

    w = (np.random.default_rng(0).standard_normal((K, N), dtype=np.float32) * np.float32(0.02)).astype(np.float32)
    wt = np.ascontiguousarray(w.T)  # [N, K]: the nn.Linear order, what onnxruntime's quantizer reads
    n = w.size

    def ort_quantize(src: np.ndarray) -> None:
        packed = np.zeros((n + 1) // 2, np.uint8)
        absmax = np.zeros(-(-n // BLOCK), np.float32)
        quantize_matmul_bnb4(packed, src, absmax, BLOCK, 1, N, K)  # quant_type 1: NF4; (cols, rows) of W

    methods: dict[str, Callable[[], object]] = {}
    for threads in (1, 2):
        methods[f"quantize_blockwise(W), native, {threads} thread(s)"] = lambda t=threads: quantize_blockwise(
            w, BLOCK, backend="native", threads=t
        )
        methods[f"quantize_weight(W), native, {threads} thread(s)"] = lambda t=threads: quantize_weight(
            w, BLOCK, backend="native", threads=t
        )
        methods[f"quantize_weight(W.T.T, nn.Linear order), native, {threads} thread(s)"] = lambda t=threads: (
            quantize_weight(wt.T, BLOCK, backend="native", threads=t)
        )
    methods["onnxruntime quantize_matmul_bnb4(W.T contiguous)"] = lambda: ort_quantize(wt)
    methods["onnxruntime W.T.copy() + quantize_matmul_bnb4 (MatMulBnb4Quantizer)"] = lambda: ort_quantize(
        np.ascontiguousarray(w.T)
    )
    # Same bytes first (the flat layout of W.T equals the MatMulNF4 layout here, K % 64 == 0).
    ours = quantize_weight(w, BLOCK, backend="native")
    packed = np.zeros((n + 1) // 2, np.uint8)
    absmax = np.zeros(-(-n // BLOCK), np.float32)
    quantize_matmul_bnb4(packed, wt, absmax, BLOCK, 1, N, K)
    assert np.array_equal(ours.packed.reshape(-1), packed) and np.array_equal(ours.absmax.reshape(-1), absmax)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            samples[name].append(_timed(fn))
    numpy_wall, numpy_cpu = _timed(lambda: quantize_weight(w, BLOCK, backend="numpy"))
    numpy_flat = _timed(lambda: quantize_blockwise(w, BLOCK, backend="numpy"))
    rows = []
    for name, values in samples.items():
        wall = statistics.median(v[0] for v in values)
        cpu = statistics.median(v[1] for v in values)
        rows.append({"method": name, "wall_s": wall, "cpu_s": cpu, "weights_per_s": n / wall})
    rows.append({"method": "quantize_weight(W), numpy (1 run)", "wall_s": numpy_wall, "cpu_s": numpy_cpu,
                 "weights_per_s": n / numpy_wall})  # fmt: skip
    rows.append({"method": "quantize_blockwise(W), numpy (1 run)", "wall_s": numpy_flat[0], "cpu_s": numpy_flat[1],
                 "weights_per_s": n / numpy_flat[0]})  # fmt: skip
    return rows


def make_chain_model(path: Path, layers: int = CHAIN_LAYERS, dim: int = CHAIN_DIM, seed: int = 0) -> int:
    """A chain of ``layers`` MatMuls with float32 ``[dim, dim]`` weights (normal(0, 0.02)) in ``path.data``.

    Written weight by weight (one weight in memory at a time). Returns the number of weight elements.
    """
    data = path.with_suffix(".onnx.data")
    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    x = "x"
    with open(data, "wb") as f:
        for i in range(layers):
            w = rng.standard_normal((dim, dim), dtype=np.float32) * np.float32(0.02)
            offset = f.tell()
            f.write(w.tobytes())
            t = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[dim, dim])
            t.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(w.nbytes))):
                t.external_data.add(key=key, value=value)
            inits.append(t)
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"], name=f"matmul{i}"))
            x = f"h{i}"
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", dim])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", dim])], inits,
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return layers * dim * dim


_PHASES = r"""
import json, sys, time
from onnx_nf4.model.io import load_model, save_model
from onnx_nf4.passes import QuantizeNF4Pass
src, dst = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
model = load_model(src)
t1 = time.perf_counter()
QuantizeNF4Pass()(model)
t2 = time.perf_counter()
save_model(model, dst)
t3 = time.perf_counter()
print(json.dumps({"load_s": t1 - t0, "quantize_s": t2 - t1, "save_s": t3 - t2}))
"""


def _read_file_s(paths: list[Path]) -> float:
    """Seconds to read the files sequentially into one reused buffer (page cache, as the CLI reads them)."""
    buffer = bytearray(1 << 24)
    t0 = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass
    return time.perf_counter() - t0


def cli(model: Path, weights: int, repeats: int, workdir: Path, description: str) -> dict:
    """Median wall time, peak RSS and phases of ``onnx-nf4 quantize model OUT -q``."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    runs = []
    for i in range(repeats):
        out = workdir / f"out_{i}" / "model_nf4.onnx"
        out.parent.mkdir(exist_ok=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cli_command("quantize", str(model), str(out), "-q"), env=env, capture_output=True,
                              text=True)  # fmt: skip
        wall = time.perf_counter() - t0
        stderr, peak = split_peak(proc.stderr)
        if proc.returncode != 0:
            raise RuntimeError(f"onnx-nf4 failed ({proc.returncode}): {stderr[-3000:]}")
        runs.append((wall, peak))
        for f in out.parent.iterdir():
            f.unlink()
    out = workdir / "phases" / "model_nf4.onnx"
    out.parent.mkdir(exist_ok=True)
    proc = subprocess.run([sys.executable, "-c", _PHASES, str(model), str(out)], env=env, capture_output=True,
                          text=True, check=True)  # fmt: skip
    phases = json.loads(proc.stdout.strip().splitlines()[-1])
    out_bytes = sum(f.stat().st_size for f in out.parent.iterdir())
    data_files = sorted({Path(model.parent, e.value) for t in onnx.load(str(model), load_external_data=False).graph
                         .initializer for e in t.external_data if e.key == "location"})  # fmt: skip
    read_s = _read_file_s(data_files)
    for f in out.parent.iterdir():
        f.unlink()
    wall = statistics.median(r[0] for r in runs)
    return {
        "model": model.name,
        "description": description,
        "input_bytes": sum(f.stat().st_size for f in [model, *data_files]),
        "output_bytes": out_bytes,
        "weights": weights,
        "wall_s": wall,
        "walls": [r[0] for r in runs],
        "weights_per_s": weights / wall,
        "peak_rss": max(r[1] for r in runs),
        "phases": phases,
        "read_data_s": read_s,
    }


def _weights_of(model: Path) -> int:
    m = onnx.load(str(model), load_external_data=False)
    consumers = {n.input[1] for n in m.graph.node if n.op_type == "MatMul" and len(n.input) > 1}
    return sum(int(np.prod(t.dims)) for t in m.graph.initializer if t.name in consumers and len(t.dims) == 2)


def _machine() -> str:
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()  # fmt: skip
    return (
        f"- machine: {cpu}, {os.cpu_count()} logical CPUs (load average "
        f"{os.getloadavg()[0]:.1f} at the end), {platform.platform()}\n"
        f"- encoder instruction set: {native_codec.isa()}\n"
        f"- Python {platform.python_version()}, numpy {np.__version__}, onnx {onnx.__version__}, onnxruntime "
        f"{ort.__version__}, onnx_nf4 {onnx_nf4.__version__} (commit {commit})\n"
    )


def _targets(rows: list[dict], clis: list[dict]) -> str:
    """The measured figures against the targets of the encoder's design (met / missed)."""
    lines = []
    ort_rate = next((r["weights_per_s"] for r in rows if r["method"].startswith("onnxruntime quantize")), None)
    for prefix in ("quantize_blockwise(W), native, 2", "quantize_weight(W), native, 2"):
        row = next((r for r in rows if r["method"].startswith(prefix)), None)
        if row is not None and ort_rate:
            rate = row["weights_per_s"]
            ok = rate >= 500e6 and rate >= 5 * ort_rate
            lines.append(f"- {row['method']}: {rate / 1e6:.0f}M weights/s, {rate / ort_rate:.1f}x onnxruntime "
                         f"(target >= 500M and >= 5x): {'met' if ok else 'missed'}")  # fmt: skip
    limits = {"chain.onnx": (12.0, 1e9), "model.onnx": (6.0, None)}
    for c in clis:
        wall_limit, rss_limit = limits.get(c["model"], (None, None))
        if wall_limit is None:
            continue
        ok = c["wall_s"] <= wall_limit and (rss_limit is None or c["peak_rss"] <= rss_limit)
        rss = f", peak RSS {c['peak_rss'] / 1e6:.0f} MB (target <= 1 GB)" if rss_limit else ""
        lines.append(f"- CLI {c['model']} ({c['input_bytes'] / 1e9:.2f} GB): {c['wall_s']:.2f} s (target <= "
                     f"{wall_limit:.0f} s){rss}: {'met' if ok else 'missed'}")  # fmt: skip
    return "## Targets\n\n" + "\n".join(lines) + "\n\n" if lines else ""


def markdown(rows: list[dict], clis: list[dict]) -> str:
    text = "# NF4 quantization speed\n\nProduced by `tools/bench/bench_quantize.py` (see its docstring).\n\n"
    text += _machine() + "\n"
    if rows:
        ort_row = next(r for r in rows if r["method"].startswith("onnxruntime quantize_matmul_bnb4"))
        text += (
            f"## In process: W[{K}, {N}] float32, block size {BLOCK}\n\nMedians of interleaved repetitions. "
            "CPU/wall is the process CPU time over the wall time (the cores a method kept busy; below the thread "
            "count when the machine is busy); weights per CPU second is what one core does when it runs the "
            "method.\n\n| method | wall | CPU/wall | weights/s | weights per CPU second | vs onnxruntime |\n"
            "|---|---|---|---|---|---|\n"
        )
        for r in rows:
            text += (
                f"| {r['method']} | {r['wall_s'] * 1e3:.1f} ms | {r['cpu_s'] / r['wall_s']:.2f} | "
                f"{r['weights_per_s'] / 1e6:.0f}M | {K * N / max(r['cpu_s'], 1e-9) / 1e6:.0f}M | "
                f"{r['weights_per_s'] / ort_row['weights_per_s']:.2f}x |\n"
            )
        text += "\n"
    text += _targets(rows, clis)
    if clis:
        text += (
            "The CLI reads the weights one at a time from the memory-mapped input (each unmapped once quantized), "
            "keeps the NF4 tensors (about 1/7 of the float32 size) and writes the output protobuf once at the end, "
            "streaming each tensor from its buffer (`onnx_nf4.model.proto_writer`); the wall time includes the Python "
            "start-up and imports (onnx, onnx_ir, ml_dtypes: 0.5-3 s, depending on the machine's load).\n\n"
        )
    for c in clis:
        p = c["phases"]
        total = p["load_s"] + p["quantize_s"] + p["save_s"]
        text += (
            f"## CLI end to end: `onnx-nf4 quantize {c['model']} OUT -q`\n\n"
            f"- model: {c['description']}\n"
            f"- input {c['input_bytes'] / 1e9:.2f} GB ({c['weights'] / 1e6:.0f}M weights quantized), output "
            f"{c['output_bytes'] / 1e9:.3f} GB\n"
            f"- wall time {c['wall_s']:.2f} s (median of {', '.join(f'{w:.2f}' for w in c['walls'])}), "
            f"{c['weights_per_s'] / 1e6:.0f}M weights/s, peak RSS {c['peak_rss'] / 1e6:.0f} MB\n"
            f"- in-process phases: load {p['load_s']:.2f} s, quantize {p['quantize_s']:.2f} s (the weights are read "
            f"from the memory-mapped data file here), save {p['save_s']:.2f} s (write + fsync); file write "
            f"{p['save_s'] / total:.0%} of the run; reading the input data file alone takes {c['read_data_s']:.2f} "
            f"s ({c['read_data_s'] / total:.0%} of the run): file I/O together "
            f"{(p['save_s'] + c['read_data_s']) / total:.0%}\n\n"
        )
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--cli-repeats", type=int, default=3)
    parser.add_argument("--skip-cli", action="store_true")
    parser.add_argument("--skip-in-process", action="store_true")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--genai-model", type=Path, help="an onnxruntime-genai model.onnx to quantize too")
    args = parser.parse_args(argv)
    if not native_codec.available():
        parser.error("the custom-op library is not built (tools/build_dev.sh)")
    rows = [] if args.skip_in_process else in_process(args.repeats)
    for r in rows:
        print(f"{r['method']:80s} {r['wall_s'] * 1e3:8.1f} ms  {r['weights_per_s'] / 1e6:6.0f}M/s", flush=True)
    clis = []
    if not args.skip_cli:
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            model = Path(tmp) / "chain" / "chain.onnx"
            model.parent.mkdir()
            weights = make_chain_model(model)
            chain = f"a chain of {CHAIN_LAYERS} MatMuls with {CHAIN_DIM} x {CHAIN_DIM} float32 weights (generated)"
            clis.append(cli(model, weights, args.cli_repeats, Path(tmp), chain))
            print(json.dumps(clis[-1]), flush=True)
            for f in model.parent.iterdir():
                f.unlink()
            if args.genai_model:
                genai = f"onnxruntime-genai builder model {args.genai_model.name} (--genai-model)"
                clis.append(cli(args.genai_model, _weights_of(args.genai_model), args.cli_repeats, Path(tmp), genai))
                print(json.dumps(clis[-1]), flush=True)
    text = markdown(rows, clis)
    if args.markdown:
        args.markdown.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
