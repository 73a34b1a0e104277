"""Noise masks for the denoising objectives (Raffel et al. 2020, §3.3.2 and §3.3.4, Tables 4 and 7).

Two laws, both as batched, vectorised functions returning a ``(B, L)`` bool mask (True = noise):

* :func:`random_spans_noise_mask` — T5's span law.  A row of ``L`` tokens gets exactly
  ``n = round(L · noise_density)`` noise tokens (clamped to ``[1, L - 1]``, computed in float32 and
  rounded half to even as T5's TensorFlow code does) in ``s = max(1, round(n / mean_noise_span_length))``
  spans.  The noise tokens and the non-noise tokens are each cut into ``s`` non-empty runs, every
  segmentation equally likely (so span lengths are *not* geometric), and the runs alternate starting
  with non-noise, so a row always ends in noise.  Rows shorter than 2 get no noise (T5 computes
  the mask for length 2 and truncates it).
* :func:`iid_noise_mask` — each token is noise independently with probability ``noise_density``
  (T5's "i.i.d." corruption; BERT's selection).

:func:`span_corruption_lengths` is T5's ``random_spans_helper``: the raw row length whose span
corruption gives inputs of exactly ``inputs_length`` tokens, and the targets' length, EOS included
(512 → (568, 114)).  It uses the very counts the mask uses, so the promise is exact.

Vectorisation: a uniformly random choice of ``s − 1`` cut points among the ``n − 1`` gaps between
noise tokens is the top ``s − 1`` of ``n − 1`` i.i.d. uniform keys, for every row at once (or,
where ``s`` is small beside ``n``, the first ``s − 1`` distinct values of a few more i.i.d. draws:
the same law, at a fraction of the cost); the sorted cut positions give each noise span's start
and end, which are scattered as +1/−1 markers and summed along the row.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from lmlab.errors import LmlabError
from lmlab.objectives.base import check_fraction


def check_span_args(noise_density: float, mean_noise_span_length: float) -> None:
    check_fraction("noise_density", noise_density, high_open=True)
    if not (mean_noise_span_length >= 1.0 and math.isfinite(mean_noise_span_length)):
        raise LmlabError(f"mean_noise_span_length must be a number >= 1, got {mean_noise_span_length}")


def noise_span_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """``(num_noise_tokens, num_noise_spans)`` of a row of ``length`` tokens under T5's span law.

    T5 computes in float32 with half-to-even rounding; so do we (``190 · 0.15`` is 28.500002 in
    float32, giving 29 noise tokens, where float64 gives 28.5 and 28).  Where T5's segmentation would be impossible (more spans than
    non-noise tokens, at densities above 0.5) the spans are capped at the non-noise count.
    """
    if noise_density == 0.0 or length < 2:
        return 0, 0
    n = int(np.round(np.float32(length) * np.float32(noise_density)))
    n = min(max(n, 1), length - 1)
    s = int(np.round(np.float32(n) / np.float32(mean_noise_span_length)))
    s = min(max(s, 1), n, length - n)
    return n, s


def _noise_span_counts_tensor(
    lengths: torch.Tensor, noise_density: float, mean_noise_span_length: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`noise_span_counts` for a ``(B,)`` int64 tensor of lengths, elementwise."""
    if noise_density == 0.0:
        zero = torch.zeros_like(lengths)
        return zero, zero
    d = torch.tensor(noise_density, dtype=torch.float32, device=lengths.device)
    mu = torch.tensor(mean_noise_span_length, dtype=torch.float32, device=lengths.device)
    n = torch.round(lengths.to(torch.float32) * d).long()
    n = torch.minimum(n.clamp_min(1), lengths - 1)
    s = torch.round(n.to(torch.float32) / mu).long().clamp_min(1)
    s = torch.minimum(torch.minimum(s, n), lengths - n)
    short = lengths < 2
    return n.masked_fill(short, 0), s.masked_fill(short, 0)


def span_corruption_lengths(
    inputs_length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0
) -> tuple[int, int]:
    """``(raw_length, targets_length)`` for span corruption with ``inputs_length`` encoder tokens.

    T5's ``random_spans_helper`` with one sentinel per span and EOS on inputs and targets: the
    largest raw length ``t`` whose inputs ``t − n + s + 1`` fit in ``inputs_length``; targets are
    ``n + s + 1``.  T5's rule for density 0.5: when the targets come out longer than the inputs,
    one raw token less (and one target less) is used.  ``span_corruption_lengths(512) == (568, 114)``.

    T5's own helper counts in float64 and without the mask's clamps, so at a few lengths it
    promises other lengths than T5's mask gives (41 of the inputs lengths 8…4096 at the defaults;
    at density 0.3, 77 → targets 38 where the mask makes 40); this one uses the mask's counts.
    """
    check_span_args(noise_density, mean_noise_span_length)
    if inputs_length < 1:
        raise LmlabError(f"inputs_length must be at least 1 (room for EOS), got {inputs_length}")

    def lengths_of(t: int) -> tuple[int, int]:
        n, s = noise_span_counts(t, noise_density, mean_noise_span_length)
        return t - n + s + 1, n + s + 1

    t = inputs_length - 1
    while lengths_of(t + 1)[0] <= inputs_length:
        t += 1
    _, targets_length = lengths_of(t)
    if noise_density == 0.5 and targets_length > inputs_length:
        t -= 1
        targets_length -= 1
    return t, targets_length


def _device_of(device: torch.device | str | None, lengths: torch.Tensor | None) -> torch.device:
    """Where to draw: ``device`` if given, else where ``lengths`` lives, else the CPU."""
    if device is not None:
        return torch.device(device)
    return lengths.device if lengths is not None else torch.device("cpu")


def _draw(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=device)


def _draws_for_distinct(k: int, n: int, limit: int = 64) -> int | None:
    """How many i.i.d. draws from ``range(n)`` give ``k`` distinct values with room to spare:
    the expected repeats ``D`` plus four standard deviations (``D`` is about Poisson).  ``None``
    when more than ``limit`` would be needed."""
    for K in range(k, min(limit, n) + 1):
        repeats = max(0.0, K - n * (1.0 - (1.0 - 1.0 / n) ** K))
        if K - repeats - 4.0 * math.sqrt(repeats) - 1.0 >= k:
            return K
    return None


def _distinct_sorted(
    k: int, n: int, batch_size: int, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor | None:
    """A uniformly random k-subset of ``range(n)`` per row, ascending: ``(B, k)`` int64.

    The first ``k`` distinct values of a sequence of i.i.d. uniform draws are a uniformly random
    k-subset (relabelling the values changes nothing), so ``K`` draws a row (a few more than
    ``k``) are made at once, and the rare row with fewer than ``k`` distinct values is drawn
    again.  Far cheaper than a top-k over ``n`` keys when ``k`` is small beside ``n``; returns
    ``None`` where it is not (then the caller takes the top-k).
    """
    K = _draws_for_distinct(k, n)
    if K is None:
        return None

    def draw(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        v = torch.randint(0, n, (rows, K), generator=generator, device=device)  # (R, K) in draw order
        sv, order = v.sort(dim=1, stable=True)  # equal values keep their draw order
        new = torch.ones_like(sv, dtype=torch.bool)
        new[:, 1:] = sv[:, 1:] != sv[:, :-1]  # (R, K) first of its value, in sorted order
        first = torch.empty_like(new).scatter_(1, order, new)  # the same flags in draw order
        keep = (first & (first.cumsum(dim=1) <= k)).gather(1, order)  # first k distinct, sorted order
        slot = keep.cumsum(dim=1) - 1  # (R, K) where each kept value goes
        out = sv.new_zeros((rows, k + 1)).scatter_(1, torch.where(keep, slot, k), sv)
        return out[:, :k], slot[:, -1] == k - 1

    out, ok = draw(batch_size)
    while not bool(ok.all()):
        redo = (~ok).nonzero().squeeze(1)
        picked, ok_redo = draw(redo.numel())
        out[redo] = picked
        ok = ok.clone()
        ok[redo] = ok_redo
    return out


def _sorted_cuts(
    num_items: torch.Tensor | int,
    num_segments: torch.Tensor | int,
    max_items: int,
    max_segments: int,
    batch_size: int,
    generator: torch.Generator | None,
    device: torch.device,
) -> torch.Tensor:
    """End offsets of the first ``max_segments − 1`` segments of a uniformly random segmentation.

    Row ``b`` splits ``num_items[b]`` items into ``num_segments[b]`` non-empty runs.  Returns
    ``(B, max_segments − 1)`` int64, ascending per row: the cumulative run lengths ``c_1 < … <
    c_{s−1}``, then ``num_items[b]`` repeated for the runs a row does not have.
    """
    k = max_segments - 1
    if k <= 0:
        return torch.zeros((batch_size, 0), dtype=torch.long, device=device)
    gaps = max(max_items - 1, k)
    ragged = isinstance(num_items, torch.Tensor)
    if not ragged:
        cuts = _distinct_sorted(k, gaps, batch_size, generator, device)
        if cuts is not None:
            return cuts + 1
    keys = _draw((batch_size, gaps), generator, device)  # (B, G) i.i.d. uniform keys per gap
    if ragged:
        # Gaps a row does not have can never be cut.
        keys.masked_fill_(torch.arange(gaps, device=device) >= (num_items - 1)[:, None], -1.0)
    # The top k keys of a row are a uniformly random k-subset of its gaps.
    cuts = keys.topk(k, dim=1, sorted=ragged).indices + 1  # (B, k) offsets in [1, items)
    if ragged:
        # topk sorted by key: the first s − 1 columns are the row's own uniformly chosen cuts.
        unused = torch.arange(k, device=device) >= (num_segments - 1)[:, None]
        cuts = torch.where(unused, num_items[:, None], cuts)
    return cuts.sort(dim=1).values


def random_span_segmentation(
    batch_size: int,
    length: int,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    *,
    lengths: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw T5's random-span segmentation: ``(nonnoise_ends, noise_ends)``, each ``(B, s + 1)`` int64.

    ``nonnoise_ends[b, k]`` is the number of non-noise tokens in the first ``k`` non-noise runs of
    row ``b`` (``0`` at ``k = 0``, the row's total at ``k = s``), ``noise_ends`` the same for noise
    runs, so noise span ``k`` covers positions ``[nonnoise_ends[k+1] + noise_ends[k],
    nonnoise_ends[k+1] + noise_ends[k+1])``.  ``s`` is the batch's largest span count; a row with
    fewer spans has empty runs at the end.  ``lengths`` ``(B,)`` int64 gives each row's number of
    tokens, ``None`` that every row has ``length``; ``generator`` must live on ``device``.
    """
    check_span_args(noise_density, mean_noise_span_length)
    device = _device_of(device, lengths)
    B, L = batch_size, length
    if lengths is None:
        n, s = noise_span_counts(L, noise_density, mean_noise_span_length)
        max_n, max_m, max_s = n, L - n, s
        num_noise: torch.Tensor | int = n
        num_nonnoise: torch.Tensor | int = L - n
        num_spans: torch.Tensor | int = s
        n_col = torch.full((B, 1), n, dtype=torch.long, device=device)
        m_col = torch.full((B, 1), L - n, dtype=torch.long, device=device)
    else:
        lengths = lengths.to(device=device, dtype=torch.long)
        if lengths.shape != (B,):
            raise LmlabError(f"lengths must have shape ({B},), got {tuple(lengths.shape)}")
        num_noise, num_spans = _noise_span_counts_tensor(lengths, noise_density, mean_noise_span_length)
        num_nonnoise = lengths - num_noise
        max_s = int(num_spans.max()) if B else 0
        max_n = int(num_noise.max()) if B else 0
        max_m = int(num_nonnoise.max()) if B else 0
        n_col, m_col = num_noise[:, None], num_nonnoise[:, None]
    zero = torch.zeros((B, 1), dtype=torch.long, device=device)
    if max_s == 0:
        return zero, zero.clone()
    # Noise first, then non-noise: the draws' order is part of what a seed reproduces.
    C = _sorted_cuts(num_noise, num_spans, max_n, max_s, B, generator, device)  # (B, s-1)
    A = _sorted_cuts(num_nonnoise, num_spans, max_m, max_s, B, generator, device)  # (B, s-1)
    return torch.cat([zero, A, m_col], dim=1), torch.cat([zero, C, n_col], dim=1)


def random_spans_noise_mask(
    batch_size: int,
    length: int,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    **draw: Any,
) -> torch.Tensor:
    """T5's random-spans noise mask for a batch: ``(batch_size, length)`` bool, True = noise.

    Keyword-only, as :func:`random_span_segmentation` takes them (the mask is drawn from its
    segmentation): ``lengths`` ``(B,)`` int64 gives each row's number of tokens (right-padded rows;
    positions past it are never noise), ``None`` (the default) means every row has ``length``
    tokens; ``generator`` (which must live on ``device``) and ``device``.  Each row follows T5's
    law exactly (see the module docstring).
    """
    A, C = random_span_segmentation(batch_size, length, noise_density, mean_noise_span_length, **draw)
    B, L = batch_size, length
    # Noise run k starts after non-noise runs 0..k and noise runs 0..k-1 and ends (exclusive)
    # after noise run k too; runs a row does not have are empty (start == end) and cancel.
    starts = A[:, 1:] + C[:, :-1]  # (B, s)
    ends = A[:, 1:] + C[:, 1:]  # (B, s)
    marks = torch.zeros((B, L + 1), dtype=torch.int32, device=A.device)
    one = torch.ones((), dtype=torch.int32, device=A.device).expand(starts.shape)
    marks.scatter_add_(1, starts, one)
    marks.scatter_add_(1, ends, -one)
    return marks[:, :L].cumsum(dim=1, dtype=torch.int32) > 0


def iid_noise_mask(
    batch_size: int,
    length: int,
    noise_density: float = 0.15,
    *,
    lengths: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """I.i.d. noise: ``(batch_size, length)`` bool, each token noise with probability ``noise_density``.

    Positions at or past ``lengths[b]`` (when given) are never noise.
    """
    check_fraction("noise_density", noise_density)
    device = _device_of(device, lengths)
    mask = _draw((batch_size, length), generator, device) < noise_density
    if lengths is not None:
        mask &= torch.arange(length, device=device) < lengths.to(device)[:, None]
    return mask
