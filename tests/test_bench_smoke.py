"""Smoke runs of the benchmarks (tools/bench/): every variant builds, runs and gives sane numbers on small inputs.

No timing is checked (speed is measured by the benchmarks themselves, never in tests): these keep the scripts working
between benchmark runs. bench_cpu runs one small case with every peer (OpenVINO's column only where openvino is
installed), bench_cpu_shapes one small case; bench_models runs the MiniLM part, one round at one thread, on the
session's exported MiniLM. The LLM part (two onnxruntime-genai builder runs, a minute) is left to
``python tools/bench/bench_models.py --quick``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from onnx_nf4.runtime import CustomOpLibraryNotFoundError, custom_op_library

pytest.importorskip("onnxruntime")
try:
    custom_op_library()
except CustomOpLibraryNotFoundError as exc:
    pytest.skip(str(exc), allow_module_level=True)

BENCH_DIR = Path(__file__).resolve().parents[1] / "tools" / "bench"
sys.path.insert(0, str(BENCH_DIR))
import bench_cpu  # noqa: E402  (a script module of tools/bench)
import openvino_peer  # noqa: E402


def test_bench_cpu_one_small_case(tmp_path):
    results = bench_cpu.run_case(K=256, N=128, M=3, threads=1, rounds=1)
    by = {r.name: r for r in results}
    expected = {"fp32", "nf4", "nf4_acc4", "nf4_b128_acc4", "bnb4", "nbits32_acc0", "nbits32_acc4"}
    expected |= {"nbits128_acc0", "nbits128_acc4"}
    if openvino_peer.openvino_version() is not None:
        expected |= {name for name, _ in bench_cpu.openvino_variants()}
    assert set(by) == expected
    assert by["fp32"].rel_err == 0.0
    for r in results:
        assert r.ms > 0 and r.min_ms > 0
        assert r.rel_err < 0.2, r  # 4-bit weights of normal(0, 0.05): about 0.1
    assert by["nf4"].rel_err == pytest.approx(by["bnb4"].rel_err, rel=1e-3)  # the same NF4 codes
    row = bench_cpu.summary_row(256, 128, 3, 1, results)
    assert row.count("|") == bench_cpu.SUMMARY_HEADER[0].count("|")
    run = {"header": "CPU: test", "kernel_set": "test", "summary": [row], "sections": ["### case"]}
    out = tmp_path / "results.md"
    bench_cpu.write_markdown(str(out), [run], "python tools/bench/bench_cpu.py", 1)
    assert row in out.read_text()


def test_bench_cpu_shapes_one_small_case():
    import bench_cpu_shapes

    times = bench_cpu_shapes.run_case(50, 64, 40, threads=1, rounds=1, openblas=True)
    assert set(times) == {"fp32", "nf4", "openblas_avx2"}
    assert all(wall > 0 and cpu >= 0 for wall, cpu in times.values())


@pytest.mark.slow
def test_bench_models_minilm(minilm_fp32_path, tmp_path):
    import bench_models

    shutil.copy(minilm_fp32_path, tmp_path / "minilm_fp32.onnx")  # the cache: no second export
    paths = bench_models.prepare_minilm(tmp_path)
    assert set(paths) == set(bench_models.MINILM_VARIANTS)
    rows = bench_models.bench_minilm(paths, threads=1, rounds=1)
    by = {r.variant: r for r in rows}
    assert by["fp32"].speedup == 1.0 and by["fp32"].min_cosine == pytest.approx(1.0)
    for r in rows:
        assert r.ms > 0 and np.isfinite(r.speedup)
        assert r.min_cosine > 0.9, r  # 4-bit MiniLM embeddings stay close to fp32's
    args = argparse.Namespace(minilm_rounds=1, llm_preset="tiny", llm_threads=2, prompt_tokens=8, decode_tokens=4)
    table = bench_models.minilm_table(rows)
    run = {"header": "CPU: test", "kernel_set": "test", "minilm": table, "llm": [], "minilm_shape": [24, 21]}
    out = tmp_path / "results.md"
    bench_models.write_markdown(str(out), [run], "python tools/bench/bench_models.py", args)
    assert all(line in out.read_text() for line in table)


def test_readme_speed_tables_match_the_results():
    """The README's speed tables are the ones tools/bench/readme_speed.py makes from the committed results files."""
    import readme_speed

    readme = readme_speed.README.read_text()
    assert readme_speed.readme_with_tables(readme) == readme, "run: python tools/bench/readme_speed.py --write"


def test_bench_optimized_minilm(minilm_fp32_path, tmp_path):
    import bench_optimized

    shutil.copy(minilm_fp32_path, tmp_path / "minilm_fp32.onnx")  # the cache: no second export
    paths = bench_optimized.prepare(tmp_path)
    assert set(paths) == {"fp32", "nf4", "fp32_opt", "nf4_opt", "bnb4_opt", "fp32_opt_gather", "nf4_opt_gather"}
    lines, relative = bench_optimized.measure(paths, threads=1, rounds=1)
    assert len(lines) == len(paths) and set(relative) == {"median", "min", "median, gather", "min, gather"}
    assert all(np.isfinite(value) and value > 0 for value in relative.values())
    for line in lines:
        assert float(line.rstrip(" |").rsplit("|", 1)[1]) > 0.9, line  # min cosine vs fp32
