"""What the benchmarks share: the machine description of a results file, and one child process per CPU kernel set.

The CPU kernel set is chosen once per process (capped by ``ONNX_NF4_CPU_ISA``), so a benchmark that compares kernel
sets runs itself once per value in a child process (:func:`run_per_isa`) and writes one markdown file from all of
them. Each child measures every variant interleaved in its own process, as a single run does.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import onnx_nf4
from onnx_nf4.op.sysinfo import CPU_ISA_ENV_VAR

#: The note of every results file on how to read it.
LOAD_NOTE = (
    "The load average (in each machine line) says how busy the machine was: variants run interleaved in one process, "
    "so their ratios hold under load; absolute times do not."
)

#: Versions listed in a results file (distribution names; those not installed are left out).
VERSIONED = ("onnxruntime", "onnx", "numpy", "openvino", "nncf", "onnxruntime-genai", "transformers", "torch")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def kernel_set_label() -> str:
    """The ``ONNX_NF4_CPU_ISA`` cap and the kernel set MatMulNF4 runs in this process, e.g.
    ``ONNX_NF4_CPU_ISA=avx2 (kernel set: avx2)`` or ``ONNX_NF4_CPU_ISA not set (kernel set: avx512)``."""
    system = onnx_nf4.info()
    cap = f"{CPU_ISA_ENV_VAR}={system.cpu_isa_env}" if system.cpu_isa_env else f"{CPU_ISA_ENV_VAR} not set"
    return f"{cap} (kernel set: {system.cpu_kernel_set})"


def machine_header() -> str:
    """One paragraph: CPU, cores, CPU features, kernel set, versions and the load average (the machine may be busy)."""
    system = onnx_nf4.info()
    versions = [f"onnx_nf4 {system.onnx_nf4_version}", f"Python {system.python_version}"]
    for name in VERSIONED:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions.append(f"{name} {metadata.version(name)}")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (
        f"CPU: {cpu_model()}, {os.cpu_count()} logical cores, features {' '.join(system.cpu_features)}; "
        f"MatMulNF4: {kernel_set_label()}; {', '.join(versions)}; load average at start {load}"
    )


def run_per_isa(script: str, argv: Sequence[str], isas: Sequence[str]) -> list[dict]:
    """Run ``python script *argv --results-json FILE`` once per ISA with ``ONNX_NF4_CPU_ISA`` set; their results.

    The children's output goes to this process' stdout as they run. Each child writes a JSON object to ``FILE``
    (the script's own format); they are returned in the order of ``isas``.

    Raises:
        RuntimeError: a child failed.
    """
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for isa in isas:
            out = Path(tmp) / f"{isa}.json"
            print(f"\n=== {CPU_ISA_ENV_VAR}={isa} ===", flush=True)
            env = {**os.environ, CPU_ISA_ENV_VAR: isa}
            proc = subprocess.run([sys.executable, script, *argv, "--results-json", str(out)], env=env, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"{script} with {CPU_ISA_ENV_VAR}={isa} failed (exit status {proc.returncode})")
            results.append(json.loads(out.read_text()))
    return results
