"""lmlab's quantization kernels as ``torch.library`` custom ops: one contract per kernel.

Each op is defined over plain tensors and scalars, with a fake (meta) implementation giving the
output shapes (so ``torch.compile`` traces a quantized model as one op per layer, not a Python
loop), the plain PyTorch reference as its default implementation (every device, CI), and device
kernels registered beside it:

==============================  ======================================  ===========================
op                              default (reference)                     device kernels
==============================  ======================================  ===========================
``lmlab::quantize_4bit``        :func:`blockwise.quantize_4bit_         cpu: compiled C, else
                                reference`                              chunked torch; cuda: Triton
``lmlab::quantize_blockwise_    :func:`blockwise.quantize_blockwise_    cuda: Triton
8bit`` (double quantization)    8bit`
``lmlab::dequantize_4bit``      :func:`blockwise.dequantize_4bit_       cpu (as above); cuda: Triton
                                reference`
``lmlab::dequantize_4bit_out``  the same, written into ``out``          cpu, cuda (the same)
``lmlab::linear_4bit``          ``x @ dequantize_4bit(W).T + b``, with  cpu: its dequantize_4bit
                                the input gradient (QLoRA trains        dispatches; cuda: Triton
                                through it)                             (fused GEMV / tiles)
``lmlab::int8_mm``              :func:`int8.int_mm_reference`           cpu: exact float32 GEMM
                                (float64)                               (or ``_int_mm``); cuda:
                                                                        Triton (``_int_mm``
                                                                        without triton)
``lmlab::int8_linear``          :func:`int8.int8_linear_reference`,     cpu: fused, float32 codes
                                with the input gradient                 (bit-identical); cuda:
                                                                        Triton
==============================  ======================================  ===========================

The decoding ops (``dequantize_4bit``, ``dequantize_4bit_out``, ``linear_4bit``) take the block scales
as stored: ``absmax`` (blocks,) float32, or for double quantization its uint8 codes with ``offset``,
``nested_absmax``, ``nested_code`` and ``nested_block_size``, which the Triton kernels decode inside
and the CPU kernels (which take plain scales) decode in torch first.

A CUDA kernel for an op is a function in :mod:`lmlab.quant.kernels.cuda` (it imports its Triton module
on first use, and falls back to the reference without triton) and one ``_register_kernel(op, "cuda",
fn)`` line below (which also makes ``impl="fast"`` apply there, where triton is installed). The public
verbs (:mod:`lmlab.quant.functional`, :mod:`lmlab.quant.modules`) validate their arguments and call these
ops; with ``impl="reference"`` they call the reference functions directly instead. Importing this module
defines the ops; it probes no hardware and imports no triton.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from lmlab.quant import blockwise
from lmlab.quant.formats import NESTED_BLOCK_SIZE
from lmlab.quant.int8 import int8_dequantize, int8_linear_reference, int_mm_reference
from lmlab.quant.kernels import cpu, cuda, int8_cpu

# op name -> the device types with a registered kernel: where impl="fast" applies. Filled by
# _register_kernel, so that it cannot disagree with the registrations.
FAST_DEVICES: dict[str, tuple[str, ...]] = {}


def _register_kernel(op: str, device: str, fn: Callable[..., object]) -> None:
    torch.library.register_kernel(f"lmlab::{op}", device, fn)
    FAST_DEVICES[op] = (*FAST_DEVICES.get(op, ()), device)


# -------------------------------------------------------------------------------- 4-bit


@torch.library.custom_op("lmlab::quantize_4bit", mutates_args=())
def quantize_4bit(w: torch.Tensor, quant_type: str, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` (any shape, float) -> ``(packed ((n+1)//2, 1) uint8, absmax (blocks,) float32)``.

    A NaN or Inf in ``w`` shows in ``absmax`` (max propagates it); the codes are then unspecified.
    """
    return blockwise.quantize_4bit_reference(w, quant_type, block_size)


@quantize_4bit.register_fake
def _(w: torch.Tensor, quant_type: str, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = w.numel()
    packed = w.new_empty(((n + 1) // 2, 1), dtype=torch.uint8)
    return packed, w.new_empty(((n + block_size - 1) // block_size,), dtype=torch.float32)


@torch.library.custom_op("lmlab::quantize_blockwise_8bit", mutates_args=())
def quantize_blockwise_8bit(
    x: torch.Tensor, code: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Double quantization's step: ``x (n,) float32`` against the sorted 256-entry ``code`` ->
    ``(codes (n,) uint8, absmax (blocks,) float32)``, bitsandbytes' grid lookup included."""
    return blockwise.quantize_blockwise_8bit(x, code, block_size)


@quantize_blockwise_8bit.register_fake
def _(x, code, block_size):
    n = x.numel()
    return x.new_empty((n,), dtype=torch.uint8), x.new_empty(
        ((n + block_size - 1) // block_size,), dtype=torch.float32
    )


# The decoding ops take the block scales as stored: ``absmax`` (blocks,) float32, or, double-quantized,
# its uint8 codes with ``offset``, ``nested_absmax`` and ``nested_code`` (decoded inside a device
# kernel; in torch before a kernel that takes plain scales).


@torch.library.custom_op("lmlab::dequantize_4bit", mutates_args=())
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
    """``packed`` codes and their block scales -> a ``shape`` tensor of ``dtype``."""
    return blockwise.dequantize_4bit_stored(
        packed,
        absmax,
        quant_type,
        block_size,
        shape,
        dtype,
        offset,
        nested_absmax,
        nested_code,
        nested_block_size,
    )


@dequantize_4bit.register_fake
def _(
    packed,
    absmax,
    quant_type,
    block_size,
    shape,
    dtype,
    offset=None,
    nested_absmax=None,
    nested_code=None,
    nested_block_size=NESTED_BLOCK_SIZE,
):
    return packed.new_empty(tuple(shape), dtype=dtype)


@torch.library.custom_op("lmlab::dequantize_4bit_out", mutates_args=("out",))
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
    """:func:`dequantize_4bit` written into ``out`` (contiguous; its shape and dtype say what to decode)."""
    nested = (offset, nested_absmax, nested_code, nested_block_size)
    out.copy_(
        blockwise.dequantize_4bit_stored(
            packed, absmax, quant_type, block_size, out.shape, out.dtype, *nested
        )
    )


@dequantize_4bit_out.register_fake
def _(
    packed,
    absmax,
    quant_type,
    block_size,
    out,
    offset=None,
    nested_absmax=None,
    nested_code=None,
    nested_block_size=NESTED_BLOCK_SIZE,
):
    return None


def _cpu_dequantize_4bit(
    packed,
    absmax,
    quant_type,
    block_size,
    shape,
    dtype,
    offset=None,
    nested_absmax=None,
    nested_code=None,
    nested_block_size=NESTED_BLOCK_SIZE,
):
    scales = blockwise.decode_scales(absmax, offset, nested_absmax, nested_code, nested_block_size)
    return cpu.dequantize_4bit(packed, scales, quant_type, block_size, shape, dtype)


def _cpu_dequantize_4bit_out(
    packed,
    absmax,
    quant_type,
    block_size,
    out,
    offset=None,
    nested_absmax=None,
    nested_code=None,
    nested_block_size=NESTED_BLOCK_SIZE,
):
    scales = blockwise.decode_scales(absmax, offset, nested_absmax, nested_code, nested_block_size)
    cpu.dequantize_4bit_into(packed, scales, quant_type, block_size, out)


_register_kernel("quantize_4bit", "cpu", cpu.quantize_4bit)
_register_kernel("dequantize_4bit", "cpu", _cpu_dequantize_4bit)
_register_kernel("dequantize_4bit_out", "cpu", _cpu_dequantize_4bit_out)
_register_kernel("quantize_4bit", "cuda", cuda.quantize_4bit)
_register_kernel("quantize_blockwise_8bit", "cuda", cuda.quantize_blockwise_8bit)
_register_kernel("dequantize_4bit", "cuda", cuda.dequantize_4bit)
_register_kernel("dequantize_4bit_out", "cuda", cuda.dequantize_4bit_out)


@torch.library.custom_op("lmlab::linear_4bit", mutates_args=())
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
    """``x (..., in) @ W.T + bias`` with ``W (out, in)`` decoded to ``x.dtype`` (QLoRA's frozen layer)."""
    w = dequantize_4bit(
        packed,
        absmax,
        quant_type,
        block_size,
        shape,
        x.dtype,
        offset,
        nested_absmax,
        nested_code,
        nested_block_size,
    )  # (out, in)
    return F.linear(x, w, bias)


@linear_4bit.register_fake
def _(
    x,
    packed,
    absmax,
    quant_type,
    block_size,
    shape,
    bias,
    offset=None,
    nested_absmax=None,
    nested_code=None,
    nested_block_size=NESTED_BLOCK_SIZE,
):
    return x.new_empty((*x.shape[:-1], shape[0]))


_register_kernel("linear_4bit", "cuda", cuda.linear_4bit)


def _linear_4bit_setup(ctx, inputs, output) -> None:
    (
        _,
        packed,
        absmax,
        ctx.quant_type,
        ctx.block_size,
        ctx.shape,
        _,
        offset,
        nested_absmax,
        nested_code,
        ctx.nested_block_size,
    ) = inputs
    ctx.nested = nested_absmax is not None
    ctx.save_for_backward(packed, absmax, *((offset, nested_absmax, nested_code) if ctx.nested else ()))


def _linear_4bit_backward(ctx, grad_out):
    # Only the input gradient: the 4-bit weight and its bias are frozen (adapters train beside them).
    packed, absmax, *nested = ctx.saved_tensors
    w = (
        dequantize_4bit(
            packed,
            absmax,
            ctx.quant_type,
            ctx.block_size,
            ctx.shape,
            grad_out.dtype,
            *nested,
            ctx.nested_block_size,
        )
        if nested
        else dequantize_4bit(packed, absmax, ctx.quant_type, ctx.block_size, ctx.shape, grad_out.dtype)
    )
    return grad_out @ w, *([None] * 10)


torch.library.register_autograd("lmlab::linear_4bit", _linear_4bit_backward, setup_context=_linear_4bit_setup)

# -------------------------------------------------------------------------------- LLM.int8()


@torch.library.custom_op("lmlab::int8_mm", mutates_args=())
def int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a (M, K) int8 @ b (N, K).T -> (M, N) int32``."""
    return int_mm_reference(a, b)


@int8_mm.register_fake
def _(a, b):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=torch.int32)


_register_kernel("int8_mm", "cpu", int8_cpu.int8_mm)
_register_kernel("int8_mm", "cuda", cuda.int8_mm)


@torch.library.custom_op("lmlab::int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, threshold: float) -> torch.Tensor:
    """LLM.int8() ``x (..., K) @ W.T -> (..., N)`` in ``x.dtype``, ``W ≈ w_q * w_scale[:, None] / 127``."""
    return int8_linear_reference(x, w_q, w_scale, threshold, int_mm=int8_mm)


@int8_linear.register_fake
def _(x, w_q, w_scale, threshold):
    return x.new_empty((*x.shape[:-1], w_q.shape[0]))


_register_kernel("int8_linear", "cpu", int8_cpu.int8_linear)
_register_kernel("int8_linear", "cuda", cuda.int8_linear)


def _int8_linear_setup(ctx, inputs, output) -> None:
    _, w_q, w_scale, _ = inputs
    ctx.save_for_backward(w_q, w_scale)


def _int8_linear_backward(ctx, grad_out):
    # The input gradient through the dequantized int8 weight, as bitsandbytes computes it.
    w_q, w_scale = ctx.saved_tensors
    return grad_out @ int8_dequantize(w_q, w_scale).to(grad_out.dtype), None, None, None


torch.library.register_autograd("lmlab::int8_linear", _int8_linear_backward, setup_context=_int8_linear_setup)
