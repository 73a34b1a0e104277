"""LLM.int8(): vector-wise int8 matrix multiplication with mixed-precision outlier decomposition.

Dettmers et al. 2022, "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale", §3:

* vector-wise quantization (§3.1): every row of the activations ``X (M, K)`` and every output row
  of the weight ``W (N, K)`` gets its own absmax scale; ``round(127 * x / absmax)`` (half to even)
  in int8; the int8 x int8 product is accumulated in int32 and dequantized by the outer product of
  the two scale vectors divided by ``127 * 127``.
* mixed-precision decomposition (§3.2): a *column* of ``X`` holding any ``|x| >= threshold``
  (6.0 in the paper) is an outlier column; those columns are multiplied in floating point and
  excluded from the activation scales, the rest goes through int8.

The weight columns used for the outliers are the int8 weights dequantized (bitsandbytes' choice;
the paper keeps 16-bit weights, which a layer holding only int8 weights cannot).

:func:`int8_vectorwise` is the paper's law on the values it is given. bitsandbytes' ``Int8Params``
rounds a weight to float16 before it (``bitsandbytes/nn/modules.py``, 0.50.2), which moves ~0.75% of
the codes by one; :func:`quantize_int8_weight` is that convention (what ``Linear8bit.from_linear``
uses), so that the codes and ``SCB`` are byte-identical to bitsandbytes'. A row whose magnitude
overflows float16 (> 65504, where bitsandbytes writes ``SCB = inf`` and all-zero codes) is
quantized from the weight as given instead: finite, correct, and loadable by bitsandbytes.

Activations are quantized in float32 as given; bitsandbytes casts them to float16 first and takes
the row scales with only the outlier *elements* zeroed (the rest of an outlier column still counts);
here the whole outlier columns leave the int8 part, as §3.2 decomposes ``X``. Both differences are far
below the int8 step (``tests/quant/test_bnb_int8.py`` measures them against bitsandbytes' forward).

The int32 accumulation is exact on every route. The op's default, :func:`int_mm_reference`, sums
products of int8 values in float64, which represents every partial sum below 2**53 exactly (K up to
5e11). CUDA's kernel is ``torch._int_mm`` (:mod:`lmlab.quant.kernels.cuda`); the CPU kernels are in
:mod:`lmlab.quant.kernels.int8_cpu` (a float32 GEMM where it is provably exact). All of them share
:func:`row_codes` (the activation codes), :func:`dequantize_product_` and
:func:`add_outlier_product`, so that every kernel's output is bit-identical to the reference's.
``int8_matmul_reference`` spells the arithmetic out element by element for the tests. The public
verb :func:`lmlab.quant.functional.int8_matmul` checks its arguments and calls the op.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lmlab.errors import LmlabError

INT8_SCALE = 127.0


def _check_float(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise LmlabError(f"{what}: expected a floating-point tensor, got {getattr(x, 'dtype', type(x))}")


def _check_scale(w_scale: torch.Tensor, rows: int) -> None:
    # A wrong scale vector would broadcast (a scalar, an (N, 1)) or scale by garbage without an error.
    if not isinstance(w_scale, torch.Tensor) or not w_scale.is_floating_point():
        raise LmlabError(
            f"int8_matmul: w_scale must be a floating-point tensor, got {getattr(w_scale, 'dtype', type(w_scale))}"
        )
    if w_scale.shape != (rows,):
        raise LmlabError(
            f"int8_matmul: w_scale must have shape ({rows},), one scale per weight row, got {tuple(w_scale.shape)}"
        )
    if not bool(torch.isfinite(w_scale).all()) or bool((w_scale < 0).any()):
        raise LmlabError("int8_matmul: w_scale must hold finite row absmax values >= 0")


def row_absmax(x2d: torch.Tensor) -> torch.Tensor:
    """``max |x|`` of every row of ``x2d (M, K)`` float32: two reductions, no ``|x|`` materialised
    (``abs_`` turns the -0.0 of an all-zero row into +0.0); a NaN in a row gives NaN."""
    return torch.maximum(x2d.amax(dim=-1), x2d.amin(dim=-1).neg()).abs_()


def row_codes(xf: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 codes of :func:`int8_vectorwise` as integer-valued float32, and the row scales.

    ``xf``: ``(..., K)`` float32 (not modified); ``scale``: its :func:`row_absmax` if the caller has
    it. The codes are exact integers in [-127, 127]: a float32 GEMM can take them without a
    conversion (:mod:`lmlab.quant.kernels.int8_cpu`). No clamp is needed: ``|x| <= scale`` and
    ``127 / scale`` rounded up by at most 2**-24 keep ``|x * (127 / scale)|`` below 127.5.
    """
    if scale is None:
        scale = row_absmax(xf)
    factor = torch.where(scale == 0, torch.zeros_like(scale), INT8_SCALE / scale)
    codes = torch.mul(xf, factor.unsqueeze(-1)).round_()
    tiny = torch.isinf(factor)  # 0 < scale < 127 / FLT_MAX: 127 / scale overflows float32
    if bool(tiny.any()):
        rows = xf[tiny]
        codes[tiny] = torch.round(rows / scale[tiny].unsqueeze(-1) * INT8_SCALE).clamp_(-127, 127)
    return codes, scale


def int8_vectorwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise absmax int8 quantization over the last dimension (LLM.int8() §3.1).

    ``x``: ``(..., K)`` float. Returns ``(q (..., K) int8, scale (...,) float32)`` with
    ``q = round(x * (127 / scale))`` (round half to even) and ``scale`` the row's absmax; an all-zero
    row gives zeros and scale 0. ``x ≈ q * scale / 127``. Bit-identical to bitsandbytes'
    ``int8_vectorwise_quant`` on the same values (it computes ``A * (127 / absmax)`` in float32 too).
    """
    _check_float(x, "int8_vectorwise")
    codes, scale = row_codes(x.float())
    return codes.to(torch.int8), scale


FLOAT16_MAX = 65504.0


def quantize_int8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight ``(N, K)`` float -> ``(codes (N, K) int8, SCB (N,) float32)`` as bitsandbytes makes them.

    bitsandbytes' ``Int8Params`` casts the weight to float16 before :func:`int8_vectorwise`; so does
    this, row by row, except for rows holding a magnitude beyond float16's range (65504), which are
    quantized from ``w`` as given (bitsandbytes would write ``SCB = inf`` and zero codes there).
    """
    _check_float(w, "quantize_int8_weight")
    wf = w.float()
    rounded = w.to(torch.float16).float()
    overflow = row_absmax(wf) > FLOAT16_MAX  # (N,): float16 rounds these rows to inf
    if bool(overflow.any()):
        rounded = torch.where(overflow.unsqueeze(-1), wf, rounded)
    return int8_vectorwise(rounded)


def int8_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`int8_vectorwise`: ``(..., K)`` float32."""
    return q.float() * (scale.float().unsqueeze(-1) / INT8_SCALE)


def int_mm_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a (M, K) int8 @ b (N, K).T -> (M, N) int32`` on any device (``lmlab::int8_mm``'s default)."""
    # float64 holds every sum of at most 2**53 / 127**2 products exactly.
    return (a.double() @ b.double().t()).to(torch.int32)


def outlier_columns(x2d: torch.Tensor, threshold: float, row_max: torch.Tensor | None = None) -> torch.Tensor:
    """Indices ``(C,) int64`` of the columns of ``x2d (M, K)`` holding any ``|x| >= threshold``.

    ``row_max``: :func:`row_absmax` of ``x2d`` if the caller has it (below the threshold everywhere:
    no column to look for). A NaN makes no column an outlier (it poisons its row's output anyway).
    """
    if threshold <= 0:
        return torch.empty(0, dtype=torch.long, device=x2d.device)
    if row_max is not None and bool((row_max < threshold).all()):
        return torch.empty(0, dtype=torch.long, device=x2d.device)
    # max |x| >= t  <=>  max x >= t or min x <= -t: two column reductions, no |x| materialised
    return ((x2d.amax(dim=0) >= threshold) | (x2d.amin(dim=0) <= -threshold)).nonzero().view(-1)


def check_int8_matmul_args(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor) -> None:
    """One-line errors for the arguments of :func:`lmlab.quant.functional.int8_matmul`."""
    _check_float(x, "int8_matmul input")
    if w_q.dtype != torch.int8 or w_q.dim() != 2:
        raise LmlabError(f"int8_matmul: w_q must be a 2-D int8 tensor, got {w_q.dtype} {tuple(w_q.shape)}")
    if x.shape[-1] != w_q.shape[1]:
        raise LmlabError(f"int8_matmul: input has {x.shape[-1]} features, the weight expects {w_q.shape[1]}")
    _check_scale(w_scale, w_q.shape[0])


def dequantize_product_(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """``acc (M, N)`` float32 (the exact int32 product, converted) scaled in place to
    ``acc * x_scale[:, None] * (w_scale[None, :] / 127**2)``, and returned."""
    acc.mul_(x_scale.unsqueeze(1))
    return acc.mul_(w_scale.float().unsqueeze(0) * (1.0 / (INT8_SCALE * INT8_SCALE)))


def add_outlier_product(
    out: torch.Tensor, x2d: torch.Tensor, cols: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor
) -> torch.Tensor:
    """``out + x2d[:, cols] @ W[:, cols].T`` with ``W``'s columns the dequantized int8 weight
    (bitsandbytes' choice), in float32; ``out`` itself when ``cols`` is empty."""
    if not cols.numel():
        return out
    w_cols = w_q.index_select(1, cols).float() * (w_scale.float()[:, None] / INT8_SCALE)  # (N, C)
    return torch.addmm(out, x2d.index_select(1, cols), w_cols.t())


def int8_linear_reference(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    threshold: float,
    int_mm: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = int_mm_reference,
) -> torch.Tensor:
    """LLM.int8() ``x @ W.T`` on checked inputs (see :func:`lmlab.quant.functional.int8_matmul`).

    ``int_mm`` is the exact int8 product; the op's default body passes ``lmlab::int8_mm`` so that a
    device kernel of it is used where one is registered.
    """
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1]).float()  # (M, K)
    cols = outlier_columns(x2d, threshold)
    # Outlier columns leave the int8 path, and with it the activation scales.
    regular = x2d.index_fill(1, cols, 0.0) if cols.numel() else x2d
    x_q, x_scale = int8_vectorwise(regular)
    acc = int_mm(x_q, w_q).float()  # (M, N), exact integers (rounded to float32 above 2**24)
    out = add_outlier_product(dequantize_product_(acc, x_scale, w_scale), x2d, cols, w_q, w_scale)
    return out.to(x.dtype).reshape(*lead, w_q.shape[0])


def int8_matmul_reference(
    x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, threshold: float = 6.0
) -> torch.Tensor:
    """The same computation element by element in int64 / float64, for tests (small inputs)."""
    x2d = x.reshape(-1, x.shape[-1]).double()
    m, k = x2d.shape
    n = w_q.shape[0]
    is_outlier = torch.zeros(k, dtype=torch.bool)
    if threshold > 0:
        is_outlier = (x2d.abs() >= threshold).any(dim=0)
    regular = torch.where(is_outlier[None, :], torch.zeros_like(x2d), x2d).float()
    x_q, x_scale = int8_vectorwise(regular)
    acc = (x_q.long()[:, None, :] * w_q.long()[None, :, :]).sum(-1)  # (M, N) int64
    out = acc.double() * (x_scale.double()[:, None] * w_scale.double()[None, :]) / (127.0 * 127.0)
    w_deq = w_q.double() * (w_scale.double()[:, None] / 127.0)
    out = out + (x2d * is_outlier[None, :]) @ w_deq.t()
    return out.reshape(*x.shape[:-1], n)


class Int8LinearReference(torch.autograd.Function):
    """:func:`int8_linear_reference` with the input gradient through the dequantized int8 weight
    (what ``lmlab::int8_linear`` registers), for ``impl="reference"``."""

    @staticmethod
    def forward(ctx, x, w_q, w_scale, threshold):
        ctx.save_for_backward(w_q, w_scale)
        return int8_linear_reference(x, w_q, w_scale, threshold)

    @staticmethod
    def backward(ctx, grad_out):
        w_q, w_scale = ctx.saved_tensors
        w = int8_dequantize(w_q, w_scale).to(grad_out.dtype)  # (N, K)
        return grad_out @ w, None, None, None
