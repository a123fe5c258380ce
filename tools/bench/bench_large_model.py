"""Quantize a > 2.2 GB float32 model with the ``onnx-nf4`` CLI and measure its peak memory, then check the output.

Steps:

1. Generate the synthetic LLM-like model of ``tools/make_large_model.py`` (default 2.59 GB of float32 weights in
   external data; ``--per-tensor-files`` for one data file per weight), unless ``--model`` names an existing one.
2. Run ``python -m onnx_nf4 quantize IN OUT -q`` in a subprocess (the default: an input over 2 GB is written
   with external data), then the same with ``--no-external-data`` (one protobuf). The peak resident set
   size is the kernel's high-water mark of that process, ``VmHWM``, written by the process itself when the
   command ends (anonymous memory *and* resident pages of memory-mapped files, so mapped weights count;
   ``ru_maxrss`` of a child would also count the benchmark process it was forked from). The RSS of the process
   tree is also sampled every 20 ms with ``psutil`` as a cross-check. Wall time and the input and output sizes
   on disk are recorded.
3. Check a few layers of the first output (the first ``q_proj``, a middle ``down_proj`` and the 262 MB ``lm_head``):
   their NF4 bytes equal :func:`onnx_nf4.quantize_weight` of the input weight, and the ``MatMulNF4`` node run
   alone in onnxruntime with this package's custom-op library equals the numpy reference
   :func:`onnx_nf4.op.reference.matmul_nf4` within float32 rounding of a length-K dot product.
4. Run the whole output model in onnxruntime (custom-op library) and the float model, and report the relative
   error of the logits (the 4-bit error of every weight, compounded over the layers).

The verdict is PASS when the CLI succeeds, the checked layers equal the reference, the logits are finite and the
peak RSS of the default run is below ``--max-rss-mb`` (default 1500). ``--markdown FILE`` writes the result
with the machine and package versions. Needs psutil, the built custom-op library (``tools/build_dev.sh``) and about
4 GB of free disk in ``--workdir`` (default: a temporary directory, deleted afterwards unless ``--keep``).

Usage: ``python tools/bench/bench_large_model.py [--markdown tools/bench/RESULTS_large_model.md]
[--per-tensor-files] [--block-size 64] [--double-quant] [--max-rss-mb 1500] [--workdir DIR] [--keep]
[--model EXISTING.onnx]``.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import psutil
from onnx import helper, numpy_helper

import onnx_nf4
from onnx_nf4.model.io import external_tensors
from onnx_nf4.op.reference import matmul_nf4
from onnx_nf4.runtime import session_options

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "tools"))
import make_large_model as generator  # noqa: E402
from peak_rss import cli_command, split_peak  # noqa: E402

MB = 1e6
F32_EPS = float(np.finfo(np.float32).eps)


@dataclass
class Measured:
    """One measured subprocess run."""

    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    peak_rss_bytes: int  # the process's own high-water mark (VmHWM)
    sampled_tree_peak_bytes: int  # the largest sampled RSS sum over the process and its children


def run_cli_measured(args: list[str], sample_s: float = 0.02) -> Measured:
    """Run ``onnx-nf4 ARGS``; return its output, wall time and peak memory (see the module docstring)."""
    cmd = cli_command(*args)
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        sampled = 0
        done = threading.Event()

        def sample() -> None:
            nonlocal sampled
            try:
                root = psutil.Process(proc.pid)
                while not done.is_set():
                    total = 0
                    for p in [root, *root.children(recursive=True)]:
                        with contextlib.suppress(psutil.Error):  # exited between listing and reading
                            total += p.memory_info().rss
                    sampled = max(sampled, total)
                    done.wait(sample_s)
            except psutil.Error:  # the process is gone (or a zombie)
                return

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        proc.wait()
        done.set()
        sampler.join()
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stderr, peak = split_peak(err.read().decode(errors="replace"))
        return Measured(proc.returncode, out.read().decode(errors="replace"), stderr, wall, peak, sampled)


def files_of(model_path: Path) -> list[Path]:
    """The model file and the external data files it references."""
    locations = {str(tensor.location) for tensor in external_tensors(ir.load(model_path))}
    return [model_path, *(model_path.parent / location for location in sorted(locations))]


def disk_bytes(model_path: Path) -> int:
    return sum(path.stat().st_size for path in files_of(model_path))


# ----------------------------------------------------------------------------------------------------- checks


@dataclass
class LayerCheck:
    name: str
    K: int
    N: int
    bytes_identical: bool
    max_err_over_bound: float  # |ort - reference| / (2 K eps |A| @ |W|), must be <= 1
    max_abs_err: float


def _single_node(node: ir.Node, tensors: list[np.ndarray | None]) -> bytes:
    names = ["B", "absmax", "nested_absmax", "nested_code", "absmax_offset", "bias"]
    inputs, inits = ["A"], []
    for name, array in zip(names, tensors, strict=False):
        inputs.append(name if array is not None else "")
        if array is not None:
            inits.append(numpy_helper.from_array(array, name))
    attrs = {key: attr.as_int() for key, attr in node.attributes.items()}
    nf4 = helper.make_node("MatMulNF4", inputs, ["Y"], domain="onnx_nf4", **attrs)
    graph = helper.make_graph(
        [nf4],
        "layer",
        [helper.make_tensor_value_info("A", onnx.TensorProto.FLOAT, ["M", attrs["K"]])],
        [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, None)],
        inits,
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("onnx_nf4", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString()


def check_layer(src: ir.Model, out: ir.Model, node_name: str, weight_name: str, block_size: int, dq: bool):
    """Compare one quantized layer of ``out`` with the input weight and the reference op (see step 3)."""
    node = next(n for n in out.graph if n.name == node_name)
    assert (node.domain, node.op_type) == ("onnx_nf4", "MatMulNF4"), (node.domain, node.op_type)
    tensors = [v.const_value.numpy() if v is not None else None for v in node.inputs[1:]]
    B, absmax = tensors[0], tensors[1]
    w = src.graph.initializers[weight_name].const_value
    expected = onnx_nf4.quantize_weight(w.numpy(), block_size, double_quant=dq)
    same = expected.packed.tobytes() == B.tobytes() and expected.absmax.tobytes() == absmax.tobytes()
    if dq:
        same = same and expected.nested.nested_absmax.tobytes() == tensors[2].tobytes()
    w.release()
    K, N = expected.K, expected.N
    a = np.random.default_rng(K + N).standard_normal((8, K)).astype(np.float32)
    sess = ort.InferenceSession(_single_node(node, tensors), session_options(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"A": a})[0]
    extra = tensors[2:5] if dq else [None, None, None]
    ref = matmul_nf4(a, B, absmax, *extra, K=K, N=N, block_size=block_size,
                     nested_block_size=node.attributes.get_int("nested_block_size", 256))  # fmt: skip
    bound = np.abs(a.astype(np.float64)) @ np.abs(onnx_nf4.dequantize_weight(expected).astype(np.float64))
    err = np.abs(y.astype(np.float64) - ref.astype(np.float64))
    return LayerCheck(weight_name, K, N, same, float((err / (2 * K * F32_EPS * bound + 1e-30)).max()), err.max())


def end_to_end(model_in: Path, model_out: Path, vocab: int) -> tuple[float, float, bool]:
    """Relative L2 error of the NF4 model's logits against the float model's, the NF4 session's time (creation
    and one run, in s) and whether its logits are all finite."""
    ids = np.random.default_rng(0).integers(0, vocab, size=(1, 32), dtype=np.int64)
    fp32 = ort.InferenceSession(str(model_in), providers=["CPUExecutionProvider"])
    ref = fp32.run(None, {"input_ids": ids})[0]
    del fp32
    start = time.perf_counter()
    nf4 = ort.InferenceSession(str(model_out), session_options(), providers=["CPUExecutionProvider"])
    y = nf4.run(None, {"input_ids": ids})[0]
    nf4_s = time.perf_counter() - start
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref)), nf4_s, bool(np.isfinite(y).all())


# ---------------------------------------------------------------------------------------------------- report


@dataclass
class Variant:
    """One CLI run."""

    label: str
    command: str
    run: Measured
    output_bytes: int = 0
    output_files: int = 0


@dataclass
class Result:
    weights: int
    data_files_in: int
    input_bytes: int
    largest_weight_bytes: int
    variants: list[Variant] = field(default_factory=list)
    layers: list[LayerCheck] = field(default_factory=list)
    e2e_rel_error: float = float("nan")
    e2e_seconds: float = float("nan")
    e2e_finite: bool = False


def _versions() -> str:
    import onnx_ir

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        cpu = f"{names[0]} ({len(names)} logical CPUs)" if names else cpu
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    return (
        f"- machine: {cpu}, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, {platform.platform()}\n"
        f"- Python {platform.python_version()}, numpy {np.__version__}, onnx {onnx.__version__}, "
        f"onnx-ir {onnx_ir.__version__}, onnxruntime {ort.__version__}, onnx_nf4 {onnx_nf4.__version__} "
        f"(commit {commit.stdout.strip() or 'unknown'})"
    )


def render(result: Result, max_rss_bytes: float) -> str:
    main_run = result.variants[0].run
    layers_ok = bool(result.layers) and all(c.bytes_identical and c.max_err_over_bound <= 1 for c in result.layers)
    ok_runs = all(v.run.returncode == 0 for v in result.variants)
    passed = ok_runs and layers_ok and result.e2e_finite and main_run.peak_rss_bytes < max_rss_bytes
    lines = [
        "# Large-model quantization: peak memory of the `onnx-nf4` CLI",
        "",
        "Produced by `tools/bench/bench_large_model.py` (see its docstring for the method).",
        "",
        _versions(),
        "",
        f"Input: synthetic LLM-like model of `tools/make_large_model.py`, {result.weights} float32 weights, "
        f"{result.input_bytes / MB:.0f} MB on disk in {result.data_files_in} external data file(s), largest "
        f"weight {result.largest_weight_bytes / MB:.0f} MB.",
        "",
        "| output | command | exit | peak RSS (VmHWM) | sampled peak (psutil) | peak / input | wall time | output |",
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| {v.label} | `{v.command}` | {v.run.returncode} | {v.run.peak_rss_bytes / MB:.0f} MB | "
            f"{v.run.sampled_tree_peak_bytes / MB:.0f} MB | {v.run.peak_rss_bytes / result.input_bytes:.3f} | "
            f"{v.run.wall_s:.1f} s | {v.output_bytes / MB:.0f} MB in {v.output_files} file(s) |"
            for v in result.variants
        ),
        "",
        f"Layers checked in the {result.variants[0].label} output (NF4 bytes vs `quantize_weight` of the input; "
        "`MatMulNF4` in onnxruntime vs the reference, error as a fraction of the float32 dot-product bound "
        "`2 K eps |A| @ |W|`, A of 8 rows):",
        "",
        "| weight | K x N | bytes identical | max error / bound | max abs error |",
        "|---|---|---|---|---|",
        *(
            f"| {c.name} | {c.K}x{c.N} | {'yes' if c.bytes_identical else 'NO'} | {c.max_err_over_bound:.2e} | "
            f"{c.max_abs_err:.2e} |"
            for c in result.layers
        ),
        "",
        f"Whole output model in onnxruntime with the custom-op library (1 x 32 tokens): session + run "
        f"{result.e2e_seconds:.1f} s, logits finite: {'yes' if result.e2e_finite else 'NO'}, relative L2 error "
        f"against the float32 model {result.e2e_rel_error:.4f} (the NF4 error of every weight, compounded).",
        "",
        f"Verdict: {'PASS' if passed else 'FAIL'} (every run exit status 0: {'yes' if ok_runs else 'NO'}; checked "
        f"layers equal the reference: {'yes' if layers_ok else 'NO'}; peak RSS of the default run "
        f"{main_run.peak_rss_bytes / MB:.0f} MB for {result.input_bytes / MB:.0f} MB of input, limit "
        f"{max_rss_bytes / MB:.0f} MB).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="where to generate the model (default: a temporary dir)")
    parser.add_argument("--model", type=Path, help="an existing model made by tools/make_large_model.py")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--per-tensor-files", action="store_true", help="one external data file per weight")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--double-quant", action="store_true")
    parser.add_argument("--max-rss-mb", type=float, default=1500, help="peak RSS above this fails (default 1500)")
    parser.add_argument("--markdown", type=Path, help="also write the result to this file")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="nf4_large_", dir=args.workdir))
    try:
        model_in = args.model
        if model_in is None:
            model_in = workdir / "model.onnx"
            start = time.perf_counter()
            info = generator.make_large_model(
                model_in,
                layers=args.layers,
                hidden=args.hidden,
                ffn=args.ffn,
                vocab=args.vocab,
                per_tensor_files=args.per_tensor_files,
            )
            print(f"generated {info.weight_bytes / MB:.0f} MB of weights in {time.perf_counter() - start:.1f} s")
        shapes = {v.name: tuple(v.shape) for v in ir.load(model_in).graph.initializers.values() if v.name}
        shapes = {name: shape for name, shape in shapes.items() if len(shape) == 2}
        layers = max(int(name.split(".")[1]) for name in shapes if name.startswith("layers.")) + 1
        vocab = shapes["lm_head"][1]
        result = Result(
            weights=len(shapes),
            data_files_in=len(files_of(model_in)) - 1,
            input_bytes=disk_bytes(model_in),
            largest_weight_bytes=max(4 * r * c for r, c in shapes.values()),
        )
        options = ["-q", "--block-size", str(args.block_size)] + (["--double-quant"] if args.double_quant else [])
        for label, extra in (
            ("default (external data)", []),
            ("--no-external-data (one protobuf)", ["--no-external-data"]),
        ):
            model_out = workdir / f"model_nf4_{len(result.variants)}.onnx"
            cli = ["quantize", str(model_in), str(model_out), *options, *extra]
            print("running: onnx-nf4", " ".join(cli))
            run = run_cli_measured(cli)
            print(run.stdout[-300:], run.stderr[-2000:], f"peak RSS {run.peak_rss_bytes / MB:.0f} MB", sep="\n")
            command = " ".join(["onnx-nf4", *cli]).replace(str(workdir) + "/", "")
            variant = Variant(label, command, run)
            if run.returncode == 0:
                variant.output_bytes, variant.output_files = disk_bytes(model_out), len(files_of(model_out))
            result.variants.append(variant)
        model_out = workdir / "model_nf4_0.onnx"
        if result.variants[0].run.returncode == 0:
            src, out = ir.load(model_in), ir.load(model_out)
            mid = layers // 2
            for node_name, weight in [
                ("layers.0.q", "layers.0.self_attn.q_proj"),
                (f"layers.{mid}.down", f"layers.{mid}.mlp.down_proj"),
                ("lm_head", "lm_head"),
            ]:
                result.layers.append(check_layer(src, out, node_name, weight, args.block_size, args.double_quant))
                print(result.layers[-1])
            del src, out
            result.e2e_rel_error, result.e2e_seconds, result.e2e_finite = end_to_end(model_in, model_out, vocab)
        text = render(result, args.max_rss_mb * MB)
        print(text)
        if args.markdown:
            args.markdown.write_text(text)
        return 0 if "Verdict: PASS" in text else 1
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
