"""The generated C header ``nf4_codebook.h`` is up to date and holds exactly the Python tables."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from onnx_nf4.codec import codebook

REPO_ROOT = Path(__file__).resolve().parents[1]
HEADER = REPO_ROOT / "custom_ops" / "include" / "onnx_nf4" / "nf4_codebook.h"
_HEXFLOAT = r"-?0x[0-9a-f]+(?:\.[0-9a-f]*)?p[+-]?\d+f"


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_codebook_header", REPO_ROOT / "tools" / "gen_codebook_header.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bits(values) -> list[int]:
    return np.asarray(values, dtype=np.float32).view(np.uint32).tolist()


def _macro_body(text: str, name: str) -> str:
    """The replacement text of ``#define name``, continuation lines joined and comments removed."""
    match = re.search(rf"^#define {name}\b(.*?)(?<!\\)$", text, flags=re.M | re.S)
    assert match, f"macro {name} missing"
    body = match.group(1).replace("\\\n", " ")
    return re.sub(r"/\*.*?\*/", " ", body, flags=re.S)


def _parse_list(text: str, name: str) -> list[float]:
    items = [item.strip() for item in _macro_body(text, name).split(",")]
    assert all(re.fullmatch(_HEXFLOAT, item) for item in items), items
    return [float.fromhex(item[:-1]) for item in items]


def test_committed_header_is_current():
    assert HEADER.read_text() == _load_generator().render_header(), (
        "nf4_codebook.h is stale: run python tools/gen_codebook_header.py"
    )


def test_header_says_generated():
    assert "DO NOT EDIT" in HEADER.read_text()


@pytest.mark.parametrize(
    ("macro", "table"),
    [
        ("ONNX_NF4_CODEBOOK_VALUES", codebook.NF4_CODE),
        ("ONNX_NF4_THRESHOLD_VALUES", codebook.NF4_THRESHOLDS),
        ("ONNX_NF4_BNB_MIDPOINT_VALUES", codebook.NF4_MIDPOINTS_BNB),
    ],
)
def test_list_macro_bit_equal(macro, table):
    parsed = _parse_list(HEADER.read_text(), macro)
    # every literal must be exactly a float32 value (no rounding happens when the compiler reads it)
    assert [float(np.float32(v)) for v in parsed] == parsed
    assert _bits(parsed) == _bits(table)


@pytest.mark.parametrize(
    ("prefix", "table"), [("ONNX_NF4_CODE", codebook.NF4_CODE), ("ONNX_NF4_THRESHOLD", codebook.NF4_THRESHOLDS)]
)
def test_scalar_macros_bit_equal(prefix, table):
    text = HEADER.read_text()
    found = dict(re.findall(rf"^#define {prefix}_(\d+) \(({_HEXFLOAT})\)$", text, flags=re.M))
    assert sorted(int(i) for i in found) == list(range(table.size))
    assert _bits([float.fromhex(found[str(i)][:-1]) for i in range(table.size)]) == _bits(table)


def test_count_macros():
    text = HEADER.read_text()
    assert re.search(rf"^#define ONNX_NF4_NUM_CODES {codebook.NF4_CODE.size}$", text, flags=re.M)
    assert re.search(rf"^#define ONNX_NF4_NUM_THRESHOLDS {codebook.NF4_THRESHOLDS.size}$", text, flags=re.M)
    assert re.search(rf"^#define ONNX_NF4_ZERO_CODE {codebook.NF4_ZERO_CODE}$", text, flags=re.M)


def test_int8_table():
    """The int8 table of accuracy_level 4: round(NF4 * 127) in codebook.py, copied exactly into the header."""
    assert codebook.NF4_I8_LEVELS == 127 and codebook.NF4_CODE_I8.dtype == np.int8
    scaled = codebook.NF4_CODE.astype(np.float64) * codebook.NF4_I8_LEVELS
    assert np.all(np.abs(scaled - np.round(scaled)) < 0.49)  # no tie: rounding is unambiguous
    np.testing.assert_array_equal(codebook.NF4_CODE_I8, np.round(scaled).astype(np.int8))
    text = HEADER.read_text()
    assert re.search(rf"^#define ONNX_NF4_I8_LEVELS {codebook.NF4_I8_LEVELS}$", text, flags=re.M)
    items = [int(v) for v in _macro_body(text, "ONNX_NF4_CODEBOOK_I8_VALUES").split(",")]
    assert items == codebook.NF4_CODE_I8.tolist()


def test_float_literal_roundtrip():
    gen = _load_generator()
    for v in np.array([0.0, -0.0, 1.0, 2.0**-149, 3.4028235e38, -0.1], dtype=np.float32):
        lit = gen.float_literal(v)
        assert re.fullmatch(_HEXFLOAT, lit), lit
        assert _bits([float.fromhex(lit[:-1])]) == _bits([v])


_PROGRAM = r"""
#include <stdio.h>
#include <string.h>
#include "onnx_nf4/nf4_codebook.h"
static const float kCode[ONNX_NF4_NUM_CODES] = {ONNX_NF4_CODEBOOK_VALUES};
static const float kThr[ONNX_NF4_NUM_THRESHOLDS] = {ONNX_NF4_THRESHOLD_VALUES};
static const float kMid[ONNX_NF4_NUM_THRESHOLDS] = {ONNX_NF4_BNB_MIDPOINT_VALUES};
static const signed char kI8[ONNX_NF4_NUM_CODES] = {ONNX_NF4_CODEBOOK_I8_VALUES};
static void dump(const float* v, int n) {
  for (int i = 0; i < n; ++i) { unsigned u; memcpy(&u, &v[i], 4); printf("%u ", u); }
  printf("\n");
}
int main(void) {
  const float scalar[2] = {ONNX_NF4_CODE_13, ONNX_NF4_THRESHOLD_8};
  dump(kCode, ONNX_NF4_NUM_CODES); dump(kThr, ONNX_NF4_NUM_THRESHOLDS); dump(kMid, ONNX_NF4_NUM_THRESHOLDS);
  dump(scalar, 2);
  for (int i = 0; i < ONNX_NF4_NUM_CODES; ++i) printf("%d ", kI8[i] * (ONNX_NF4_I8_LEVELS / 127));
  printf("\n");
  return 0;
}
"""


@pytest.mark.parametrize(
    ("compiler", "flags"), [("gcc", ["-x", "c", "-std=c99"]), ("g++", ["-x", "c++", "-std=c++17"])]
)
def test_header_compiles_to_same_bits(compiler, flags, tmp_path):
    exe = shutil.which(compiler)
    if exe is None:
        pytest.skip(f"{compiler} not installed")
    src = tmp_path / "prog.c"
    src.write_text(_PROGRAM)
    binary = tmp_path / "prog"
    cmd = [
        exe,
        *flags,
        "-Wall",
        "-Wextra",
        "-pedantic",
        "-Werror",
        f"-I{HEADER.parents[1]}",
        str(src),
        "-o",
        str(binary),
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    lines = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout.splitlines()
    got = [[int(tok) for tok in line.split()] for line in lines]
    assert got == [
        _bits(codebook.NF4_CODE),
        _bits(codebook.NF4_THRESHOLDS),
        _bits(codebook.NF4_MIDPOINTS_BNB),
        _bits([codebook.NF4_CODE[13], codebook.NF4_THRESHOLDS[8]]),
        codebook.NF4_CODE_I8.tolist(),
    ]
