"""onnx_nf4.op.contract: the one Python statement of MatMulNF4's rules, checked against the C++ validator's source."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from onnx_nf4.op import contract
from onnx_nf4.op.contract import (
    Attributes,
    ContractError,
    Input,
    InputTypeError,
    TensorInfo,
    check_bnb4_inputs,
    check_inputs,
)

SRC = Path(__file__).resolve().parents[1] / "custom_ops" / "src"


def _cpp_constant(text: str, name: str) -> int:
    match = re.search(rf"\b{name}\s*=\s*(int64_t\{{1\}}\s*<<\s*(\d+)|(\d+))", text)
    assert match, name
    return 1 << int(match.group(2)) if match.group(2) else int(match.group(3))


def test_input_positions_mirror_the_cpp_enum():
    header = (SRC / "matmul_nf4_args.h").read_text()
    cpp = dict(re.findall(r"\bkInput(\w+)\s*=\s*(\d+)", header))
    python = {member.name.replace("_", "").lower(): int(member) for member in Input}
    assert {name.lower(): int(value) for name, value in cpp.items()} == python
    assert _cpp_constant(header, "kNumInputs") == len(Input)


def test_limits_mirror_the_cpp_validator():
    source = (SRC / "matmul_nf4_args.cc").read_text()
    assert _cpp_constant(source, "kMaxDim") == contract.MAX_DIM
    assert _cpp_constant(source, "kNestedCodeSize") == contract.NESTED_CODE_SIZE
    low, high = re.search(r"accuracy_level < (\d+) \|\| a\.accuracy_level > (\d+)", source).groups()
    assert range(int(low), int(high) + 1) == contract.ACCURACY_LEVEL_RANGE


def _valid(K=100, N=8, bs=64, *, dq=False, bias=True, a_shape=(3, 100)):
    k_blocks = -(-K // bs)
    infos = [TensorInfo("float16", a_shape), TensorInfo("uint8", (N, k_blocks, bs // 2))]
    infos.append(TensorInfo("uint8" if dq else "float32", (N, k_blocks)))
    nested = [TensorInfo("float32", (1,)), TensorInfo("float32", (256,)), TensorInfo("float32", ())]
    infos += nested if dq else [None, None, None]
    infos.append(TensorInfo("float16", (N,)) if bias else None)
    return infos


@pytest.mark.parametrize("dq", [False, True])
def test_valid_inputs_give_the_derived_shapes(dq):
    attrs = Attributes.create(100, 8, 64, node="mm")
    shapes = check_inputs(attrs, _valid(dq=dq, a_shape=(2, 5, 100)))
    assert (shapes.M, shapes.y_shape, shapes.double_quant, shapes.has_bias) == (10, (2, 5, 8), dq, True)
    assert check_inputs(attrs, _valid(a_shape=(0, 100), bias=False)).M == 0
    assert attrs.k_blocks == 2 and attrs.nested_blocks == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"K": 0}, "K and N must be >= 1 and <= 2^31, got K=0, N=8"),
        ({"N": (1 << 31) + 1}, "K and N must be >= 1 and <= 2^31"),
        ({"block_size": 48}, "block_size must be a power of two in [16, 4096], got 48"),
        ({"nested_block_size": 24}, "nested_block_size must be a power of two >= 16, got 24"),
        ({"accuracy_level": 5}, "accuracy_level must be in [0, 4], got 5"),
    ],
)
def test_invalid_attributes_name_the_node(kwargs, message):
    args = {"K": 100, "N": 8, "block_size": 64} | kwargs
    with pytest.raises(ContractError) as info:
        Attributes.create(**args, node="mm")
    assert str(info.value).startswith(f"MatMulNF4 node 'mm': {message}")
    assert str(info.value) == f"MatMulNF4 node 'mm': {info.value.detail}"


@pytest.mark.parametrize(
    ("position", "info", "error", "message"),
    [
        (Input.A, TensorInfo("float64", (3, 100)), InputTypeError, "input 'A' has dtype float64, expected float32"),
        (Input.A, TensorInfo("float16", ()), ContractError, "input 'A' must have rank >= 1, got a scalar"),
        (Input.A, TensorInfo("float16", (3, 99)), ContractError, "the last dimension of 'A' is 99, but K=100"),
        (Input.B, TensorInfo("int8", (8, 2, 32)), InputTypeError, "input 'B' has dtype int8, expected uint8"),
        (Input.B, TensorInfo("uint8", (8, 64)), ContractError, "input 'B' has shape [8, 64], expected [8, 2, 32]"),
        (Input.ABSMAX, TensorInfo("float16", (8, 2)), InputTypeError, "expected float32 or uint8"),
        (Input.NESTED_CODE, TensorInfo("float32", (256,)), ContractError, "nested inputs must be omitted"),
        (Input.BIAS, TensorInfo("float32", (8,)), InputTypeError, "input 'bias' has dtype float32, expected float16"),
        (Input.BIAS, TensorInfo("float16", (7,)), ContractError, "input 'bias' has shape [7], expected [8]"),
    ],
)
def test_invalid_inputs_have_one_message_style(position, info, error, message):
    inputs = _valid()
    inputs[position] = info
    with pytest.raises(error) as raised:
        check_inputs(Attributes.create(100, 8, 64, node="mm"), inputs)
    assert str(raised.value).startswith(f"MatMulNF4 node 'mm': {raised.value.detail}")
    assert message in str(raised.value)
    assert isinstance(raised.value, ValueError)  # a wrong dtype is a TypeError and a ValueError


def test_double_quant_inputs_are_all_or_none():
    inputs = _valid(dq=True)
    inputs[Input.ABSMAX_OFFSET] = None
    with pytest.raises(ContractError, match=r"absmax is uint8 .* but absmax_offset missing"):
        check_inputs(Attributes.create(100, 8, 64), inputs)
    inputs = _valid(dq=True)
    inputs[Input.ABSMAX_OFFSET] = TensorInfo("float32", (2,))
    with pytest.raises(ContractError, match=re.escape("'absmax_offset' has shape [2], expected [] or [1]")):
        check_inputs(Attributes.create(100, 8, 64), inputs)


def test_bnb4_inputs():
    check_bnb4_inputs(100, 8, 64, TensorInfo("uint8", (400,)), TensorInfo("float16", (13,)))
    with pytest.raises(ContractError, match=r"^MatMulBnb4 node 'x': input 'absmax' has shape \[12\], expected \[13\]"):
        check_bnb4_inputs(100, 8, 64, TensorInfo("uint8", (400,)), TensorInfo("float32", (12,)), node="x")


def test_op_names_are_defined_once():
    """Only the contract spells ``"MatMulBnb4"`` and the default domain's ``"ai.onnx"``."""
    package = Path(contract.__file__).parent
    offenders = [
        f"{path.relative_to(package)}: {line.strip()}"
        for path in package.rglob("*.py")
        if path.name != "contract.py"
        for line in path.read_text().splitlines()
        if '"MatMulBnb4"' in line or '"ai.onnx"' in line
    ]
    assert not offenders, "\n".join(offenders)
