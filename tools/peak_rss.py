"""Peak resident memory of an ``onnx-nf4`` command, as the kernel counts it.

:func:`cli_command` is the argument list that runs ``python -m onnx_nf4 ARGS`` in a fresh interpreter which,
when the command ends, writes its own ``VmHWM`` (the high-water mark of its resident set: anonymous memory *and*
resident pages of memory-mapped files) as a last stderr line; :func:`split_peak` takes it back off. Unlike
``ru_maxrss`` of a child, this does not count the process it was forked from. Linux only (``/proc/self/status``).
"""

from __future__ import annotations

import sys

__all__ = ["cli_command", "split_peak"]

_MARK = "\nVmHWM_kB "

_WRAPPER = f"""
import runpy, sys
sys.argv[0] = "onnx-nf4"
try:
    runpy.run_module("onnx_nf4", run_name="__main__")
finally:
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    sys.stderr.write({_MARK!r} + hwm.split()[1] + "\\n")
"""


def cli_command(*args: str) -> list[str]:
    """The command line running ``onnx-nf4 ARGS`` and then reporting its peak RSS on stderr."""
    return [sys.executable, "-c", _WRAPPER, *args]


def split_peak(stderr: str) -> tuple[str, int]:
    """``(the command's own stderr, its peak RSS in bytes)`` from the stderr of :func:`cli_command`.

    Raises ``ValueError`` when the report is missing (the interpreter was killed before it could write it).
    """
    text, mark, kilobytes = stderr.rstrip().rpartition(_MARK)
    if not mark:
        raise ValueError(f"no peak RSS report in the command's stderr: {stderr[-3000:]}")
    return text, int(kilobytes) * 1024
