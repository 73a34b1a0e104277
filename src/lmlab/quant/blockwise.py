"""Blockwise 4-bit quantization (NF4 / FP4) with optional double quantization.

Dettmers et al. 2023, QLoRA §3: the weight is flattened row-major and cut into blocks of
``block_size`` values; each block is divided by its absolute maximum (kept in float32) and every
value is replaced by the index of the nearest codebook entry (ties go to the lower entry). Two
4-bit codes share a byte, the first element in the high nibble. *Double quantization* subtracts
the mean of the absmax vector and stores it with bitsandbytes' dynamic 8-bit map in blocks of 256
(4 + 32/64 = 4.5 bits per parameter become 4 + 8/64 + 32/(64*256) = 4.127).

The output is bit-identical to ``bitsandbytes.functional.quantize_4bit`` / ``dequantize_4bit``
on the same input, including their quirks: the scale is ``x * (1 / absmax)`` for full blocks but
``x / absmax`` for a trailing partial block, an all-zero block keeps ``absmax = 0`` and decodes
to zeros, an odd element count is padded with the code of 0.0, and the double-quantization step
reproduces their CPU kernel's 65536-point lookup table (see :func:`quantize_blockwise_8bit`).
Two places where bitsandbytes 0.50's CPU dequantization disagrees with itself, we follow its
definition and torch fallback: its vector loop looks scales up per *row*, which is wrong when a
block straddles two rows (a last dimension that is a multiple of 16 but not of the block size);
its scalar loop decodes FP4 pattern 0b1000 as -0.0. The tests spell out both cases.

This module holds the references, plain and obviously correct torch (``torch.bucketize`` against
the codebook midpoints): ``quantize_4bit_reference`` / ``dequantize_4bit_reference`` are the
default implementations of the ops ``lmlab::quantize_4bit`` / ``lmlab::dequantize_4bit``
(:mod:`lmlab.quant.ops`) and what the tests hold every device kernel to
(:mod:`lmlab.quant.kernels`); the double-quantization step (:func:`quantize_blockwise_8bit`) is
plain torch on every device. The public verbs are in :mod:`lmlab.quant.functional`, the state
container in :mod:`lmlab.quant.state`.

Run ``python bench/quant_cpu.py`` for the timings of the CPU kernels against bitsandbytes and
torchao.
"""

from __future__ import annotations

import math

import torch

from lmlab.quant.codebooks import _decode_values, _sorted_tables
from lmlab.quant.formats import NESTED_BLOCK_SIZE

# --------------------------------------------------------------------------------------------
# Reference implementation
# --------------------------------------------------------------------------------------------


def _block_absmax(flat: torch.Tensor, block_size: int) -> torch.Tensor:
    """(blocks,) float32 absolute maximum of each block of a flat float32 tensor."""
    n = flat.numel()
    full = n - n % block_size
    absmax = flat[:full].abs().reshape(-1, block_size).amax(dim=1)
    if full < n:
        absmax = torch.cat([absmax, flat[full:].abs().amax().reshape(1)])
    return absmax


def _scale_blocks_reference(flat: torch.Tensor, absmax: torch.Tensor, block_size: int) -> torch.Tensor:
    n = flat.numel()
    full = n - n % block_size
    safe = absmax.clamp(min=1e-38)  # an all-zero block scales to zeros, never 0/0
    scaled = (flat[:full].reshape(-1, block_size) * safe[: full // block_size, None].reciprocal()).reshape(-1)
    if full < n:  # bitsandbytes divides the trailing partial block instead of multiplying
        scaled = torch.cat([scaled, flat[full:] / safe[-1]])
    return scaled


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(n,) integer codes 0..15 (n even) -> (n // 2, 1) uint8, first element in the high nibble."""
    c = codes.to(torch.uint8)
    return ((c[0::2] << 4) | c[1::2]).reshape(-1, 1)


def _unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    p = packed.reshape(-1)
    codes = torch.stack([p >> 4, p & 15], dim=1).reshape(-1)  # (2 * bytes,)
    return codes[:n].long()


def quantize_4bit_reference(
    w: torch.Tensor, quant_type: str = "nf4", block_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch blockwise 4-bit quantization: ``(packed ((n+1)//2, 1) uint8, absmax (blocks,) f32)``."""
    flat = w.detach().reshape(-1).float()
    absmax = _block_absmax(flat, block_size)
    scaled = _scale_blocks_reference(flat, absmax, block_size)
    if scaled.numel() % 2:
        scaled = torch.cat([scaled, scaled.new_zeros(1)])  # padding is the code of 0.0
    midpoints, order, _ = _sorted_tables(quant_type, flat.device)
    slots = torch.bucketize(scaled, midpoints)  # right=False: value == midpoint -> lower slot
    return _pack_nibbles(order[slots]), absmax


def dequantize_4bit_reference(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_type: str,
    block_size: int,
    shape: torch.Size | tuple[int, ...],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Plain-torch inverse of :func:`quantize_4bit_reference` (absmax already decoded, float32)."""
    n = math.prod(shape)
    code = _decode_values(quant_type, packed.device)
    values = code[_unpack_nibbles(packed, n)]  # (n,) f32
    block = torch.arange(n, device=packed.device) // block_size
    return (values * absmax.float()[block]).to(dtype).reshape(shape)


# --------------------------------------------------------------------------------------------
# Double quantization: bitsandbytes' 8-bit blockwise quantization of the absmax vector
# --------------------------------------------------------------------------------------------


def _lut_8bit(code: torch.Tensor) -> torch.Tensor:
    """(65536,) int64: grid point -> nearest code entry, the table bitsandbytes' CPU kernel uses.

    Grid point ``i`` stands for ``-1 + 2i / 65535`` (float32); its entry is the number of
    midpoints strictly below it.
    """
    midpoints = 0.5 * (code[:-1] + code[1:])
    i = torch.arange(65536, dtype=torch.float32, device=code.device)
    return torch.searchsorted(midpoints, -1.0 + (2.0 * i) / 65535.0)


def quantize_blockwise_8bit(
    x: torch.Tensor, code: torch.Tensor, block_size: int = NESTED_BLOCK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization against a sorted 256-value ``code`` (the double-quant step).

    ``x``: ``(n,) float32``. Returns ``(codes (n,) uint8, absmax (blocks,) float32)``. Matches the
    bitsandbytes 0.50 CPU kernel, which is *not* an exact nearest search: the scaled value
    ``x * (1 / absmax)``, clamped to [-1, 1], is rounded to a 65536-point grid
    (``trunc((v + 1) * 0.5 * 65535 + 0.5)``) and the grid point's nearest entry is stored; an
    all-zero block stores code 0.
    """
    flat = x.reshape(-1).float()
    n = flat.numel()
    blocks = -(-n // block_size)
    padded = torch.cat([flat.abs(), flat.new_zeros(blocks * block_size - n)])
    absmax = padded.reshape(blocks, block_size).amax(dim=1)
    inverse = torch.where(absmax == 0, torch.zeros_like(absmax), 1.0 / absmax)  # no 0 * inf
    per_element = absmax.repeat_interleave(block_size)[:n]
    scaled = (flat * inverse.repeat_interleave(block_size)[:n]).clamp(-1.0, 1.0)
    # 0 * (1 / a subnormal absmax) = 0 * inf = NaN would index the table out of range; it is a 0.
    scaled = torch.nan_to_num(scaled, nan=0.0)
    grid = ((scaled + 1.0) * 0.5 * 65535.0 + 0.5).long()
    codes = _lut_8bit(code)[grid]
    codes = torch.where(per_element == 0, torch.zeros_like(codes), codes)
    return codes.to(torch.uint8), absmax


def dequantize_blockwise_8bit(
    codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, block_size: int = NESTED_BLOCK_SIZE
) -> torch.Tensor:
    """``code[codes] * absmax[block]`` in float32, ``(n,)``."""
    n = codes.numel()
    block = torch.arange(n, device=codes.device) // block_size
    return code[codes.reshape(-1).long()] * absmax[block]


def decode_scales(
    absmax: torch.Tensor,
    offset: torch.Tensor | None = None,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    nested_block_size: int = NESTED_BLOCK_SIZE,
) -> torch.Tensor:
    """The ``(blocks,) float32`` block scales: ``absmax`` itself, or its double-quantized codes decoded
    (``nested_code[absmax] * nested_absmax[block] + offset``)."""
    if nested_absmax is None:
        return absmax.float()
    return dequantize_blockwise_8bit(absmax, nested_absmax, nested_code, nested_block_size) + offset.float()


def dequantize_4bit_stored(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_type: str,
    block_size: int,
    shape: torch.Size | tuple[int, ...],
    dtype: torch.dtype,
    offset: torch.Tensor | None = None,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    nested_block_size: int = NESTED_BLOCK_SIZE,
) -> torch.Tensor:
    """:func:`dequantize_4bit_reference` from the scales as stored (double-quantized ones decoded
    first): the reference body of the decoding ops, on every device."""
    scales = decode_scales(absmax, offset, nested_absmax, nested_code, nested_block_size)
    return dequantize_4bit_reference(packed, scales, quant_type, block_size, tuple(shape), dtype)
