"""tools/ptxas_report.py: it parses ptxas's output, docs/gpu.md's register table covers every kernel, and (with nvcc)
the committed table is what ptxas reports for the current source. Without nvcc the last test skips, except in CI
(``CI=true``), where nvcc is installed and a missing one is a failure."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from onnx_nf4.op import cupy_backend as cb

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import ptxas_report

SAMPLE = """\
ptxas info    : 0 bytes gmem, 64 bytes cmem[3]
ptxas info    : Compiling entry function '_ZN8onnx_nf43gpu13nf4_gemv_simtIfLi8EEEvPKT_PKhPKfS6_S8_S8_S8_S4_PS2_iiiiiiii' for 'sm_80'
ptxas info    : Function properties for _ZN8onnx_nf43gpu13nf4_gemv_simtIfLi8EEEvPKT_PKhPKfS6_S8_S8_S8_S4_PS2_iiiiiiii
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 164 registers, used 1 barriers, 256 bytes smem, 456 bytes cmem[0]
ptxas info    : Compile time = 274.514 ms
ptxas info    : Compiling entry function '_ZN8onnx_nf43gpu12nf4_gemv_mmaINS0_3f16ELi16EEEvPKT_PKhPKfS7_S9_S9_S9_S5_PS3_iiiiiiii' for 'sm_90'
ptxas info    : Function properties for _ZN8onnx_nf43gpu12nf4_gemv_mmaINS0_3f16ELi16EEEvPKT_PKhPKfS7_S9_S9_S9_S5_PS3_iiiiiiii
    24 bytes stack frame, 28 bytes spill stores, 32 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 24 bytes cumulative stack size, 8192 bytes smem, 456 bytes cmem[0]
"""  # noqa: E501


def test_parse_reads_registers_and_spills():
    simt, mma = ptxas_report.parse(SAMPLE)
    assert (simt.arch, simt.registers, simt.spill_stores, simt.spill_loads, simt.shared) == ("sm_80", 164, 0, 0, 256)
    assert (mma.arch, mma.registers, mma.stack_frame, mma.spill_stores, mma.spill_loads) == ("sm_90", 128, 24, 28, 32)
    names = ptxas_report.demangle([simt.kernel, mma.kernel])
    assert names[simt.kernel] == "nf4_gemv_simt<float, 8>" and names[mma.kernel] == "nf4_gemv_mma<f16, 16>"
    table = ptxas_report.render(ptxas_report.parse(SAMPLE.replace("'sm_90'", "'sm_80'")))
    assert "| `nf4_gemv_simt<float, 8>` | 164 | 0 / 0 | 256 |" in table


def test_docs_table_lists_every_kernel():
    section = ptxas_report.section(ptxas_report.DOC.read_text(encoding="utf-8"))
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    listed = {row.split("`")[1] for row in rows}
    kernels = {n.replace("onnx_nf4::gpu::", "") for d in ("float32", "float16", "bfloat16") for n in cb.kernel_names(d)}
    assert listed == kernels
    assert all(row.count("|") == 2 + 2 * len(ptxas_report.ARCHS) + 1 for row in rows)


@pytest.mark.slow
def test_docs_table_is_current():
    compiler = ptxas_report.nvcc()
    if compiler is None:
        if os.environ.get("CI") == "true":
            pytest.fail("nvcc is missing in CI: the register table cannot be checked")
        pytest.skip("nvcc not found")
    body = ptxas_report.report(compiler)
    assert ptxas_report.section(ptxas_report.DOC.read_text(encoding="utf-8")) == body, (
        "docs/gpu.md's register table is stale: python tools/ptxas_report.py --write"
    )
