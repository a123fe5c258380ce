"""Reading ``bitsandbytes.nn.Linear4bit`` layers of a live PyTorch model (never modifying them).

:func:`find_linear4bit` lists a model's 4-bit layers, :func:`bnb_weight` reads one layer's quantized tensors into a
:class:`~onnx_nf4.torch.bnb_layout.BnbWeight` (numpy, bytes as bitsandbytes holds them).

bitsandbytes' own CPU inference path rewrites a layer the first time it runs under ``torch.no_grad()`` on a CPU
with AVX512-BF16: the codes are permuted into a kernel-specific order and the statistics are replaced by
``bfloat16`` scales (double quantization decoded). :func:`bnb_weight` undoes the permutation exactly (the codes are
unchanged) and reads those ``bfloat16`` scales as float32 (exact), i.e. it returns what the layer now computes
with. bitsandbytes' original float32/uint8 statistics no longer exist in that case, so the absmax is then not
bitsandbytes' original bytes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..codec.blockwise import pack_nibbles
from ..codec.double_quant import NestedAbsmax
from .bnb_layout import BnbFormatError, BnbWeight

if TYPE_CHECKING:
    import torch

__all__ = ["bnb_weight", "find_embedding4bit", "find_linear4bit", "tensor_to_numpy"]

_CPU_BLOCK_N = 32  # the row-block of bitsandbytes' CPU packing (``_convert_weight_packed_for_cpu``)


def tensor_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A numpy copy of ``tensor`` (on CPU); bfloat16 becomes float32 (exact)."""
    import torch

    tensor = tensor.detach().to("cpu")
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.contiguous().numpy().copy()


def find_linear4bit(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The ``bitsandbytes.nn.Linear4bit`` submodules of ``model`` by module path (empty without bitsandbytes)."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return {}
    return {name: module for name, module in model.named_modules() if isinstance(module, Linear4bit)}


def find_embedding4bit(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The ``bitsandbytes.nn.Embedding4bit`` submodules (``EmbeddingNF4`` among them) of ``model`` by module path.

    Their ``Params4bit`` table ``[V, H]`` is read by :func:`bnb_weight` like a ``Linear4bit`` weight ``[N, K]``
    (``N = V``, ``K = H``): bitsandbytes blocks it along H within each row, the lookup's layout. bitsandbytes cannot
    ``state_dict()`` these modules, so the module itself is read.
    """
    try:
        from bitsandbytes.nn import Embedding4bit
    except ImportError:
        return {}
    return {name: module for name, module in model.named_modules() if isinstance(module, Embedding4bit)}


def _codes_from_cpu_packing(data: np.ndarray, N: int, K: int) -> np.ndarray:
    """Inverse of bitsandbytes' CPU packing: ``[N, K/2]`` kernel order -> row-major packed codes (``N*K/2`` bytes).

    The CPU format stores, for each group of 32 rows and each pair of columns, 64 codes in 32 bytes whose low
    nibbles hold the first 32 and high nibbles the last 32 of the ``[32 rows, 2 columns]`` tile in C order.
    """
    flat = data.reshape(-1, _CPU_BLOCK_N)
    tiles = np.concatenate([flat & 0xF, flat >> 4], axis=1)  # [..., 64]
    codes = tiles.reshape(N // _CPU_BLOCK_N, K // 2, _CPU_BLOCK_N, 2).transpose(0, 2, 1, 3).reshape(-1)
    return pack_nibbles(codes)


def bnb_weight(name: str, module: torch.nn.Module) -> BnbWeight:
    """The quantized tensors of the ``Linear4bit`` ``module`` (named ``name`` in errors), copied to numpy.

    Raises:
        BnbFormatError: the layer is not quantized yet (move it to a device first, e.g. ``model.to("cpu")``),
            or its state is not one bitsandbytes writes.
    """
    import torch

    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is None or not getattr(weight, "bnb_quantized", True):
        raise BnbFormatError(
            f"layer {name!r}: the Linear4bit weight is not quantized yet (bitsandbytes quantizes it when the "
            "module is moved to a device, e.g. model.to('cpu'))"
        )
    data = tensor_to_numpy(weight.data.reshape(-1).view(torch.uint8))
    N, K = (int(d) for d in state.shape)
    quant_map = tensor_to_numpy(state.code).astype(np.float32) if state.code is not None else None
    if getattr(state, "packing_format_for_cpu", False):
        if state.quant_type != "nf4":
            raise BnbFormatError(f"layer {name!r}: bitsandbytes quant_type {state.quant_type!r} is not supported")
        packed = _codes_from_cpu_packing(data, N, K)
        absmax = np.ascontiguousarray(tensor_to_numpy(state.absmax).astype(np.float32).T).reshape(-1)
        return BnbWeight(name, state.quant_type, (N, K), int(state.blocksize), packed, absmax, quant_map)
    nested = None
    if state.nested:
        state2 = state.state2
        if state2.dtype is not None and str(state2.dtype) != "torch.float32":
            raise BnbFormatError(f"layer {name!r}: nested statistics of dtype {state2.dtype} are not supported")
        nested = NestedAbsmax(
            nested_absmax=tensor_to_numpy(state2.absmax),
            code=tensor_to_numpy(state2.code),
            offset=np.float32(tensor_to_numpy(state.offset).reshape(())),
            block_size=int(state2.blocksize),
        )
    absmax = tensor_to_numpy(state.absmax)
    return BnbWeight(name, str(state.quant_type), (N, K), int(state.blocksize), data, absmax, quant_map, nested)
