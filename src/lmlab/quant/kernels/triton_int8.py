"""Triton kernels of LLM.int8() (Dettmers et al. 2022, §3.1 vector-wise quantization, §3.2 mixed-precision
decomposition): the CUDA bodies of ``lmlab::int8_linear`` and ``lmlab::int8_mm``.

They compute exactly what :func:`lmlab.quant.int8.int8_linear_reference` computes: a column of
``x2d (M, K)`` holding any ``|x| >= threshold`` is an outlier column (a column holding a NaN never is);
the other columns are quantized row-wise, ``codes = round_half_even(x * ((1 / scale) * 127))`` with
``scale`` the row's absmax over the regular columns (``127.0 / scale`` in torch *is*
``reciprocal(scale) * 127``, both roundings kept; a row whose factor overflows takes
``round(x / scale * 127)``), the int8 product is accumulated exactly in int32 and dequantized as
``acc * x_scale[:, None] * (w_scale[None, :] * (1 / 127**2))``; the outlier columns are multiplied in
float32 with the dequantized int8 weight columns and added. The int8 part is bit-identical to the
reference's (rounding is done with the fp32 magic number ``1.5 * 2**23``, divisions with ``div_rn``,
and the kernels are launched with ``enable_fp_fusion=False`` so that no multiply-add is contracted);
the outlier part may differ in float32 summation order.

Two paths:

* **Small M** (``M <= 16``, decoding): no host synchronisation. When ``x`` is at most two tiles
  (``M * K <= 16384``: ``M = 1`` up to ``K = 16384``) one program sweeps it twice
  (``_prepass_kernel``; every column's outlier bits are complete in a tile that holds all the
  rows): the row scales, then the int8 codes ``(M, K)`` with the outlier columns zeroed and the
  column bits -- two launches in all. A bigger ``x`` would make that one program's sweep a chain of
  memory round trips, so the column-bit and row-quantization kernels of the large-M path do it in
  parallel (one program a row; four launches with the zero fill, still no synchronisation). The GEMV kernel (``_gemv_kernel``, ``BLOCK_N`` output rows of
  ``W`` per program, a loop over ``K``) then only streams the int8 weight once beside the codes into
  an int8 MMA (the rows padded to 16 for ``tl.dot``), exact in int32; in ``K`` tiles holding an
  outlier column (a scalar branch: the others pay nothing) it adds ``x``'s outlier columns times the
  dequantized weight, ``w * (w_scale / 127)`` as in the reference's ``add_outlier_product``, in
  float32, 32 columns at a time; the scale epilogue is fused into the store in ``x.dtype``.
  Quantizing ``x`` once instead of in every program keeps the hot loop to loads and MMAs (at
  ``M = 1`` a per-program quantization of the padded 16-row tile would cost more issue slots than
  the weight's bandwidth leaves).
* **Large M**: a column-flag kernel (per-column "holds a value beyond the threshold" / "holds a NaN"
  bits combined with ``atomic_or``: order-free, deterministic), a row-quantization kernel writing the
  int8 codes ``(M, K)`` with the outlier columns zeroed and the row scales, the outlier column
  indices by ``nonzero`` (a sync, paid once per large product), the outlier product by ``torch.mm``
  in float32, and an int8 tensor-core GEMM (``tl.dot`` int8 x int8 -> int32) whose epilogue applies
  the scales, adds the outlier product and casts.

Layout: the weight stays ``(N, K)`` row-major, i.e. the GEMM's ``B`` operand is read transposed with
``K`` contiguous. That is the layout int8 MMA instructions want for both operands (``K``-major; the
reason ``torch._int_mm`` is fastest with a column-major weight), and the layout bitsandbytes and
:func:`lmlab.quant.int8.quantize_int8_weight` store, so no copy of the weight is ever made.

Compiled for sm_90 without a GPU (``triton.compile`` to a cubin with the bundled ``ptxas``), no
kernel spills registers except the two widest GEMM tiles with the outlier addend (autotuning weighs
them); the GEMM lowers to ``wgmma`` int8 for ``BLOCK_M >= 64``, the GEMV to ``mma.sync`` s8. None of
it has been timed on a GPU. On the GPU the GEMM and GEMV tile sizes are autotuned per shape bucket; under Triton's interpreter
(``TRITON_INTERPRET=1``, CPU tensors, the tests) exactly one configuration is used, because
autotuning needs a driver. Nothing here probes hardware at import; the module imports triton, and
is itself imported only lazily by the op registration. The int32 accumulation is exact while
``K * 128 * 128 < 2**31`` (``K`` up to 131072).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

INT8_SCALE = 127.0
INV_SCALE_SQ = 1.0 / (INT8_SCALE * INT8_SCALE)  # rounded to float32 at launch, as torch rounds the scalar
SMALL_M = 16  # at most this many rows: the GEMV path (tl.dot pads the rows to 16)
# GEMV prepass: tiles of up to PREPASS_TILE elements (32 per thread at 8 warps; no spills on sm_90);
# up to ONE_PROGRAM_PREPASS elements of x (two tiles a sweep) one program does it all, in one launch.
PREPASS_TILE = 8192
ONE_PROGRAM_PREPASS = 2 * PREPASS_TILE

_INTERPRET = bool(triton.knobs.runtime.interpret)  # a setting, not a hardware probe


def _configs(tiles: list[tuple[int, int, int, int, int]], interpreted: tuple[int, int, int]) -> list:
    """Autotune configs ``(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)``; one under the interpreter."""
    if _INTERPRET:
        bm, bn, bk = interpreted
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in tiles
    ]


# Tiles for H200-class GPUs (unmeasured here): wide tiles for large M, narrower ones for skinny products.
_GEMM_TILES = [
    (128, 256, 128, 8, 3),
    (256, 128, 128, 8, 3),
    (128, 128, 128, 8, 4),
    (128, 128, 64, 4, 4),
    (64, 128, 128, 4, 4),
    (128, 64, 128, 4, 4),
    (64, 64, 128, 4, 4),
    (32, 64, 128, 4, 4),
    (16, 64, 256, 4, 4),
]
# BLOCK_M is fixed at 16 by the launcher; the configs vary the weight tile (BLOCK_N x BLOCK_K int8).
_GEMV_TILES = [
    (16, 16, 512, 8, 4),
    (16, 32, 256, 4, 4),
    (16, 32, 512, 4, 3),
    (16, 64, 256, 4, 4),
    (16, 64, 128, 4, 5),
    (16, 128, 128, 8, 4),
]


# ------------------------------------------------------------------------------------- jit helpers


@triton.jit
def _round_half_even(v):
    # Adding 1.5 * 2**23 leaves no fraction bits; the fp32 addition rounds half to even (|v| < 2**22).
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _column_flags(x, threshold):
    """``(BLOCK_M, BLOCK_K)`` float32 -> ``(BLOCK_K,)`` int32: bit 0 some ``|x| >= threshold``, bit 1 a NaN."""
    big = ((x >= threshold) | (x <= -threshold)).to(tl.int32)
    nan = (x != x).to(tl.int32)
    return tl.max(big, axis=0) | (tl.max(nan, axis=0) * 2)


@triton.jit
def _row_factor(scale):
    """``127 / scale`` as torch evaluates it (``reciprocal(scale) * 127``); 0 for a zero row, ``+inf``
    where that overflows (``0 < scale < ~127 / FLT_MAX``: the "tiny" rows). No lane ever divides by
    zero or overflows: the interpreter would warn (numpy), and the tests turn warnings into errors."""
    zero = scale == 0.0
    # fl(fl(1 / s) * 127) overflows iff fl(fl(2**-64 / s) * 127) >= 2**64: scaling by 2**-64 is exact
    # there, and the overflow threshold's midpoint 2**128 - 2**103 rounds (half to even) to 2**128.
    probe = tl.math.div_rn(
        tl.full(scale.shape, 5.421010862427522e-20, tl.float32), tl.where(zero, 1.0, scale)
    )
    tiny = (probe * 127.0) >= 1.8446744073709552e19  # 2**-64, 2**64 (literals: no constant folding needed)
    one = tl.full(scale.shape, 1.0, tl.float32)
    factor = tl.math.div_rn(one, tl.where(zero | tiny, 1.0, scale)) * 127.0
    return tl.where(zero, 0.0, tl.where(tiny, float("inf"), factor))


@triton.jit
def _quantize_tile(x, scale, factor, any_tiny):
    """The integer-valued float32 codes of ``x (BLOCK_M, BLOCK_K)`` (NaN -> 0)."""
    if any_tiny:
        # The factor overflows: the reference computes round(x / scale * 127) instead.
        tiny = factor == float("inf")
        v = tl.where(
            tiny[:, None],
            tl.math.div_rn(x, tl.where(tiny, scale, 1.0)[:, None]) * 127.0,
            x * tl.where(tiny, 0.0, factor)[:, None],
        )
    else:
        v = x * factor[:, None]
    # NaN -> 0 before the clamp: tl.maximum need not propagate NaN (fmax on GPUs, the interpreter).
    v = tl.where(v == v, v, 0.0)
    return tl.minimum(tl.maximum(_round_half_even(v), -127.0), 127.0)


@triton.jit
def _row_stats_update(x, amax, nan):
    amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
    nan = tl.maximum(nan, tl.max((x != x).to(tl.int32), axis=1))
    return amax, nan


@triton.jit
def _row_scale(amax, nan):
    # tl.max drops NaN on GPUs (fmax); the reference's row absmax propagates it.
    return tl.where(nan > 0, float("nan"), amax)


# ------------------------------------------------------------------------------------- large M


@triton.jit
def _column_flags_kernel(
    x_ptr, flags_ptr, M, K, stride_xm, stride_xk, threshold, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = cols < K
    ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :] * stride_xk
    x = tl.load(ptrs, mask=(rows < M)[:, None] & kmask[None, :], other=0.0).to(tl.float32)
    flags = _column_flags(x, threshold)
    tl.atomic_or(flags_ptr + cols, flags, mask=kmask & (flags != 0), sem="relaxed")  # read after the kernel


@triton.jit
def _quantize_rows_kernel(
    x_ptr,
    flags_ptr,
    codes_ptr,
    scale_ptr,
    M,
    K,
    stride_xm,
    stride_xk,
    HAS_FLAGS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    amax = tl.zeros([BLOCK_M], dtype=tl.float32)
    nan = tl.zeros([BLOCK_M], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):  # pass 1: the row scales over the regular columns
        cols = k0 + tl.arange(0, BLOCK_K)
        kmask = cols < K
        x = tl.load(x_rows + cols[None, :] * stride_xk, mask=rmask[:, None] & kmask[None, :], other=0.0)
        x = x.to(tl.float32)
        if HAS_FLAGS:
            regular = tl.load(flags_ptr + cols, mask=kmask, other=0) != 1
            x = tl.where(regular[None, :], x, 0.0)
        amax, nan = _row_stats_update(x, amax, nan)
    scale = _row_scale(amax, nan)
    tl.store(scale_ptr + rows, scale, mask=rmask)
    factor = _row_factor(scale)
    any_tiny = tl.max((factor == float("inf")).to(tl.int32), axis=0) > 0
    codes_rows = codes_ptr + rows.to(tl.int64)[:, None] * K
    for k0 in range(0, K, BLOCK_K):  # pass 2: the codes
        cols = k0 + tl.arange(0, BLOCK_K)
        kmask = cols < K
        mask = rmask[:, None] & kmask[None, :]
        x = tl.load(x_rows + cols[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
        if HAS_FLAGS:
            regular = tl.load(flags_ptr + cols, mask=kmask, other=0) != 1
            x = tl.where(regular[None, :], x, 0.0)
        q = _quantize_tile(x, scale, factor, any_tiny)
        tl.store(codes_rows + cols[None, :], q.to(tl.int8), mask=mask)


def _prune_gemm_configs(configs: list, nargs: dict, **kwargs) -> list:
    """With the float32 addend the epilogue holds two accumulator-sized tiles: tiles of more than 64
    accumulator elements per thread spilled there on sm_90 (offline compile), so they are not tried."""
    if not (kwargs.get("HAS_ADDEND") or nargs.get("HAS_ADDEND")):
        return configs
    kept = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 32 * c.num_warps]
    return kept or configs


@triton.autotune(
    configs=_configs(_GEMM_TILES, (64, 64, 64)),
    key=["M_BUCKET", "N", "K", "DEQUANT", "HAS_ADDEND"],
    prune_configs_by={"early_config_prune": _prune_gemm_configs},
    cache_results=True,  # the choice per shape persists in Triton's cache: tuned once per machine
)
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _int8_gemm_kernel(
    a_ptr,
    b_ptr,
    out_ptr,
    xs_ptr,
    ws_ptr,
    add_ptr,
    M,
    N,
    K,
    M_BUCKET,
    stride_am,
    stride_ak,
    stride_bn,
    stride_bk,
    inv_scale_sq,
    DEQUANT: tl.constexpr,
    HAS_ADDEND: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr = 8,
):
    """``out (M, N) = a (M, K) int8 @ b (N, K).T`` in int32, or dequantized (+ addend) in out's dtype."""
    # Grouped program order: GROUP_M row tiles share the same weight tiles while they are in L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    group_m = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_m
    pid_n = (pid % (GROUP_M * tiles_n)) // group_m
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < M
    nmask = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_am + ks[None, :] * stride_ak  # (BLOCK_M, BLOCK_K)
    b_ptrs = b_ptr + cols.to(tl.int64)[None, :] * stride_bn + ks[:, None] * stride_bk  # (BLOCK_K, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=rmask[:, None], other=0)
            b = tl.load(b_ptrs, mask=nmask[None, :], other=0)
        else:
            kmask = (k0 + ks) < K
            a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0)
            b = tl.load(b_ptrs, mask=kmask[:, None] & nmask[None, :], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    out_offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    omask = rmask[:, None] & nmask[None, :]
    if DEQUANT:
        xs = tl.load(xs_ptr + rows, mask=rmask, other=0.0)
        ws = tl.load(ws_ptr + cols, mask=nmask, other=0.0)
        out = acc.to(tl.float32) * xs[:, None]
        out = out * (ws * inv_scale_sq)[None, :]
        if HAS_ADDEND:
            out = out + tl.load(add_ptr + out_offs, mask=omask, other=0.0)
        tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=omask)
    else:
        tl.store(out_ptr + out_offs, acc, mask=omask)


# ------------------------------------------------------------------------------------- small M


@triton.jit
def _prepass_kernel(
    x_ptr,
    flags_ptr,
    codes_ptr,
    scale_ptr,
    M,
    K,
    stride_xm,
    stride_xk,
    threshold,
    HAS_FLAGS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program, all ``M <= BLOCK_M`` rows, two sweeps: the row scales, then the codes ``(M, K)``
    int8 and the column bits. Each column's outlier bits are complete in its tile (every row is
    there), so no sweep waits for another program."""
    rows = tl.arange(0, BLOCK_M)
    rmask = rows < M
    amax = tl.zeros([BLOCK_M], dtype=tl.float32)
    nan = tl.zeros([BLOCK_M], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        kmask = cols < K
        ptrs = x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk
        x = tl.load(ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        if HAS_FLAGS:
            x = tl.where((_column_flags(x, threshold) != 1)[None, :], x, 0.0)
        amax, nan = _row_stats_update(x, amax, nan)
    scale = _row_scale(amax, nan)
    tl.store(scale_ptr + rows, scale, mask=rmask)
    factor = _row_factor(scale)
    any_tiny = tl.max((factor == float("inf")).to(tl.int32), axis=0) > 0
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        kmask = cols < K
        mask = rmask[:, None] & kmask[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask, other=0.0)
        x = x.to(tl.float32)
        if HAS_FLAGS:
            flags = _column_flags(x, threshold)
            tl.store(flags_ptr + cols, flags, mask=kmask)
            x = tl.where((flags != 1)[None, :], x, 0.0)
        q = _quantize_tile(x, scale, factor, any_tiny)
        tl.store(codes_ptr + rows[:, None] * K + cols[None, :], q.to(tl.int8), mask=mask)


@triton.jit
def _outlier_tile(
    x_ptr,
    flags_ptr,
    w_ptr,
    acc,
    w_dequant,
    rows,
    rmask,
    cols,
    nmask,
    k0,
    K,
    stride_xm,
    stride_xk,
    BLOCK_K: tl.constexpr,
    OUTLIER_K: tl.constexpr,
):
    """``acc + x[:, outliers] @ W_dequant[cols, outliers].T`` over the tile ``k0 : k0 + BLOCK_K``, in
    float32 (``ieee``), ``OUTLIER_K`` columns at a time reloaded from cache: a float32 ``tl.dot``
    holds both operands in registers, and a whole ``BLOCK_K`` tile of them spilled on sm_90."""
    for j in range(0, BLOCK_K, OUTLIER_K):
        sub = k0 + j + tl.arange(0, OUTLIER_K)
        outlier = (tl.load(flags_ptr + sub, mask=sub < K, other=0) == 1) & (sub < K)
        if tl.max(outlier.to(tl.int32), axis=0) > 0:
            x_ptrs = x_ptr + rows[:, None] * stride_xm + sub[None, :] * stride_xk
            x = tl.load(x_ptrs, mask=rmask[:, None] & outlier[None, :], other=0.0).to(tl.float32)
            w_ptrs = w_ptr + cols.to(tl.int64)[None, :] * K + sub[:, None]  # (OUTLIER_K, BLOCK_N)
            w = tl.load(w_ptrs, mask=outlier[:, None] & nmask[None, :], other=0)
            acc = tl.dot(x, w.to(tl.float32) * w_dequant[None, :], acc, input_precision="ieee")
    return acc


@triton.autotune(
    configs=_configs(_GEMV_TILES, (16, 64, 128)), key=["N", "K", "HAS_FLAGS"], cache_results=True
)
@triton.jit
def _gemv_kernel(
    codes_ptr,
    x_ptr,
    flags_ptr,
    scale_ptr,
    w_ptr,
    ws_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    inv_scale_sq,
    HAS_FLAGS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    OUTLIER_K: tl.constexpr = 32,
):
    """``BLOCK_N`` output columns of ``x (M <= 16, K) @ W.T``: the int8 weight ``(N, K)`` is read once,
    beside the activation codes of the prepass (the rows padded to 16 for the int8 MMA)."""
    rows = tl.arange(0, BLOCK_M)
    rmask = rows < M
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = cols < N
    ks = tl.arange(0, BLOCK_K)
    q_ptrs = codes_ptr + rows[:, None] * K + ks[None, :]  # (BLOCK_M, BLOCK_K)
    w_ptrs = w_ptr + cols.to(tl.int64)[None, :] * K + ks[:, None]  # (BLOCK_K, BLOCK_N), K contiguous
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    acc_out = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    ws = tl.load(ws_ptr + cols, mask=nmask, other=0.0)
    w_dequant = tl.math.div_rn(ws, tl.full(ws.shape, 127.0, tl.float32))  # the reference's w_scale / 127
    for k0 in range(0, K, BLOCK_K):
        kmask = (k0 + ks) < K
        w = tl.load(w_ptrs, mask=kmask[:, None] & nmask[None, :], other=0)
        q = tl.load(q_ptrs, mask=rmask[:, None] & kmask[None, :], other=0)
        acc = tl.dot(q, w, acc, out_dtype=tl.int32)
        if HAS_FLAGS:
            outlier = tl.load(flags_ptr + k0 + ks, mask=kmask, other=0) == 1
            if tl.max(outlier.to(tl.int32), axis=0) > 0:  # only tiles holding an outlier column pay
                acc_out = _outlier_tile(
                    x_ptr,
                    flags_ptr,
                    w_ptr,
                    acc_out,
                    w_dequant,
                    rows,
                    rmask,
                    cols,
                    nmask,
                    k0,
                    K,
                    stride_xm,
                    stride_xk,
                    BLOCK_K,
                    OUTLIER_K,
                )
        q_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    out = acc.to(tl.float32) * tl.load(scale_ptr + rows, mask=rmask, other=0.0)[:, None]
    out = out * (ws * inv_scale_sq)[None, :]
    if HAS_FLAGS:
        out = out + acc_out
    out_offs = rows[:, None] * N + cols[None, :]
    tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & nmask[None, :])


# ------------------------------------------------------------------------------------- launchers


def _bucket(m: int) -> int:
    """The autotune key of ``M``: powers of two up to 4096."""
    return min(triton.next_power_of_2(max(m, 1)), 4096)


def _flags(x2d: torch.Tensor, threshold: float) -> torch.Tensor:
    """``(K,) int32`` column bits of ``x2d`` (bit 0: some ``|x| >= threshold``; bit 1: a NaN)."""
    m, k = x2d.shape
    flags = torch.zeros(k, dtype=torch.int32, device=x2d.device)
    block_m, block_k = (64, 64) if _INTERPRET else (min(64, max(16, triton.next_power_of_2(m))), 128)
    grid = (triton.cdiv(m, block_m), triton.cdiv(k, block_k))
    _column_flags_kernel[grid](
        x2d,
        flags,
        m,
        k,
        x2d.stride(0),
        x2d.stride(1),
        float(threshold),
        BLOCK_M=block_m,
        BLOCK_K=block_k,
        enable_fp_fusion=False,
    )
    return flags


def _quantize(
    x2d: torch.Tensor, flags: torch.Tensor | None, per_row: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_row``: one program per row, whole rows per tile where they fit (the few rows of a GEMV)."""
    m, k = x2d.shape
    codes = torch.empty((m, k), dtype=torch.int8, device=x2d.device)
    scale = torch.empty(m, dtype=torch.float32, device=x2d.device)
    if _INTERPRET:
        block_m, block_k, warps = (1 if per_row else 64), 128, 4
    elif per_row:
        block_m, block_k, warps = 1, min(triton.next_power_of_2(k), PREPASS_TILE), 8
    else:
        block_m, block_k, warps = 4, 1024, 4
    _quantize_rows_kernel[(triton.cdiv(m, block_m),)](
        x2d,
        flags if flags is not None else scale,  # unread without flags
        codes,
        scale,
        m,
        k,
        x2d.stride(0),
        x2d.stride(1),
        HAS_FLAGS=flags is not None,
        BLOCK_M=block_m,
        BLOCK_K=block_k,
        num_warps=warps,
        enable_fp_fusion=False,
    )
    return codes, scale


def quantize_rows(x2d: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-wise int8 quantization with LLM.int8()'s outlier columns taken out (§3.1, §3.2).

    ``x2d (M, K)`` float (any of fp32 / fp16 / bf16) -> ``(codes (M, K) int8, scale (M,) float32,
    outlier (K,) bool)``: bit-identical to the reference's ``int8_vectorwise(x2d.float().index_fill(1,
    cols, 0.0))`` and ``outlier_columns(x2d, threshold)`` (a NaN row's codes are 0, its scale NaN).
    """
    m, k = x2d.shape
    if m == 0 or k == 0:
        codes = torch.zeros((m, k), dtype=torch.int8, device=x2d.device)
        scale = torch.zeros(m, dtype=torch.float32, device=x2d.device)
        return codes, scale, torch.zeros(k, dtype=torch.bool, device=x2d.device)
    flags = _flags(x2d, threshold) if threshold > 0 else None
    codes, scale = _quantize(x2d, flags)
    outlier = flags == 1 if flags is not None else torch.zeros(k, dtype=torch.bool, device=x2d.device)
    return codes, scale, outlier


def _gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    x_scale: torch.Tensor | None = None,
    w_scale: torch.Tensor | None = None,
    addend: torch.Tensor | None = None,
) -> torch.Tensor:
    m, k = a.shape
    n = b.shape[0]
    dequant = x_scale is not None
    dummy = out  # pointer arguments the constexpr branches never read

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _int8_gemm_kernel[grid](
        a,
        b,
        out,
        x_scale if dequant else dummy,
        w_scale if dequant else dummy,
        addend if addend is not None else dummy,
        m,
        n,
        k,
        _bucket(m),
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        INV_SCALE_SQ,
        DEQUANT=dequant,
        HAS_ADDEND=addend is not None,
        enable_fp_fusion=False,
    )
    return out


def int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a (M, K) int8 @ b (N, K).T -> (M, N) int32`` for any ``M, N, K`` (ragged edges masked)."""
    m, k = a.shape
    n = b.shape[0]
    out = torch.zeros((m, n), dtype=torch.int32, device=a.device)
    if m == 0 or n == 0 or k == 0:
        return out
    return _gemm(a, b, out)


def _linear_small(x2d: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, threshold: float, out):
    m, k = x2d.shape
    n = w_q.shape[0]
    has_flags = threshold > 0
    if m * k <= ONE_PROGRAM_PREPASS:
        codes, scale, flags = _prepass(x2d, threshold)
    else:
        # One program would sweep too many tiles one after the other (each a memory round trip):
        # the column bits and the codes of every row in parallel instead (two more launches, no sync).
        flags = _flags(x2d, threshold) if has_flags else None
        codes, scale = _quantize(x2d, flags, per_row=True)
        flags = flags if has_flags else scale  # unread without flags

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]),)

    _gemv_kernel[grid](
        codes,
        x2d,
        flags,
        scale,
        w_q,
        w_scale,
        out,
        m,
        n,
        k,
        x2d.stride(0),
        x2d.stride(1),
        INV_SCALE_SQ,
        HAS_FLAGS=has_flags,
        enable_fp_fusion=False,
    )
    return out


def _prepass(x2d: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, scales and column bits of a few rows from one program (one launch)."""
    m, k = x2d.shape
    has_flags = threshold > 0
    codes = torch.empty((m, k), dtype=torch.int8, device=x2d.device)
    scale = torch.empty(m, dtype=torch.float32, device=x2d.device)
    flags = torch.empty(k, dtype=torch.int32, device=x2d.device) if has_flags else scale  # unread without
    block_m = triton.next_power_of_2(m)
    block_k = 128 if _INTERPRET else min(triton.next_power_of_2(k), PREPASS_TILE // block_m)
    _prepass_kernel[(1,)](
        x2d,
        flags,
        codes,
        scale,
        m,
        k,
        x2d.stride(0),
        x2d.stride(1),
        float(threshold),
        HAS_FLAGS=has_flags,
        BLOCK_M=block_m,
        BLOCK_K=block_k,
        num_warps=8,
        enable_fp_fusion=False,
    )
    return codes, scale, flags


def _linear_large(x2d: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, threshold: float, out):
    flags = _flags(x2d, threshold) if threshold > 0 else None
    codes, x_scale = _quantize(x2d, flags)
    addend = None
    if flags is not None:
        cols = (flags == 1).nonzero().view(-1)  # the one host synchronisation of this path
        if cols.numel():
            w_cols = w_q.index_select(1, cols).float() * (w_scale[:, None] / INT8_SCALE)  # (N, C)
            addend = x2d.index_select(1, cols).float() @ w_cols.t()  # (M, N) float32
    return _gemm(codes, w_q, out, x_scale, w_scale, addend)


def int8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, threshold: float) -> torch.Tensor:
    """LLM.int8() ``x (..., K) @ W.T -> (..., N)`` in ``x.dtype``, ``W ≈ w_q * w_scale[:, None] / 127``.

    The contract of :func:`lmlab.quant.int8.int8_linear_reference` on checked inputs: ``x`` float32 /
    float16 / bfloat16, ``w_q (N, K)`` int8 row-major contiguous, ``w_scale (N,)`` float32. ``M <= 16``
    rows take the synchronisation-free GEMV path, more rows the int8 tensor-core GEMM.
    """
    lead = x.shape[:-1]
    k = x.shape[-1]
    n = w_q.shape[0]
    x2d = x.reshape(-1, k)  # (M, K)
    m = x2d.shape[0]
    if m == 0 or n == 0 or k == 0:
        return x.new_zeros((*lead, n))
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    w_scale = w_scale.float()
    if m <= SMALL_M:
        _linear_small(x2d, w_q, w_scale, threshold, out)
    else:
        _linear_large(x2d, w_q, w_scale, threshold, out)
    return out.reshape(*lead, n)
