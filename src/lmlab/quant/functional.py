"""The public 4-bit verbs: :func:`quantize_4bit` and :func:`dequantize_4bit` (QLoRA §3).

They validate their arguments, choose between the reference (:mod:`lmlab.quant.blockwise`) and the
fast path (:mod:`lmlab.quant.kernels`), and assemble double quantization.
"""

from __future__ import annotations

import torch

from lmlab.errors import LmlabError
from lmlab.quant import blockwise as _bw
from lmlab.quant.blockwise import (
    dequantize_4bit_reference,
    dequantize_blockwise_8bit,
    quantize_4bit_reference,
    quantize_blockwise_8bit,
)
from lmlab.quant.codebooks import codebook, dynamic_map
from lmlab.quant.formats import BLOCK_SIZES, FLOAT_DTYPES, NESTED_BLOCK_SIZE, QUANT_TYPES
from lmlab.quant.kernels.cpu import (
    _dequantize_full_blocks_fast,
    _empty_output,
    _fast_absmax,
    _quantize_full_blocks_fast,
)
from lmlab.quant.state import Quantized4bit


def _check_args(w: torch.Tensor, quant_type: str, block_size: int, name: str) -> None:
    if not isinstance(w, torch.Tensor):
        raise LmlabError(f"{name}: expected a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in FLOAT_DTYPES:
        raise LmlabError(f"{name}: 4-bit quantization needs float32, float16 or bfloat16, got {w.dtype}")
    if quant_type not in QUANT_TYPES:
        raise LmlabError(f"{name}: quant_type must be one of {', '.join(QUANT_TYPES)}, got {quant_type!r}")
    if block_size not in BLOCK_SIZES:
        raise LmlabError(
            f"{name}: block_size must be one of {', '.join(map(str, BLOCK_SIZES))}, got {block_size!r}"
        )
    if w.numel() == 0:
        raise LmlabError(f"{name}: cannot quantize an empty tensor")


def _raise_not_finite(w: torch.Tensor, name: str) -> None:
    flat = w.detach().reshape(-1)
    bad = (~torch.isfinite(flat)).nonzero()
    i = int(bad[0]) if bad.numel() else -1
    kind = "NaN" if i >= 0 and torch.isnan(flat[i]) else "Inf"
    index = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), w.shape)) if i >= 0 else ()
    raise LmlabError(f"{name} contains {kind} (first at index {list(index)}); cannot quantize it")


def _decoded_absmax(q: Quantized4bit) -> torch.Tensor:
    if not q.double_quant:
        return q.absmax.float()
    absmax = dequantize_blockwise_8bit(q.absmax, q.nested_absmax, q.nested_code, q.nested_block_size)
    return absmax + q.offset.float()


def quantize_4bit(
    w: torch.Tensor,
    quant_type: str = "nf4",
    block_size: int = 64,
    double_quant: bool = False,
    *,
    name: str = "weight",
) -> Quantized4bit:
    """Blockwise 4-bit quantization of ``w`` (any shape; float32, float16 or bfloat16).

    Bit-identical to ``bitsandbytes.functional.quantize_4bit(w, blocksize=block_size,
    quant_type=quant_type, compress_statistics=double_quant)``. ``name`` is used in error
    messages (a NaN or Inf anywhere raises :class:`LmlabError` naming it).
    """
    _check_args(w, quant_type, block_size, name)
    w = w.detach()
    flat = w.reshape(-1)
    n = flat.numel()
    full = n - n % block_size
    if _bw.USE_FAST_PATH and full > 0:
        w2d = flat[:full].view(-1, block_size)
        absmax = _fast_absmax(w2d)
        if full < n:
            absmax = torch.cat([absmax, flat[full:].float().abs().amax().reshape(1)])
        if not bool(torch.isfinite(absmax).all()):  # max propagates NaN and Inf: no extra pass
            _raise_not_finite(w, name)
        packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=w.device)
        _quantize_full_blocks_fast(w2d, absmax[: full // block_size], quant_type, packed[: full // 2])
        if full < n:
            tail_packed, _ = quantize_4bit_reference(flat[full:], quant_type, block_size)
            packed[full // 2 :] = tail_packed.reshape(-1)
        packed = packed.reshape(-1, 1)
    else:
        packed, absmax = quantize_4bit_reference(w, quant_type, block_size)
        if not bool(torch.isfinite(absmax).all()):
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
    q: Quantized4bit, dtype: torch.dtype | None = None, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Decode ``q`` to a tensor of ``q.shape`` and ``dtype`` (default: the original dtype).

    Bit-identical to ``bitsandbytes.functional.dequantize_4bit``. ``out`` (optional, contiguous,
    right shape and dtype) is written and returned instead of allocating.
    """
    dtype = dtype or q.dtype
    if dtype not in FLOAT_DTYPES:
        raise LmlabError(f"dequantize_4bit: dtype must be float32, float16 or bfloat16, got {dtype}")
    if q.block_size not in BLOCK_SIZES or q.quant_type not in QUANT_TYPES:
        raise LmlabError(f"dequantize_4bit: bad state (block_size {q.block_size}, {q.quant_type!r})")
    absmax = _decoded_absmax(q)
    n = q.numel
    if out is not None and (out.dtype != dtype or out.numel() != n or not out.is_contiguous()):
        raise LmlabError(f"dequantize_4bit: out must be a contiguous {dtype} tensor of {n} elements")
    if not _bw.USE_FAST_PATH:
        result = dequantize_4bit_reference(q.packed, absmax, q.quant_type, q.block_size, q.shape, dtype)
        return result if out is None else out.view(q.shape).copy_(result)
    flat = out.view(-1) if out is not None else _empty_output(n, dtype, q.device)
    full = n - n % q.block_size
    packed = q.packed.reshape(-1)
    if full > 0:
        _dequantize_full_blocks_fast(
            packed[: full // 2], absmax[: full // q.block_size], q.quant_type, q.block_size, flat[:full]
        )
    if full < n:
        flat[full:] = dequantize_4bit_reference(
            packed[full // 2 :], absmax[-1:], q.quant_type, q.block_size, (n - full,), dtype
        )
    return flat.view(q.shape)
