"""The README's speed tables, generated from the committed results (RESULTS_cpu.md and RESULTS_models.md).

The README holds the tables between ``<!-- speed-tables:start -->`` and ``<!-- speed-tables:end -->``; after a
benchmark run, ``python tools/bench/readme_speed.py --write`` replaces them (``tests/test_bench_smoke.py`` checks
that they match). One row per kernel set of the results files (e.g. AVX-512 and ``ONNX_NF4_CPU_ISA=avx2``).

Usage: ``python tools/bench/readme_speed.py [--write]`` (prints the tables without ``--write``).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
README = BENCH_DIR.parents[1] / "README.md"
START, END = "<!-- speed-tables:start -->", "<!-- speed-tables:end -->"

KERNEL_SET_NAMES = {"avx512": "AVX-512", "avx2vnni": "AVX2 + AVX-VNNI", "avx2": "AVX2", "portable": "portable"}
CPU_COLUMNS = {  # bench_cpu variant -> README column
    "fp32": "fp32 `MatMul`",
    "nf4": "`MatMulNF4`",
    "nf4_acc4": "`MatMulNF4` acc. 4",
    "bnb4": "`MatMulBnb4`",
    "nbits128_acc0": "`MatMulNBits` b128 acc. 0",
    "nbits128_acc4": "`MatMulNBits` b128 acc. 4",
    "openvino_nf4": "OpenVINO NF4",
}
MODEL_COLUMNS = {  # bench_models variant (MiniLM name or LLM label prefix) -> README column
    "fp32": "fp32",
    "nf4": "NF4 exact",
    "nf4_acc4": "NF4 fast (acc. 4)",
    "bnb4": "`MatMulBnb4`",
    "nbits128_acc4": "`MatMulNBits` b128 acc. 4",
    "int4": "genai builder int4 (b32 acc. 4)",
}
LLM_SECTIONS = {  # the start of a bench_models LLM section title -> the README's name of the model
    "Llama": "LLM (Llama-shaped)",
    "SmolLM2": "SmolLM2-135M",
}
LLM_LABEL_PREFIX = {  # the start of bench_models' LLM_LABELS
    "fp32 (": "fp32",
    "int4 (": "int4",
    "NF4 exact": "nf4",
    "NF4 fast": "nf4_acc4",
    "MatMulBnb4": "bnb4",
    "MatMulNBits b128": "nbits128_acc4",
}


def _number(value: float) -> str:
    """``value`` with as many decimals as its size deserves (``1234``, ``43.3``, ``4.12``, ``0.431``)."""
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def _table_rows(text: str) -> list[list[str]]:
    """The body rows of the first markdown table in ``text`` (header and separator dropped), as cells."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines[2:]]


def _sections(text: str, heading: str) -> list[tuple[str, str]]:
    """``(title, body)`` of each section whose heading line is ``heading`` + title."""
    parts = re.split(rf"^{re.escape(heading)}(.*)$", text, flags=re.MULTILINE)
    return [(parts[i].strip(), parts[i + 1]) for i in range(1, len(parts) - 1, 2)]


def kernels_name(label: str) -> str:
    """A short name of a results section's kernel set: the library's name if known, else the cap (``AVX-512`` ...)."""
    match = re.search(r"kernel set: ([^)]+)\)", label)
    name = match.group(1) if match and match.group(1) != "unknown" else None
    if name is None:
        cap = re.search(r"ONNX_NF4_CPU_ISA=(\w+)", label)
        name = cap.group(1) if cap else "default"
    pretty = KERNEL_SET_NAMES.get(name, name)
    return pretty if name in ("avx512", "default") else f"{pretty} (`ONNX_NF4_CPU_ISA={name}`)"


def cpu_table(results: str, K: int = 4096, N: int = 4096, threads: int = 1) -> list[str]:
    """One MatMul ``K x N``: the best (minimum) ms of each variant, one row per (kernel set, M)."""
    head = "| kernels | M | " + " | ".join(CPU_COLUMNS.values()) + " |"
    rows = [head, "|---|---:|" + "---:|" * len(CPU_COLUMNS)]
    for label, body in _sections(results, "## Every variant, "):
        for case, table in _sections(body, "### "):
            match = re.fullmatch(rf"K={K} N={N} M=(\d+) threads={threads}", case)
            if not match:
                continue
            ms = {cells[0]: float(cells[2]) for cells in _table_rows(table)}
            cells = []
            for variant in CPU_COLUMNS:
                if variant not in ms:
                    cells.append("n/a")
                elif variant == "nf4":
                    cells.append(f"**{_number(ms[variant])} ms** ({ms['fp32'] / ms[variant]:.2f}x fp32)")
                else:
                    cells.append(f"{_number(ms[variant])} ms")
            rows.append(f"| {kernels_name(label)} | {match.group(1)} | " + " | ".join(cells) + " |")
    return rows


def models_table(results: str) -> list[str]:
    """MiniLM ms per batch and LLM prefill ms / decode tok/s per variant (speed vs fp32), one row per kernel set."""
    head = "| model, measure | kernels | threads | " + " | ".join(MODEL_COLUMNS.values()) + " |"
    rows = [head, "|---|---|---:|" + "---:|" * len(MODEL_COLUMNS)]

    def row(what: str, label: str, threads: str, values: dict[str, float], unit: str, higher_is_faster: bool) -> str:
        cells = []
        for variant in MODEL_COLUMNS:
            if variant not in values:
                cells.append("-")
                continue
            value, fp32 = values[variant], values["fp32"]
            speed = value / fp32 if higher_is_faster else fp32 / value
            cells.append(f"{_number(value)} {unit}" + ("" if variant == "fp32" else f" ({speed:.2f}x)"))
        return f"| {what} | {kernels_name(label)} | {threads} | " + " | ".join(cells) + " |"

    for label, body in _sections(results, "## "):
        for title, table in _sections(body, "### "):
            cells = _table_rows(table)
            if title.startswith("MiniLM"):
                for threads in dict.fromkeys(c[1] for c in cells):
                    ms = {c[0]: float(c[2]) for c in cells if c[1] == threads}
                    rows.append(row("MiniLM, ms per batch", label, threads, ms, "ms", False))
            elif title.startswith(tuple(LLM_SECTIONS)):
                what = next(v for p, v in LLM_SECTIONS.items() if title.startswith(p))
                name = {c[0]: next(v for p, v in LLM_LABEL_PREFIX.items() if c[0].startswith(p)) for c in cells}
                prefill = {name[c[0]]: float(c[2]) for c in cells}
                decode = {name[c[0]]: float(c[4]) for c in cells}
                threads = cells[0][1]
                rows.append(row(f"{what}, prefill ms (64 tokens)", label, threads, prefill, "ms", False))
                rows.append(row(f"{what}, decode tok/s", label, threads, decode, "tok/s", True))
    return rows


def speed_tables() -> str:
    """The README block between the markers (markers excluded)."""
    cpu = (BENCH_DIR / "RESULTS_cpu.md").read_text()
    models = (BENCH_DIR / "RESULTS_models.md").read_text()
    return "\n".join(
        [
            "One MatMul, 4096 x 4096 weight, one thread (best of the interleaved runs, ms; speed-up > 1: faster than "
            "fp32):",
            "",
            *cpu_table(cpu),
            "",
            "Whole models (speed against the fp32 model in brackets, > 1: faster):",
            "",
            *models_table(models),
        ]
    )


def readme_with_tables(readme: str) -> str:
    """``readme`` with the block between the markers replaced by :func:`speed_tables`."""
    start, end = readme.index(START) + len(START), readme.index(END)
    return readme[:start] + "\n" + speed_tables() + "\n" + readme[end:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"replace the tables in {README.name}")
    args = parser.parse_args()
    if args.write:
        README.write_text(readme_with_tables(README.read_text()))
    else:
        print(speed_tables())


if __name__ == "__main__":
    main()
