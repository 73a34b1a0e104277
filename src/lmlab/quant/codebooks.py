"""Codebooks for 4-bit and 8-bit blockwise quantization.

A codebook is the sorted (or bit-pattern ordered) list of values that a code can stand for; a
quantized element stores only the index of its nearest value. The 4-bit ones are built by their
entry in the format registry (:mod:`lmlab.quant.formats`); this module serves them per device and
derives the lookup tables the kernels use.

* ``"nf4"`` -- 4-bit NormalFloat (Dettmers et al. 2023, QLoRA §3, "4-bit NormalFloat
  Quantization"): 8 positive and 7 negative quantiles of N(0, 1) taken between
  ``offset = 0.9677083`` and 0.5, plus an exact zero, normalised by the largest value. Built here
  by that construction (no scipy: ``torch.special.ndtri`` in float64); the result is bit-for-bit
  the table bitsandbytes ships.
* ``"fp4"`` -- bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit, exponent bias 2), in
  bit-pattern order: index ``0b1xxx`` is the negative of ``0b0xxx``. Not the OCP E2M1 grid.
* ``"int4"`` -- uniform symmetric sign-magnitude: ``±k/7``, also in bit-pattern order.
* :func:`quantile_codebook` -- the data-dependent "quantile quantization" of QLoRA eq. (4): the
  ``i``-th value is the mean of the empirical quantiles ``i/(2^k+1)`` and ``(i+1)/(2^k+1)``, so
  every code covers an equal share of the data.
* :func:`dynamic_map` -- the signed dynamic 8-bit map (Dettmers et al. 2016, "8-bit approximations
  for parallelism") that double quantization uses for the absmax values (QLoRA §3).
"""

from __future__ import annotations

import functools
import math

import torch

from lmlab.errors import LmlabError
from lmlab.quant.formats import FORMATS


@functools.cache
def _codebook_cached(name: str, device: torch.device) -> torch.Tensor:
    return FORMATS[name].values().to(device)


def codebook(name: str, device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 values of a 4-bit codebook, ``(16,) float32``, indexed by the 4-bit code.

    ``name`` is ``"nf4"`` (sorted ascending), ``"fp4"`` or ``"int4"`` (bit-pattern order, bit 3 =
    sign). The returned tensor is a fresh copy; callers may modify it.
    """
    if name not in FORMATS:
        raise LmlabError(f"unknown codebook {name!r}; expected one of {', '.join(FORMATS)}")
    return _codebook_cached(name, torch.device(device or "cpu")).clone()


def quantile_codebook(x: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Data-dependent codebook of ``2**bits`` values, ``(2**bits,) float32`` sorted ascending.

    QLoRA eq. (4): ``q_i = (Q(i / (2^k + 1)) + Q((i + 1) / (2^k + 1))) / 2`` with ``Q`` the
    empirical quantile function of ``x`` (any shape, any float dtype). Each value stands for an
    equal-mass slice of the data. Values are in the units of ``x`` (not normalised).
    """
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise LmlabError(f"quantile_codebook: bits must be an integer in 1..8, got {bits!r}")
    flat = x.detach().reshape(-1).float()
    if flat.numel() == 0:
        raise LmlabError("quantile_codebook: the source tensor is empty")
    if not torch.isfinite(flat).all():
        raise LmlabError("quantile_codebook: the source tensor contains NaN or Inf")
    n = 2**bits
    sorted_x = flat.sort().values
    # Empirical quantiles Q(i / (n + 1)), i = 0..n, with linear interpolation between order
    # statistics (torch.quantile's rule), written out so it works past torch.quantile's size limit.
    pos = torch.arange(n + 1, dtype=torch.float64, device=flat.device) / (n + 1) * (flat.numel() - 1)
    lo = pos.floor().long()
    hi = pos.ceil().long()
    frac = (pos - lo).to(sorted_x.dtype)
    q = sorted_x[lo] + (sorted_x[hi] - sorted_x[lo]) * frac  # (n + 1,)
    return (q[:-1] + q[1:]) / 2


@functools.cache
def _dynamic_map_cached(device: torch.device) -> torch.Tensor:
    # Signed dynamic map with up to 7 exponent bits: for exponent i = 0..6 the 2**i linearly spaced
    # fraction means in (0.1, 1] are scaled by 10**(i - 6), with both signs; plus 0 and 1.
    # 2 * (1 + 2 + ... + 64) + 2 = 256 values, all distinct, sorted.
    values: list[float] = []
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (i - 6)
        # Scale in float32 (a tensor op), as the reference does, so every value rounds the same.
        values += (scale * means).tolist()
        values += (-scale * means).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


def dynamic_map(device: torch.device | str | None = None) -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map, ``(256,) float32`` sorted ascending."""
    return _dynamic_map_cached(torch.device(device or "cpu")).clone()


# Lookup tables derived from a codebook (constant per codebook and device, cached)


@functools.cache
def _sorted_tables(quant_type: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(midpoints (15,) f32, order (16,) int64, order-is-identity) for nearest-code search.

    ``order[k]`` is the code whose value is the k-th smallest; a value belongs to sorted slot
    ``#{midpoints < value}`` (ties to the lower slot). Stable sort: for FP4's two zeros the
    plain +0 pattern (0b0000) comes first, as in bitsandbytes.
    """
    code = codebook(quant_type, device)
    order = torch.sort(code, stable=True).indices
    values = code[order]
    midpoints = (values[:-1] + values[1:]) / 2
    identity = bool(torch.equal(order, torch.arange(16, device=device)))
    return midpoints, order, identity


@functools.cache
def _grid_tables(quant_type: str, device: torch.device) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Exact nearest-code lookup on a uniform grid: (K, low (2K+1,) f32, midpoint (2K+1,) f32).

    A scaled value ``s`` in [-1, 1] falls into cell ``j = trunc(fl(s + 1) * K)``; that map is
    monotone in ``s``. With K large enough that no two midpoints share a cell, every midpoint in
    a lower cell is ``< s`` and every one in a higher cell is ``> s``, so
    ``slot(s) = low[j] + (s > midpoint[j])`` where ``low[j]`` counts the midpoints in lower cells
    and ``midpoint[j]`` is the one in cell j (+inf if none). This is exactly
    ``torch.bucketize(s, midpoints)`` with one gather pair and one comparison instead of a
    binary search.
    """
    midpoints, _, _ = _sorted_tables(quant_type, device)
    mids = midpoints.cpu()
    for log_k in range(4, 16):
        k = 1 << log_k
        cells = ((mids + 1) * k).long()  # same float32 arithmetic as the fast path
        if torch.unique(cells).numel() == cells.numel():
            break
    else:  # pragma: no cover - every built-in codebook separates by K = 1024
        raise RuntimeError(f"codebook {quant_type} has midpoints too close for the grid lookup")
    n_cells = 2 * k + 1
    low = torch.zeros(n_cells)
    mid = torch.full((n_cells,), math.inf)
    for slot, c in enumerate(cells.tolist()):
        low[c + 1 :] += 1
        mid[c] = mids[slot]
    return k, low.to(device), mid.to(device)


def _decode_values(quant_type: str, device: torch.device) -> torch.Tensor:
    """(16,) float32 values a code decodes to: the codebook itself. (bitsandbytes' scalar CPU
    loop, used for its partial blocks, decodes FP4 pattern 0b1000 as -0.0 instead of +0.0; its
    vector loop, torch fallback and stored ``quant_map`` all say +0.0, which we follow.)"""
    return codebook(quant_type, device)


@functools.cache
def _pair_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """(256,) float64 *view* of (256, 2) float32: byte -> (value of high nibble, low nibble)."""
    code = _decode_values(quant_type, device)
    byte = torch.arange(256, device=device)
    pairs = torch.stack([code[byte >> 4], code[byte & 15]], dim=1).contiguous()  # (256, 2)
    return pairs.view(torch.float64).reshape(256)


@functools.cache
def _slot_byte_to_code_byte(quant_type: str, device: torch.device) -> torch.Tensor:
    """(256,) uint8: a byte of two sorted slots -> the byte of the two codes (FP4, int4)."""
    _, order, _ = _sorted_tables(quant_type, device)
    byte = torch.arange(256, device=device)
    return ((order[byte >> 4] << 4) | order[byte & 15]).to(torch.uint8)
