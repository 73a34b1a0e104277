"""Triton kernels of the 4-bit ops (NF4 / FP4 / int4 in bitsandbytes' layout): the ``"cuda"``
implementations of ``lmlab::quantize_4bit``, ``lmlab::dequantize_4bit`` and ``lmlab::linear_4bit``.

Dettmers et al. 2023, QLoRA §3 (blockwise NormalFloat, double quantization): the weight ``W (N, K)``
is flattened row-major and cut into blocks of ``block_size``; code ``c`` of element ``i`` decodes to
``code[c] * absmax[i // block_size]``, two codes per byte, the first in the high nibble. With double
quantization ``absmax`` is itself 8-bit codes: ``absmax[b] = nested_code[a[b]] * nested_absmax[b //
256] + offset``. Every kernel here reads and writes exactly that layout, so a checkpoint written on one
device (or by bitsandbytes) loads on any other, and decodes the nested scales *inside* the kernel.

* :func:`quantize_4bit` — one program per group of blocks: absmax, scale (``x * (1 / absmax)`` for
  full blocks, ``x / absmax`` for the trailing partial one, both correctly rounded as bitsandbytes
  and the reference compute them), nearest code by counting the codebook midpoints below the value
  (ties to the lower code), two codes packed per byte. Bit-identical to
  :func:`lmlab.quant.blockwise.quantize_4bit_reference`. A NaN in a block makes its absmax NaN
  (the caller's finiteness check reads it), as ``max`` propagates it in the reference.
* :func:`quantize_blockwise_8bit` — the double-quantization step (bitsandbytes' dynamic map over
  blocks of 256 scales, with its 65536-point lookup grid), bit-identical to
  :func:`lmlab.quant.blockwise.quantize_blockwise_8bit`.
* :func:`dequantize_4bit` — one element per lane, the byte read twice (its two nibbles), the
  block scale gathered (decoded from the nested codes when double-quantized). Bit-identical to the
  reference (``code * absmax`` in float32, then one rounding to the output dtype).
* :func:`linear_4bit` — ``x @ W.T + bias`` with three paths:

  - ``"gemv"`` (M == 1): several output rows per program, a loop over K reading the packed codes
    and the (nested) scales once; each block's dot product is summed *before* it is multiplied by
    its scale (one multiply per block, not per weight); the dequantized weight never exists. The
    step is laid out as (rows, blocks, half a block) so that the per-block sums stay inside a thread
    group, and ``x`` is loaded in that layout (L1 serves the repeats) rather than exchanged through
    shared memory: compiled offline for sm_90, the loop has no barrier and 8 shuffles, no spills.
  - ``"tiled"`` (any M; the default for 2 <= M <= 16 in bf16 / fp16, float32 taking ``"dequant"``,
    which has a tensor-core GEMM where a float32 ``tl.dot`` has none): the codes decoded and scaled in registers
    into ``tl.dot`` operand tiles (tensor cores), again without materialising the weight. The high
    and low nibbles stay two tiles that meet ``x``'s even and odd columns (two products of half the
    depth) instead of being interleaved, and each (row, block) scale is loaded once per step: the
    offline sm_90 compile of every configuration then has no spills (interleaving and per-element
    scales spilled 100-3300 bytes a thread).
  - ``"dequant"`` (the default for M > 16): :func:`dequantize_4bit` into one temporary of
    ``x.dtype`` and cuBLAS through ``F.linear``: at M = 4096 the product is compute-bound and the
    extra write and read of the weight come to ~6% of the GEMM by the byte count. That is a choice by
    reasoning, not yet by measurement: ``bench/gpu_quant.py`` times ``path="tiled"`` beside it.

  The gemv and tiled paths need ``K`` to be a multiple of ``block_size`` (every row starts a new
  block, as for every transformer shape); otherwise ``"auto"`` takes ``"dequant"``.

Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (the tests do so in CI); autotuning
then has a single configuration, since choosing among several needs a driver, and bfloat16 ``tl.dot``
operands are multiplied as the same values in float32 (the interpreter's bfloat16 product is wrong). Launches
pass ``enable_fp_fusion=False`` wherever a product is followed by a sum that must round as torch's
separate operations do, and ``True`` for the matmuls (every launch says which: Triton 3.9 warns when
a launch leaves it to the default, which changes in 3.10).

Speed goals and their measurement: ``bench/gpu_quant.py`` (GPU only). Importing this module imports
triton and defines the kernels; it probes no device.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from lmlab.quant.blockwise import _lut_8bit
from lmlab.quant.codebooks import _sorted_tables, codebook
from lmlab.quant.formats import NESTED_BLOCK_SIZE

INTERPRET = bool(triton.knobs.runtime.interpret)


@functools.cache
def _tables(quant_type: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(code (16,) f32, midpoints (15,) f32 sorted, order (16,) int32)`` on ``device``, cached."""
    midpoints, order, _ = _sorted_tables(quant_type, device)
    return codebook(quant_type, device).float().contiguous(), midpoints.contiguous(), order.to(torch.int32)


# ---------------------------------------------------------------------------------- scales


@triton.jit
def _block_scale(
    absmax_ptr, blk, mask, offset_ptr, nested_absmax_ptr, nested_code_ptr, NESTED_BS, NESTED: tl.constexpr
):
    """The float32 scales of blocks ``blk`` (0 where not ``mask``): stored, or decoded from their
    8-bit codes (double quantization) as ``nested_code[c] * nested_absmax[blk // 256] + offset``."""
    if NESTED:
        c = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        scale = tl.load(nested_code_ptr + c) * tl.load(
            nested_absmax_ptr + blk // NESTED_BS, mask=mask, other=0.0
        )
        return tl.where(mask, scale + tl.load(offset_ptr), 0.0)
    else:
        return tl.load(absmax_ptr + blk, mask=mask, other=0.0)


def _nested_args(
    absmax: torch.Tensor,
    offset: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """The kernel's ``(offset, nested_absmax, nested_code, NESTED)``; dummies (``absmax``) when plain."""
    if nested_absmax is None:
        return absmax, absmax, absmax, False
    return offset.float().reshape(1), nested_absmax.float(), nested_code.float(), True


# ---------------------------------------------------------------------------------- quantize


@triton.jit
def _quantize_4bit_kernel(
    w_ptr, packed_ptr, absmax_ptr, mid_ptr, order_ptr, n, n_blocks, ROWS: tl.constexpr, BS: tl.constexpr
):
    pid = tl.program_id(0).to(tl.int64)
    blk = pid * ROWS + tl.arange(0, ROWS)  # (ROWS,) block indices
    half = tl.arange(0, BS // 2)
    even = blk[:, None] * BS + 2 * half[None, :]  # (ROWS, BS/2) flat indices of the high nibbles
    x_hi = tl.load(w_ptr + even, mask=even < n, other=0.0).to(tl.float32)
    x_lo = tl.load(w_ptr + even + 1, mask=even + 1 < n, other=0.0).to(tl.float32)
    absmax = tl.maximum(tl.max(tl.abs(x_hi), axis=1), tl.max(tl.abs(x_lo), axis=1))
    nans = tl.sum((x_hi != x_hi).to(tl.int32), axis=1) + tl.sum((x_lo != x_lo).to(tl.int32), axis=1)
    absmax = tl.where(nans > 0, float("nan"), absmax)  # tl.max may drop NaN; the reference's max keeps it
    tl.store(absmax_ptr + blk, absmax, mask=blk < n_blocks)
    safe = tl.maximum(absmax, tl.full((), 1e-38, tl.float32))[
        :, None
    ]  # an all-zero block scales to zeros, never 0 / 0
    full = (blk[:, None] + 1) * BS <= n  # bitsandbytes divides the trailing partial block instead
    inv = tl.math.div_rn(tl.full(safe.shape, 1.0, tl.float32), safe)
    s_hi = tl.where(full, x_hi * inv, tl.math.div_rn(x_hi, safe))
    s_lo = tl.where(full, x_lo * inv, tl.math.div_rn(x_lo, safe))
    slot_hi = tl.zeros(s_hi.shape, tl.int32)
    slot_lo = tl.zeros(s_lo.shape, tl.int32)
    for i in tl.static_range(15):  # sorted slot = number of midpoints strictly below the value
        mid = tl.load(mid_ptr + i)
        slot_hi += (s_hi > mid).to(tl.int32)
        slot_lo += (s_lo > mid).to(tl.int32)
    byte = (tl.load(order_ptr + slot_hi) << 4) | tl.load(order_ptr + slot_lo)
    at = blk[:, None] * (BS // 2) + half[None, :]
    tl.store(packed_ptr + at, byte.to(tl.uint8), mask=at < (n + 1) // 2)


def quantize_4bit(w: torch.Tensor, quant_type: str, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` (any shape, float) -> ``(packed ((n+1)//2, 1) uint8, absmax (blocks,) float32)``."""
    flat = w.detach().reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    n = flat.numel()
    n_blocks = -(-n // block_size)
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=w.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=w.device)
    if n == 0:
        return packed, absmax
    _, midpoints, order = _tables(quant_type, w.device)
    rows = max(1, 2048 // block_size)
    grid = (triton.cdiv(n_blocks, rows),)
    _quantize_4bit_kernel[grid](
        flat,
        packed,
        absmax,
        midpoints,
        order,
        n,
        n_blocks,
        ROWS=rows,
        BS=block_size,
        num_warps=4,
        enable_fp_fusion=False,
    )
    return packed, absmax


@triton.jit
def _quantize_8bit_kernel(x_ptr, codes_ptr, absmax_ptr, lut_ptr, n, n_blocks, BS: tl.constexpr):
    blk = tl.program_id(0).to(tl.int64)
    i = blk * BS + tl.arange(0, BS)
    x = tl.load(x_ptr + i, mask=i < n, other=0.0).to(tl.float32)
    absmax = tl.max(tl.abs(x), axis=0)
    tl.store(absmax_ptr + blk, absmax)
    inverse = tl.where(absmax == 0, 0.0, tl.math.div_rn(1.0, tl.where(absmax == 0, 1.0, absmax)))
    scaled = tl.minimum(tl.maximum(x * inverse, -1.0), 1.0)
    scaled = tl.where(scaled != scaled, 0.0, scaled)  # 0 * inf: a zero, as in the reference
    grid = ((scaled + 1.0) * 0.5 * 65535.0 + 0.5).to(tl.int32)  # truncation, as .long() does
    codes = tl.where(absmax == 0, 0, tl.load(lut_ptr + grid))
    tl.store(codes_ptr + i, codes.to(tl.uint8), mask=i < n)


def quantize_blockwise_8bit(
    x: torch.Tensor, code: torch.Tensor, block_size: int = NESTED_BLOCK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """The double-quantization step: ``x (n,) float32`` -> ``(codes (n,) uint8, absmax (blocks,) f32)``."""
    flat = x.reshape(-1).float().contiguous()
    n = flat.numel()
    n_blocks = -(-n // block_size)
    codes = torch.empty(n, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=x.device)
    if n:
        lut = _lut_8bit(code.float()).to(torch.int32)  # on the device: no copy back, no sync
        _quantize_8bit_kernel[(n_blocks,)](
            flat, codes, absmax, lut, n, n_blocks, BS=block_size, num_warps=4, enable_fp_fusion=False
        )
    return codes, absmax


# ---------------------------------------------------------------------------------- dequantize


@triton.jit
def _dequantize_4bit_kernel(
    packed_ptr,
    absmax_ptr,
    code_ptr,
    out_ptr,
    n,
    block_size,
    offset_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    NESTED_BS,
    NESTED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = i < n
    byte = tl.load(packed_ptr + i // 2, mask=inside, other=0).to(tl.int32)
    nibble = (byte >> ((1 - (i & 1)) * 4).to(tl.int32)) & 15  # the high nibble is the even element
    scale = _block_scale(
        absmax_ptr, i // block_size, inside, offset_ptr, nested_absmax_ptr, nested_code_ptr, NESTED_BS, NESTED
    )
    value = tl.load(code_ptr + nibble) * scale
    tl.store(out_ptr + i, value.to(out_ptr.dtype.element_ty), mask=inside)


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_type: str,
    block_size: int,
    shape: Sequence[int],
    dtype: torch.dtype,
    *,
    offset: torch.Tensor | None = None,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    nested_block_size: int = NESTED_BLOCK_SIZE,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode to a ``shape`` tensor of ``dtype`` (into ``out``, contiguous, when given).

    ``absmax``: the decoded ``(blocks,) float32`` scales, or with ``nested_absmax`` / ``nested_code``
    / ``offset`` their 8-bit codes, decoded inside the kernel."""
    n = math.prod(shape)
    if out is None:
        out = torch.empty(tuple(shape), dtype=dtype, device=packed.device)
    if n == 0:
        return out
    offset, nested_absmax, nested_code, nested = _nested_args(absmax, offset, nested_absmax, nested_code)
    code, _, _ = _tables(quant_type, packed.device)
    block = 1024
    _dequantize_4bit_kernel[(triton.cdiv(n, block),)](
        packed,
        absmax,
        code,
        out,
        n,
        block_size,
        offset,
        nested_absmax,
        nested_code,
        nested_block_size,
        NESTED=nested,
        BLOCK=block,
        num_warps=4,
        enable_fp_fusion=False,
    )
    return out


# ---------------------------------------------------------------------------------- linear: M == 1


# (BLOCK_N, BLOCK_K, num_warps). A GEMV is bound by the bytes each SM has in flight: wide K steps keep
# more loads outstanding per thread, more rows per program more threads; the autotuner picks per shape.
_GEMV_TILES = [
    (8, 256, 2),
    (8, 512, 4),
    (16, 512, 4),
    (16, 1024, 8),
    (4, 1024, 4),
    (8, 1024, 4),
    (32, 256, 4),
    (16, 256, 2),
]


def _gemv_configs() -> list[triton.Config]:
    tiles = _GEMV_TILES[:1] if INTERPRET else _GEMV_TILES
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w) for n, k, w in tiles]


def _prune_gemv(configs, named_args, **kwargs):
    """K steps of whole quantization blocks (a block bigger than a step takes the step of one block)."""
    bs = kwargs.get("BS", named_args.get("BS"))
    kept = [c for c in configs if c.kwargs["BLOCK_K"] >= bs]
    return kept or [triton.Config({"BLOCK_N": 8, "BLOCK_K": bs}, num_warps=4)]


@triton.autotune(
    configs=_gemv_configs(),
    key=["N", "K", "BS"],
    prune_configs_by={"early_config_prune": _prune_gemv},
    cache_results=True,  # the choice per shape persists in Triton's cache: tuned once per machine
)
@triton.jit
def _gemv_4bit_kernel(
    x_ptr,
    packed_ptr,
    absmax_ptr,
    code_ptr,
    bias_ptr,
    out_ptr,
    N,
    K,
    offset_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    NESTED_BS,
    BS: tl.constexpr,
    NESTED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) output rows
    row_ok = rows < N
    x_ptr += tl.program_id(1).to(tl.int64) * K  # one input row per program of axis 1
    out_ptr += tl.program_id(1).to(tl.int64) * N
    # The step's K range as (blocks, half a block): byte j of block b holds columns 2j, 2j + 1 of it,
    # so each block's products are summed along the last axis without moving data between threads.
    STEP: tl.constexpr = BLOCK_K if BLOCK_K >= BS else BS  # whole blocks per step
    nb = tl.arange(0, STEP // BS)
    j = tl.arange(0, BS // 2)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    blocks_per_row = K // BS
    for k0 in range(0, K, STEP):
        kb = k0 // BS + nb  # (NB,) block index within the row
        kb_ok = kb < blocks_per_row
        at = kb[:, None] * (BS // 2) + j[None, :]  # (NB, BS/2) byte index within the row
        ok = row_ok[:, None, None] & kb_ok[None, :, None]
        # x in the weight tile's own (broadcast) layout: L1 serves the repeats, no exchange via shared memory
        x_at = 2 * at[None, :, :] + 0 * rows[:, None, None]
        x_hi = tl.load(x_ptr + x_at, mask=ok, other=0.0).to(tl.float32)
        x_lo = tl.load(x_ptr + x_at + 1, mask=ok, other=0.0).to(tl.float32)
        byte = tl.load(packed_ptr + rows[:, None, None] * (K // 2) + at[None, :, :], mask=ok, other=0)
        byte = byte.to(tl.int32)
        w_hi = tl.load(code_ptr + (byte >> 4))
        w_lo = tl.load(code_ptr + (byte & 15))
        # Sum each quantization block, then scale it once.
        per_block = tl.sum(w_hi * x_hi + w_lo * x_lo, axis=2)  # (BLOCK_N, NB)
        bok = row_ok[:, None] & kb_ok[None, :]
        blk = rows[:, None] * blocks_per_row + kb[None, :]
        scale = _block_scale(
            absmax_ptr, blk, bok, offset_ptr, nested_absmax_ptr, nested_code_ptr, NESTED_BS, NESTED
        )
        acc += tl.sum(per_block * scale, axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, acc.to(out_ptr.dtype.element_ty), mask=row_ok)


# ---------------------------------------------------------------------------------- linear: tiles


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps): 16-row tiles for the small-M path, bigger ones where the
# path is forced for large M (bench/gpu_quant.py times it against dequantize + cuBLAS).
_TILES = [
    (16, 64, 128, 4),
    (16, 32, 128, 4),
    (16, 64, 256, 8),
    (16, 128, 128, 4),
    (16, 32, 256, 4),
    (64, 64, 64, 4),
    (128, 64, 64, 4),
    (128, 128, 64, 8),
]


def _tile_configs() -> list[triton.Config]:
    tiles = _TILES[:1] if INTERPRET else _TILES
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w) for m, n, k, w in tiles]


# float32 operands without tf32 (a forced path: "auto" sends them to "dequant") lower to FMAs, not
# tensor cores; only this small tile of them fits in registers on sm_90.
_IEEE_TILE = (16, 16, 64, 4)


def _prune_tiles(configs, named_args, **kwargs):
    """16-row tiles for up to 16 rows, bigger ones beyond, the small one for float32 (the
    interpreter's single config stays)."""
    if kwargs.get("IEEE"):
        m, n, k, w = _IEEE_TILE
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w)]
    small = named_args["M_BUCKET"] <= 16
    kept = [c for c in configs if (c.kwargs["BLOCK_M"] == 16) == small]
    return kept or configs


@triton.autotune(
    configs=_tile_configs(),
    key=["M_BUCKET", "N", "K", "BS"],
    prune_configs_by={"early_config_prune": _prune_tiles},
    cache_results=True,
)
@triton.jit
def _tiled_4bit_kernel(
    x_ptr,
    packed_ptr,
    absmax_ptr,
    code_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    M_BUCKET,
    offset_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    NESTED_BS,
    BS: tl.constexpr,
    NESTED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # A K step is NB whole blocks, or a part of one block, of HALF bytes each: (rows, NB, HALF).
    NB: tl.constexpr = BLOCK_K // BS if BLOCK_K >= BS else 1
    HALF: tl.constexpr = BLOCK_K // (2 * NB)
    nb = tl.arange(0, NB)
    j = tl.arange(0, HALF)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        at = k0 // 2 + nb[:, None] * HALF + j[None, :]  # (NB, HALF) byte index within a row
        k_ok = at < K // 2
        ok = n_ok[:, None, None] & k_ok[None, :, :]
        byte = tl.load(packed_ptr + rn[:, None, None] * (K // 2) + at[None, :, :], mask=ok, other=0)
        byte = byte.to(tl.int32)
        # one scale per (row, block), applied to the block's codes as they are decoded
        kb = k0 // BS + nb
        sok = n_ok[:, None] & (kb < K // BS)[None, :]
        scale = _block_scale(
            absmax_ptr,
            rn[:, None] * (K // BS) + kb[None, :],
            sok,
            offset_ptr,
            nested_absmax_ptr,
            nested_code_ptr,
            NESTED_BS,
            NESTED,
        )[:, :, None]
        dt = x_ptr.dtype.element_ty
        w_hi = tl.reshape((tl.load(code_ptr + (byte >> 4)) * scale).to(dt), (BLOCK_N, BLOCK_K // 2))
        w_lo = tl.reshape((tl.load(code_ptr + (byte & 15)) * scale).to(dt), (BLOCK_N, BLOCK_K // 2))
        # x's even and odd columns meet the high and low nibbles: two products of half the depth
        at2 = tl.reshape(at, (BLOCK_K // 2,))
        xok = m_ok[:, None] & (at2 < K // 2)[None, :]
        x_at = x_ptr + rm[:, None] * K + 2 * at2[None, :]
        x_hi = tl.load(x_at, mask=xok, other=0.0)
        x_lo = tl.load(x_at + 1, mask=xok, other=0.0)
        if UPCAST:  # the interpreter's tl.dot cannot take bfloat16: the same values in float32
            x_hi, x_lo = x_hi.to(tl.float32), x_lo.to(tl.float32)
            w_hi, w_lo = w_hi.to(tl.float32), w_lo.to(tl.float32)
        if IEEE:  # float32 operands without tf32
            acc = tl.dot(x_hi, tl.trans(w_hi), acc, input_precision="ieee")
            acc = tl.dot(x_lo, tl.trans(w_lo), acc, input_precision="ieee")
        else:
            acc = tl.dot(x_hi, tl.trans(w_hi), acc)
            acc = tl.dot(x_lo, tl.trans(w_lo), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    ok = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=ok)


PATHS = ("auto", "gemv", "tiled", "dequant")


def choose_path(m: int, k: int, block_size: int, dtype: torch.dtype = torch.bfloat16) -> str:
    """The path ``linear_4bit(path="auto")`` takes for ``m`` rows of ``k`` features of ``dtype``.

    float32 rows beyond one take ``"dequant"``: a float32 ``tl.dot`` (no tf32) has no tensor-core
    form, and every tile of it spills registers on sm_90 (``bench/triton_compile_check.py``)."""
    if k % block_size or m > 16:
        return "dequant"
    if m == 1:
        return "gemv"
    return "dequant" if dtype == torch.float32 else "tiled"


def linear_4bit(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_type: str,
    block_size: int,
    shape: Sequence[int],
    bias: torch.Tensor | None,
    *,
    offset: torch.Tensor | None = None,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    nested_block_size: int = NESTED_BLOCK_SIZE,
    path: str = "auto",
) -> torch.Tensor:
    """``x (..., K) @ W.T + bias`` in ``x.dtype`` with ``W (N, K)`` 4-bit (see the module docstring)."""
    if path not in PATHS:
        raise ValueError(f"linear_4bit: path must be one of {', '.join(PATHS)}, got {path!r}")
    n_out, k = shape
    lead = x.shape[:-1]
    x2d = x.reshape(-1, k)
    m = x2d.shape[0]
    if path == "auto":
        path = choose_path(m, k, block_size, x.dtype)
    if path != "dequant" and k % block_size:
        raise ValueError(
            f"linear_4bit: path {path!r} needs in_features ({k}) to be a multiple of {block_size}"
        )
    if path == "dequant" or m == 0:
        w = dequantize_4bit(
            packed,
            absmax,
            quant_type,
            block_size,
            shape,
            x.dtype,
            offset=offset,
            nested_absmax=nested_absmax,
            nested_code=nested_code,
            nested_block_size=nested_block_size,
        )
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))
    x2d = x2d.contiguous()
    out = torch.empty((m, n_out), dtype=x.dtype, device=x.device)
    offset, nested_absmax, nested_code, nested = _nested_args(absmax, offset, nested_absmax, nested_code)
    code, _, _ = _tables(quant_type, x.device)
    bias_arg = bias if bias is not None else out
    common = (offset, nested_absmax, nested_code, nested_block_size)
    if path == "gemv":
        # A GEMV per input row (axis 1 of the grid): meant for M = 1, where it reads the weight once.
        _gemv_4bit_kernel[lambda meta: (triton.cdiv(n_out, meta["BLOCK_N"]), m)](
            x2d,
            packed,
            absmax,
            code,
            bias_arg,
            out,
            n_out,
            k,
            *common,
            BS=block_size,
            NESTED=nested,
            HAS_BIAS=bias is not None,
            enable_fp_fusion=True,  # multiply-adds fused: a product, not a bit-exact decode
        )
    else:
        bucket = 16 if m <= 16 else (128 if m <= 128 else 1024)
        _tiled_4bit_kernel[
            lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n_out, meta["BLOCK_N"]))
        ](
            x2d,
            packed,
            absmax,
            code,
            bias_arg,
            out,
            m,
            n_out,
            k,
            bucket,
            *common,
            BS=block_size,
            NESTED=nested,
            HAS_BIAS=bias is not None,
            IEEE=x.dtype == torch.float32,
            UPCAST=INTERPRET and x.dtype == torch.bfloat16,
            enable_fp_fusion=True,
        )
    return out.reshape(*lead, n_out)
