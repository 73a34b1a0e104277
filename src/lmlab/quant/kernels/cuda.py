"""The CUDA kernels of lmlab's quantization ops (registered as ``"cuda"`` in :mod:`lmlab.quant.ops`).

They are Triton kernels (``pip install 'lmlab[gpu]'``, triton >= 3.8):
:mod:`lmlab.quant.kernels.triton_4bit` (NF4 / FP4 / int4 quantize, dequantize and the fused 4-bit
matmul, double-quantized scales decoded inside the kernels) and
:mod:`lmlab.quant.kernels.triton_int8` (LLM.int8(): fused row-wise quantization with outlier
columns, the int8 GEMM with its scale epilogue). Each function here has its op's signature and
imports its Triton module on first call, so importing lmlab never imports triton or touches a
device. Without triton every op still runs on CUDA: through its plain PyTorch reference (and
``torch._int_mm`` for the int8 product), and ``impl="fast"`` says that no kernel is there
(:func:`kernel_available`).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Sequence
from types import ModuleType

import torch

from lmlab.quant import blockwise
from lmlab.quant.formats import NESTED_BLOCK_SIZE
from lmlab.quant.int8 import int8_linear_reference, int_mm_reference


@functools.cache
def _module(name: str) -> ModuleType | None:
    """``lmlab.quant.kernels.<name>`` once imported, or None where triton is not installed."""
    try:
        return importlib.import_module(f"lmlab.quant.kernels.{name}")
    except ImportError:
        return None


def triton_4bit() -> ModuleType | None:
    return _module("triton_4bit")


def triton_int8() -> ModuleType | None:
    return _module("triton_int8")


def kernel_available(op: str) -> bool:
    """Whether ``lmlab::<op>`` has a device kernel on CUDA here (not only its reference)."""
    if op == "int8_mm":
        return True  # torch._int_mm at least
    return (triton_int8() if op.startswith("int8") else triton_4bit()) is not None


def _nested(offset, nested_absmax, nested_code, nested_block_size) -> dict:
    """The double-quantization arguments, by name (the Triton launchers take them as keywords)."""
    return {
        "offset": offset,
        "nested_absmax": nested_absmax,
        "nested_code": nested_code,
        "nested_block_size": nested_block_size,
    }


def quantize_4bit(w: torch.Tensor, quant_type: str, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    k = triton_4bit()
    if k is None:
        return blockwise.quantize_4bit_reference(w, quant_type, block_size)
    return k.quantize_4bit(w, quant_type, block_size)


def quantize_blockwise_8bit(
    x: torch.Tensor, code: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    k = triton_4bit()
    if k is None:
        return blockwise.quantize_blockwise_8bit(x, code, block_size)
    return k.quantize_blockwise_8bit(x, code, block_size)


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_type: str,
    block_size: int,
    shape: Sequence[int],
    dtype: torch.dtype,
    offset: torch.Tensor | None = None,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    nested_block_size: int = NESTED_BLOCK_SIZE,
) -> torch.Tensor:
    nested = _nested(offset, nested_absmax, nested_code, nested_block_size)
    k = triton_4bit()
    if k is None:
        return blockwise.dequantize_4bit_stored(
            packed, absmax, quant_type, block_size, shape, dtype, **nested
        )
    return k.dequantize_4bit(packed, absmax, quant_type, block_size, shape, dtype, **nested)


def dequantize_4bit_out(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_type: str,
    block_size: int,
    out: torch.Tensor,
    offset: torch.Tensor | None = None,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    nested_block_size: int = NESTED_BLOCK_SIZE,
) -> None:
    nested = _nested(offset, nested_absmax, nested_code, nested_block_size)
    k = triton_4bit()
    if k is None:
        out.copy_(
            blockwise.dequantize_4bit_stored(
                packed, absmax, quant_type, block_size, out.shape, out.dtype, **nested
            )
        )
    else:
        k.dequantize_4bit(packed, absmax, quant_type, block_size, out.shape, out.dtype, **nested, out=out)


def linear_4bit(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_type: str,
    block_size: int,
    shape: Sequence[int],
    bias: torch.Tensor | None,
    offset: torch.Tensor | None = None,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    nested_block_size: int = NESTED_BLOCK_SIZE,
) -> torch.Tensor:
    nested = _nested(offset, nested_absmax, nested_code, nested_block_size)
    k = triton_4bit()
    if k is None:
        w = blockwise.dequantize_4bit_stored(packed, absmax, quant_type, block_size, shape, x.dtype, **nested)
        return torch.nn.functional.linear(x, w, bias)
    return k.linear_4bit(x, packed, absmax, quant_type, block_size, shape, bias, **nested)


def int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a (M, K) int8 @ b (N, K).T -> (M, N) int32``, exact."""
    k = triton_int8()
    if k is not None:
        return k.int8_mm(a, b)
    try:
        return torch._int_mm(a, b.t())
    except RuntimeError:  # the kernel's shape constraints (M > 16, K and N multiples of 8)
        return int_mm_reference(a, b)


def int8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, threshold: float) -> torch.Tensor:
    k = triton_int8()
    if k is None:
        return int8_linear_reference(x, w_q, w_scale, threshold, int_mm=int8_mm)
    return k.int8_linear(x, w_q, w_scale, threshold)
