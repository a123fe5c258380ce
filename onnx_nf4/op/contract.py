"""The ``onnx_nf4::MatMulNF4`` v1 contract in one place: names, input positions, attributes, input shapes.

The Python mirror of ``custom_ops/src/matmul_nf4_args.cc`` (``ReadMatMulNF4Attrs`` / ``ValidateMatMulNF4Inputs``),
used by the numpy reference (:mod:`onnx_nf4.op.reference`), the CuPy path, shape inference (:mod:`onnx_nf4.op.schema`),
the passes and :func:`onnx_nf4.dequantize_model`. ``docs/MatMulNF4.md`` is the normative text.

* :class:`Input`: the input positions (``kInputA`` ... ``kInputBias`` in C++).
* :class:`Attributes`: ``K``, ``N``, ``block_size``, ``nested_block_size``, ``accuracy_level``, validated on
  construction (:meth:`Attributes.create`).
* :func:`check_inputs`: the dtypes and shapes of the inputs (:class:`TensorInfo`, ``None`` for an omitted one)
  -> :class:`Shapes` (``M``, ``Y``'s shape, double quantization, bias).
* :func:`check_bnb4_inputs`: the same for onnxruntime's ``com.microsoft::MatMulBnb4`` (codes and absmax).

Every failure is a :class:`ContractError` (a ``ValueError``; :class:`InputTypeError` for a wrong dtype is also a
``TypeError``) whose message reads ``MatMulNF4: <what>`` or, for a node, ``MatMulNF4 node '<name>': <what>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

from ..codec.validation import is_valid_block_size, is_valid_nested_block_size

__all__ = [
    "ACCURACY_LEVEL_RANGE",
    "BNB4_OP_TYPE",
    "DOMAIN",
    "MAX_DIM",
    "MS_DOMAIN",
    "NESTED_CODE_SIZE",
    "ONNX_DOMAINS",
    "OPSET_VERSION",
    "OP_TYPE",
    "Attributes",
    "ContractError",
    "Input",
    "InputTypeError",
    "Shapes",
    "TensorInfo",
    "check_bnb4_inputs",
    "check_inputs",
    "check_weight_inputs",
    "expected_shapes",
    "is_bnb4",
    "is_matmul_nf4",
]

DOMAIN = "onnx_nf4"
OP_TYPE = "MatMulNF4"
OPSET_VERSION = 1
#: onnxruntime's contrib domain and its NF4/FP4 op.
MS_DOMAIN = "com.microsoft"
BNB4_OP_TYPE = "MatMulBnb4"
#: The names of the default ONNX domain.
ONNX_DOMAINS = ("", "ai.onnx")

#: Bound of ``K`` and ``N`` (``kMaxDim``): every derived size stays far from overflowing int64.
MAX_DIM = 1 << 31
NESTED_CODE_SIZE = 256
DEFAULT_NESTED_BLOCK_SIZE = 256
#: ``accuracy_level`` values the op accepts, as onnxruntime's ``MatMulNBits``: 0 computes in float32; 4 lets a
#: kernel use int8 activations; 1..3 mean 0.
ACCURACY_LEVEL_RANGE = range(0, 5)

#: The dtypes of ``A``, ``bias`` and ``Y`` (T).
FLOAT_TYPES = ("float32", "float16", "bfloat16")


class Input(IntEnum):
    """Input positions of ``MatMulNF4`` (``A`` is the activation; 3..5 are the double-quantization statistics)."""

    A = 0
    B = 1
    ABSMAX = 2
    NESTED_ABSMAX = 3
    NESTED_CODE = 4
    ABSMAX_OFFSET = 5
    BIAS = 6

    @property
    def label(self) -> str:
        """The name of the input in the spec (``'A'``, ``'absmax'``, ...)."""
        return "A" if self is Input.A else "B" if self is Input.B else self.name.lower()


#: The inputs that store the weight (the bias is not weight storage).
WEIGHT_INPUTS = (Input.B, Input.ABSMAX, Input.NESTED_ABSMAX, Input.NESTED_CODE, Input.ABSMAX_OFFSET)
NESTED_INPUTS = (Input.NESTED_ABSMAX, Input.NESTED_CODE, Input.ABSMAX_OFFSET)
#: ``MatMulBnb4``'s weight inputs: the flat codes and absmax.
BNB4_WEIGHT_INPUTS = (Input.B, Input.ABSMAX)


class ContractError(ValueError):
    """An attribute or input that breaks the ``MatMulNF4`` contract.

    ``str(err)`` is the whole message; :attr:`detail` is the part after the ``MatMulNF4 ...: `` prefix.
    """

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = message if detail is None else detail


class InputTypeError(ContractError, TypeError):
    """An input of a dtype the contract does not allow."""


def _prefix(node: str | None, op_type: str = OP_TYPE) -> str:
    return f"{op_type}: " if node is None else f"{op_type} node {node!r}: "


def is_matmul_nf4(domain: str, op_type: str) -> bool:
    """Whether a node is ``onnx_nf4::MatMulNF4``."""
    return domain == DOMAIN and op_type == OP_TYPE


def is_bnb4(domain: str, op_type: str) -> bool:
    """Whether a node is onnxruntime's ``com.microsoft::MatMulBnb4``."""
    return domain == MS_DOMAIN and op_type == BNB4_OP_TYPE


@dataclass(frozen=True)
class Attributes:
    """The attributes of one ``MatMulNF4`` node, valid (build with :meth:`create`).

    Attributes:
        K: reduction size (last dimension of ``A``, rows of ``W``), in [1, 2^31].
        N: output features (columns of ``W``), in [1, 2^31].
        block_size: weights per absmax block along K, a power of two in [16, 4096].
        nested_block_size: absmax entries per nested block (double quantization), a power of two >= 16.
        accuracy_level: 0 (float32 compute) ... 4 (int8 activations allowed).
        node: the node's name for messages, or ``None``.
        op_type: the op named in messages (``MatMulBnb4`` shares the K / N / block_size rules).
    """

    K: int
    N: int
    block_size: int
    nested_block_size: int = DEFAULT_NESTED_BLOCK_SIZE
    accuracy_level: int = 0
    node: str | None = None
    op_type: str = OP_TYPE

    @classmethod
    def create(
        cls,
        K: int,
        N: int,
        block_size: int,
        nested_block_size: int | None = None,
        accuracy_level: int | None = None,
        *,
        node: str | None = None,
        op_type: str = OP_TYPE,
    ) -> Attributes:
        """Validate and bundle the attributes (``None`` = the default), as ``ReadMatMulNF4Attrs`` does."""
        nbs = DEFAULT_NESTED_BLOCK_SIZE if nested_block_size is None else int(nested_block_size)
        level = 0 if accuracy_level is None else int(accuracy_level)
        attrs = cls(int(K), int(N), int(block_size), nbs, level, node, op_type)
        attrs._validate()
        return attrs

    def fail(self, message: str, error: type[ContractError] = ContractError) -> ContractError:
        """The error to raise for ``message`` about this node."""
        return error(_prefix(self.node, self.op_type) + message, message)

    def _validate(self) -> None:
        if not (1 <= self.K <= MAX_DIM and 1 <= self.N <= MAX_DIM):
            raise self.fail(f"K and N must be >= 1 and <= 2^31, got K={self.K}, N={self.N}")
        if not is_valid_block_size(self.block_size):
            raise self.fail(f"block_size must be a power of two in [16, 4096], got {self.block_size}")
        if not is_valid_nested_block_size(self.nested_block_size):
            raise self.fail(f"nested_block_size must be a power of two >= 16, got {self.nested_block_size}")
        if self.accuracy_level not in ACCURACY_LEVEL_RANGE:
            raise self.fail(f"accuracy_level must be in [0, 4], got {self.accuracy_level}")

    @property
    def k_blocks(self) -> int:
        """Blocks per column of ``W``: ``ceil(K / block_size)``."""
        return -(-self.K // self.block_size)

    @property
    def nested_blocks(self) -> int:
        """Entries of ``nested_absmax``: ``ceil(N * k_blocks / nested_block_size)``."""
        return -(-self.N * self.k_blocks // self.nested_block_size)


def expected_shapes(attrs: Attributes) -> dict[Input, tuple[int, ...]]:
    """The exact shapes of ``B``, ``absmax``, ``nested_absmax``, ``nested_code`` and ``bias``
    (``absmax_offset`` is ``[]`` or ``[1]``)."""
    return {
        Input.B: (attrs.N, attrs.k_blocks, attrs.block_size // 2),
        Input.ABSMAX: (attrs.N, attrs.k_blocks),
        Input.NESTED_ABSMAX: (attrs.nested_blocks,),
        Input.NESTED_CODE: (NESTED_CODE_SIZE,),
        Input.BIAS: (attrs.N,),
    }


def shape_mismatch(name: str, shape: Sequence[int | None], expected: Sequence[int]) -> str:
    """``input 'B' has shape [8, 64], expected [8, 2, 32]``."""
    return f"input {name!r} has shape {list(shape)}, expected {list(expected)}"


def a_mismatch(last: int, K: int) -> str:
    """The message for an ``A`` whose last dimension is not ``K``."""
    return f"the last dimension of 'A' is {last}, but K={K}"


@dataclass(frozen=True)
class TensorInfo:
    """The dtype name (numpy's: ``"float32"``, ``"bfloat16"``, ``"uint8"``, ...) and shape of one input."""

    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Shapes:
    """What :func:`check_inputs` derives (``MatMulNF4Shapes`` in C++).

    Attributes:
        M: rows of ``A`` (the product of its leading dimensions; 0 is valid).
        y_shape: ``A.shape[:-1] + (N,)``.
        double_quant: whether ``absmax`` is uint8 with the nested statistics.
        has_bias: whether ``bias`` is given.
    """

    M: int
    y_shape: tuple[int, ...]
    double_quant: bool
    has_bias: bool


def _dtype(attrs: Attributes, name: str, info: TensorInfo, allowed: Sequence[str]) -> None:
    if info.dtype not in allowed:
        expected = " or ".join(allowed)
        raise attrs.fail(f"input {name!r} has dtype {info.dtype}, expected {expected}", InputTypeError)


def _shape(attrs: Attributes, name: str, info: TensorInfo, expected: Sequence[int]) -> None:
    if tuple(info.shape) != tuple(expected):
        raise attrs.fail(shape_mismatch(name, info.shape, expected))


def check_inputs(attrs: Attributes, inputs: Sequence[TensorInfo | None]) -> Shapes:
    """Check the inputs (by :class:`Input` position, ``None`` or absent for an omitted one) against ``attrs``.

    The order of the checks and the rules are those of ``ValidateMatMulNF4Inputs``: ``A`` (float type, rank >= 1,
    last dimension ``K``), ``B``, ``absmax`` (float32, or uint8 with all three nested inputs, else none of them),
    then ``bias`` (``A``'s dtype, ``[N]``).

    Raises:
        InputTypeError: an input of a dtype the op does not take.
        ContractError: a missing input or a wrong shape.
    """
    given = list(inputs) + [None] * (len(Input) - len(inputs))
    a = given[Input.A]
    if a is None:
        raise attrs.fail("input 'A' is missing")
    _dtype(attrs, "A", a, FLOAT_TYPES)
    if not a.shape:
        raise attrs.fail("input 'A' must have rank >= 1, got a scalar")
    if a.shape[-1] != attrs.K:
        raise attrs.fail(f"{a_mismatch(a.shape[-1], attrs.K)} (A shape {list(a.shape)})")
    double_quant = check_weight_inputs(attrs, given)
    bias = given[Input.BIAS]
    if bias is not None:
        _dtype(attrs, "bias", bias, (a.dtype,))
        _shape(attrs, "bias", bias, (attrs.N,))
    M = 1
    for d in a.shape[:-1]:
        M *= int(d)
    return Shapes(M, (*a.shape[:-1], attrs.N), double_quant, bias is not None)


def check_weight_inputs(attrs: Attributes, inputs: Sequence[TensorInfo | None]) -> bool:
    """Check the inputs that store the weight (``B``, ``absmax`` and the nested statistics, by :class:`Input`
    position; ``A`` and ``bias`` are not looked at). Returns whether the weight is double-quantized."""
    given = list(inputs) + [None] * (len(Input) - len(inputs))
    b, absmax = given[Input.B], given[Input.ABSMAX]
    for position, info in ((Input.B, b), (Input.ABSMAX, absmax)):
        if info is None:
            raise attrs.fail(f"input {position.label!r} is missing")
    assert b is not None and absmax is not None
    expected = expected_shapes(attrs)
    _dtype(attrs, "B", b, ("uint8",))
    _shape(attrs, "B", b, expected[Input.B])
    _dtype(attrs, "absmax", absmax, ("float32", "uint8"))
    _shape(attrs, "absmax", absmax, expected[Input.ABSMAX])
    nested = [(position, given[position]) for position in NESTED_INPUTS]
    double_quant = absmax.dtype == "uint8"
    if double_quant:
        missing = [position.label for position, info in nested if info is None]
        if missing:
            raise attrs.fail(f"absmax is uint8 (double quantization) but {', '.join(missing)} missing")
        for position, info in nested:
            assert info is not None
            _dtype(attrs, position.label, info, ("float32",))
            if position is Input.ABSMAX_OFFSET:
                if tuple(info.shape) not in ((), (1,)):
                    raise attrs.fail(f"input 'absmax_offset' has shape {list(info.shape)}, expected [] or [1]")
            else:
                _shape(attrs, position.label, info, expected[position])
    else:
        present = [position.label for position, info in nested if info is not None]
        if present:
            raise attrs.fail(f"absmax is float32, so the nested inputs must be omitted (got {', '.join(present)})")
    return double_quant


def check_bnb4_inputs(K: int, N: int, block_size: int, packed: TensorInfo, absmax: TensorInfo, *,
                      node: str | None = None) -> None:  # fmt: skip
    """Check a ``MatMulBnb4`` node: its attributes, its codes ``B`` (uint8 ``[ceil(N * K / 2)]``) and ``absmax``
    (float32 or float16, the activation type, ``[ceil(N * K / block_size)]``).

    Its blocks run over ``W.T`` flattened (across column boundaries when ``K % block_size != 0``).
    """
    attrs = Attributes.create(K, N, block_size, node=node, op_type=BNB4_OP_TYPE)
    _dtype(attrs, "B", packed, ("uint8",))
    _shape(attrs, "B", packed, (-(-N * K // 2),))
    _dtype(attrs, "absmax", absmax, ("float32", "float16"))
    _shape(attrs, "absmax", absmax, (-(-N * K // attrs.block_size),))
