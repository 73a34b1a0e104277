"""The public quantization verbs: :func:`quantize_4bit`, :func:`dequantize_4bit` (QLoRA §3) and
:func:`int8_matmul` (LLM.int8() §3).

They validate their arguments (one-line :class:`LmlabError`), assemble double quantization, and
compute through the ops of :mod:`lmlab.quant.ops`, which dispatch to the device kernel registered
for the inputs (:mod:`lmlab.quant.kernels`) or to the reference. ``impl`` (:mod:`lmlab.impl`):
``"auto"`` calls the op, ``"reference"`` the reference functions of :mod:`lmlab.quant.blockwise` /
:mod:`lmlab.quant.int8` directly, ``"fast"`` the op where a kernel is registered for the device and
a one-line error elsewhere.
"""

from __future__ import annotations

import torch

from lmlab.errors import LmlabError
from lmlab.impl import check_impl, use_fast
from lmlab.quant import ops
from lmlab.quant.blockwise import (
    decode_scales,
    dequantize_4bit_reference,
    quantize_4bit_reference,
    quantize_blockwise_8bit,
)
from lmlab.quant.codebooks import codebook, dynamic_map
from lmlab.quant.formats import NESTED_BLOCK_SIZE, check_block_size, check_float_dtype, check_quant_type
from lmlab.quant.int8 import Int8LinearReference, check_int8_matmul_args
from lmlab.quant.kernels import cuda as cuda_kernels
from lmlab.quant.kernels.cpu import all_finite
from lmlab.quant.state import FLOAT_DTYPES, Quantized4bit


def use_kernel(impl: str, op: str, device: torch.device, what: str) -> bool:
    """Whether to call ``lmlab::<op>`` (else the reference directly): see :func:`lmlab.impl.use_fast`.

    ``"auto"`` always calls the op: it dispatches to the kernel registered for the device, else to
    its reference body."""
    devices = ops.FAST_DEVICES[op]
    applies = device.type in devices and (device.type != "cuda" or cuda_kernels.kernel_available(op))
    if check_impl(impl, what) == "auto":
        return True  # the op dispatches: its kernel where one is registered, else the reference
    return use_fast(impl, applies, what, f"no {op} kernel for {device.type}; kernels: {', '.join(devices)}")


def _check_args(w: torch.Tensor, quant_type: str, block_size: int, name: str) -> None:
    if not isinstance(w, torch.Tensor):
        raise LmlabError(f"{name}: expected a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in FLOAT_DTYPES:
        raise LmlabError(f"{name}: 4-bit quantization needs float32, float16 or bfloat16, got {w.dtype}")
    check_quant_type(quant_type, name)
    check_block_size(block_size, name)
    if w.numel() == 0:
        raise LmlabError(f"{name}: cannot quantize an empty tensor")


def _raise_not_finite(w: torch.Tensor, name: str) -> None:
    flat = w.detach().reshape(-1)
    bad = (~torch.isfinite(flat)).nonzero()
    i = int(bad[0]) if bad.numel() else -1
    kind = "NaN" if i >= 0 and torch.isnan(flat[i]) else "Inf"
    index = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), w.shape)) if i >= 0 else ()
    raise LmlabError(f"{name} contains {kind} (first at index {list(index)}); cannot quantize it")


decoded_absmax = decode_scales  # the name the layers and tests know


def _decoded_absmax(q: Quantized4bit) -> torch.Tensor:
    return decoded_absmax(q.absmax, q.offset, q.nested_absmax, q.nested_code, q.nested_block_size)


def quantize_4bit(
    w: torch.Tensor,
    quant_type: str = "nf4",
    block_size: int = 64,
    double_quant: bool = False,
    *,
    name: str = "weight",
    impl: str = "auto",
) -> Quantized4bit:
    """Blockwise 4-bit quantization of ``w`` (any shape; float32, float16 or bfloat16).

    Bit-identical to ``bitsandbytes.functional.quantize_4bit(w, blocksize=block_size,
    quant_type=quant_type, compress_statistics=double_quant)`` for nf4 and fp4. ``name`` is used in
    error messages (a NaN or Inf anywhere raises :class:`LmlabError` naming it). ``impl``: see the
    module docstring (``"auto"``: ``lmlab::quantize_4bit``, the CPU kernel on CPU).
    """
    _check_args(w, quant_type, block_size, name)
    w = w.detach()
    if use_kernel(impl, "quantize_4bit", w.device, "quantize_4bit"):
        packed, absmax = ops.quantize_4bit(w, quant_type, block_size)
    else:
        packed, absmax = quantize_4bit_reference(w, quant_type, block_size)
    if not all_finite(absmax):  # max propagates NaN and Inf: no extra pass over the weight
        _raise_not_finite(w, name)
    code = codebook(quant_type, w.device)
    if not double_quant:
        return Quantized4bit(packed, absmax, code, quant_type, block_size, w.shape, w.dtype)
    offset = absmax.mean()
    if not bool(torch.isfinite(offset)):
        # The float32 sum overflowed (scales near float32's maximum): take the mean in float64. Only
        # then, so that ordinary weights keep bitsandbytes' float32 mean bit for bit.
        offset = absmax.double().mean().float()
    nested_code = dynamic_map(w.device)
    if use_kernel(impl, "quantize_4bit", w.device, "quantize_4bit"):
        codes, nested_absmax = ops.quantize_blockwise_8bit(absmax - offset, nested_code, NESTED_BLOCK_SIZE)
    else:
        codes, nested_absmax = quantize_blockwise_8bit(absmax - offset, nested_code, NESTED_BLOCK_SIZE)
    return Quantized4bit(
        packed,
        codes,
        code,
        quant_type,
        block_size,
        w.shape,
        w.dtype,
        offset=offset,
        nested_absmax=nested_absmax,
        nested_code=nested_code,
    )


def dequantize_4bit(
    q: Quantized4bit,
    dtype: torch.dtype | None = None,
    *,
    out: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Decode ``q`` to a tensor of ``q.shape`` and ``dtype`` (default: the original dtype).

    Bit-identical to ``bitsandbytes.functional.dequantize_4bit``. ``out`` (optional, contiguous,
    right shape and dtype) is written and returned instead of allocating. ``impl``: see the module
    docstring (``"auto"``: ``lmlab::dequantize_4bit``, the CPU kernel on CPU).
    """
    dtype = dtype or q.dtype
    check_float_dtype(dtype, "dequantize_4bit")
    check_quant_type(q.quant_type, "dequantize_4bit")
    check_block_size(q.block_size, "dequantize_4bit")
    n = q.numel
    if out is not None and (out.dtype != dtype or out.numel() != n or not out.is_contiguous()):
        raise LmlabError(f"dequantize_4bit: out must be a contiguous {dtype} tensor of {n} elements")
    if not use_kernel(impl, "dequantize_4bit", q.device, "dequantize_4bit"):
        absmax = _decoded_absmax(q)
        result = dequantize_4bit_reference(q.packed, absmax, q.quant_type, q.block_size, q.shape, dtype)
        return result if out is None else out.view(q.shape).copy_(result)
    # The stored scales: a device kernel decodes double-quantized ones itself.
    nested = (q.offset, q.nested_absmax, q.nested_code, q.nested_block_size)
    if out is None:
        return ops.dequantize_4bit(
            q.packed, q.absmax, q.quant_type, q.block_size, list(q.shape), dtype, *nested
        )
    out = out.view(q.shape)
    ops.dequantize_4bit_out(q.packed, q.absmax, q.quant_type, q.block_size, out, *nested)
    return out


def int8_matmul(
    x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, threshold: float = 6.0, *, impl: str = "auto"
) -> torch.Tensor:
    """LLM.int8() ``x @ W.T`` with ``W ≈ w_q * w_scale[:, None] / 127``.

    ``x``: ``(..., K)`` float; ``w_q``: ``(N, K)`` int8; ``w_scale``: ``(N,)`` float32 (row absmax
    of ``W``). ``threshold <= 0`` disables the outlier decomposition. Returns ``(..., N)`` in
    ``x.dtype``; differentiable with respect to ``x``.
    """
    check_int8_matmul_args(x, w_q, w_scale)
    if use_kernel(impl, "int8_mm", x.device, "int8_matmul"):
        return ops.int8_linear(x, w_q, w_scale, float(threshold))
    return Int8LinearReference.apply(x, w_q, w_scale, float(threshold))
