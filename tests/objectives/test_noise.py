"""T5's noise laws: exact counts, the length helper, the segmentation's law and the i.i.d. density."""

from __future__ import annotations

import collections
import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmlab.errors import LmlabError
from lmlab.objectives import SpanCorruption, iid_noise_mask, random_spans_noise_mask, span_corruption_lengths
from lmlab.objectives import reference as ref
from lmlab.objectives.noise import noise_span_counts, random_span_segmentation


def runs(row: list[bool]) -> list[tuple[bool, int]]:
    """Run-length encoding: [(value, length), ...]."""
    out: list[tuple[bool, int]] = []
    for v in row:
        if out and out[-1][0] == v:
            out[-1] = (v, out[-1][1] + 1)
        else:
            out.append((v, 1))
    return out


def test_t5_lengths_for_512():
    assert span_corruption_lengths(512) == (568, 114)
    assert span_corruption_lengths(512, 0.15, 3.0) == (568, 114)


def test_length_helper_mean_span_one_is_not_off_by_one():
    # One sentinel per noise token: inputs = raw + 1, so 511 raw tokens fill 512 (the HF port says 512).
    raw, targets = span_corruption_lengths(512, 0.15, 1.0)
    assert raw == 511
    n, s = noise_span_counts(511, 0.15, 1.0)
    assert (n, s) == (77, 77) and targets == n + s + 1


def test_length_helper_density_half_rule():
    # T5: when the targets come out longer than the inputs, use one raw token less.
    raw, targets = span_corruption_lengths(512, 0.5, 3.0)
    assert (raw, targets) == (766, 512)
    n, s = noise_span_counts(767, 0.5, 3.0)
    assert 767 - n + s + 1 == 512 and n + s + 1 == 513  # what the rule avoids


def test_length_helper_agrees_with_the_mask_where_t5s_float64_helper_does_not():
    # T5's helper: 95 * 0.3 = 28.5 -> 28 noise tokens (float64), targets 28 + 9 + 1 = 38; its mask
    # (float32, 28.500002) makes 29 noise tokens in 10 spans: targets 40.
    assert span_corruption_lengths(77, 0.3, 3.0) == (95, 40)
    assert noise_span_counts(95, 0.3, 3.0) == (29, 10)


def test_counts_use_float32_like_t5():
    # 190 * 0.15 is 28.500002 in float32 (T5's arithmetic) but 28.5 in float64.
    assert noise_span_counts(190, 0.15, 3.0)[0] == 29
    assert noise_span_counts(30, 0.15, 3.0) == (4, 1)
    assert noise_span_counts(568, 0.15, 3.0) == (85, 28)
    assert noise_span_counts(0, 0.15, 3.0) == (0, 0)
    assert noise_span_counts(1, 0.15, 3.0) == (0, 0)
    assert noise_span_counts(2, 0.15, 3.0) == (1, 1)
    assert noise_span_counts(100, 0.0, 3.0) == (0, 0)


@pytest.mark.parametrize(("density", "mean"), [(0.15, 3.0), (0.1, 2.0), (0.25, 8.0), (0.5, 3.0), (0.15, 1.0)])
def test_length_helper_is_exact_for_every_length(density: float, mean: float):
    # The raw length it gives yields exactly the inputs asked for (T5's 0.5 rule may give one less).
    sc = SpanCorruption(
        sentinel_id=10_000, num_sentinels=10_000, noise_density=density, mean_noise_span_length=mean
    )
    for inputs_length in range(1, 700):
        raw, targets = span_corruption_lengths(inputs_length, density, mean)
        widths = sc.output_widths(raw)
        if density == 0.5:
            assert widths[0] in (inputs_length, inputs_length - 1) and widths[1] <= targets
        else:
            assert widths == (inputs_length, targets)
        n, s = noise_span_counts(raw + 1, density, mean)
        assert raw + 1 - n + s + 1 > inputs_length or density == 0.5  # the largest raw length


@pytest.mark.parametrize(
    "bad", [(-0.1, 3.0), (1.0, 3.0), (0.15, 0.5), (0.15, float("nan")), (float("nan"), 3.0)]
)
def test_bad_span_arguments_raise(bad):
    with pytest.raises(LmlabError):
        span_corruption_lengths(512, *bad)
    with pytest.raises(LmlabError):
        random_spans_noise_mask(2, 10, *bad)


@settings(max_examples=60, deadline=None)
@given(
    B=st.integers(0, 5),
    L=st.integers(0, 300),
    density=st.sampled_from([0.05, 0.15, 0.3, 0.5, 0.7]),
    mean=st.sampled_from([1.0, 2.5, 3.0, 10.0]),
    seed=st.integers(0, 2**31),
)
def test_random_spans_mask_follows_t5_law(B, L, density, mean, seed):
    g = torch.Generator().manual_seed(seed)
    mask = random_spans_noise_mask(B, L, density, mean, generator=g)
    assert mask.shape == (B, L) and mask.dtype == torch.bool
    n, s = noise_span_counts(L, density, mean)
    for row in mask.tolist():
        r = runs(row)
        assert sum(row) == n
        assert sum(1 for v, _ in r if v) == s
        if s:
            assert [v for v, _ in r] == [False, True] * s  # alternate, non-noise first, noise last


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 120), min_size=1, max_size=6),
    pad=st.integers(0, 10),
    law=st.sampled_from(["spans", "iid"]),
    seed=st.integers(0, 2**31),
)
def test_ragged_rows_follow_their_own_length(lengths, pad, law, seed):
    L = max(lengths) + pad
    lt = torch.tensor(lengths)
    g = torch.Generator().manual_seed(seed)
    if law == "spans":
        mask = random_spans_noise_mask(len(lengths), L, lengths=lt, generator=g)
    else:
        mask = iid_noise_mask(len(lengths), L, 0.5, lengths=lt, generator=g)
    for row, length in zip(mask.tolist(), lengths, strict=True):
        assert not any(row[length:])
        if law == "spans":
            n, s = noise_span_counts(length, 0.15, 3.0)
            assert sum(row) == n and sum(1 for v, _ in runs(row[:length]) if v) == s


def test_segmentation_is_uniform_over_all_masks():
    # L=8, density 0.5, mean 2: 4 noise tokens in 2 spans (3 ways) and 4 others in 2 runs (3 ways):
    # 9 masks, each with probability 1/9.
    g = torch.Generator().manual_seed(0)
    masks = random_spans_noise_mask(18_000, 8, 0.5, 2.0, generator=g)
    counts = collections.Counter(tuple(r) for r in masks.int().tolist())
    assert len(counts) == 9
    for c in counts.values():
        assert abs(c - 2000) < 200  # sd ~ 42


def test_span_lengths_follow_the_uniform_composition_law():
    # A uniform composition of n into s parts: P(part = k) = C(n-k-1, s-2) / C(n-1, s-1).
    L, density, mean = 200, 0.15, 3.0
    n, s = noise_span_counts(L, density, mean)  # 30 noise tokens, 10 spans
    g = torch.Generator().manual_seed(1)
    mask = random_spans_noise_mask(4000, L, density, mean, generator=g)
    hist = collections.Counter(k for row in mask.tolist() for v, k in runs(row) if v)
    total = sum(hist.values())
    assert total == 4000 * s
    for k in range(1, 8):
        p = math.comb(n - k - 1, s - 2) / math.comb(n - 1, s - 1)
        assert abs(hist[k] / total - p) < 4 * math.sqrt(p * (1 - p) / total) + 1e-3
    # Mean span length over many draws: n / s = 3 within 5%.
    assert abs(total and sum(k * c for k, c in hist.items()) / total - mean) < 0.05 * mean


def test_vectorised_mask_matches_reference_distribution():
    # Same law as the per-example reference: compare where the first noise token falls.
    L, reps = 40, 20_000
    g = torch.Generator().manual_seed(2)
    mask = random_spans_noise_mask(reps, L, 0.15, 3.0, generator=g)
    first = collections.Counter(mask.int().argmax(dim=1).tolist())
    rng = random.Random(2)
    first_ref = collections.Counter(
        ref.random_spans_noise_mask(L, 0.15, 3.0, rng).index(True) for _ in range(reps)
    )
    for k in set(first) | set(first_ref):
        assert abs(first[k] - first_ref[k]) < 5 * math.sqrt(max(first[k], first_ref[k], 25))


def test_iid_density_and_run_length():
    g = torch.Generator().manual_seed(3)
    mask = iid_noise_mask(4000, 1000, 0.15, generator=g)
    frac = mask.float().mean().item()
    assert abs(frac - 0.15) < 0.005 * 0.15  # ±0.5% (the sd over 4e6 tokens is 0.12%)
    # Mean run length of i.i.d. noise is 1 / (1 - p).
    starts = (mask[:, 1:] & ~mask[:, :-1]).sum() + mask[:, 0].sum()
    mean_run = mask.sum().item() / starts.item()
    assert abs(mean_run - 1 / 0.85) < 0.05 / 0.85


def test_same_seed_same_mask_and_segmentation_order():
    a = random_spans_noise_mask(8, 100, generator=torch.Generator().manual_seed(7))
    b = random_spans_noise_mask(8, 100, generator=torch.Generator().manual_seed(7))
    c = random_spans_noise_mask(8, 100, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    A, C = random_span_segmentation(8, 100, generator=torch.Generator().manual_seed(7))
    assert A.shape == C.shape == (8, 6) and (A[:, -1] == 85).all() and (C[:, -1] == 15).all()
    assert (A.diff(dim=1) > 0).all() and (C.diff(dim=1) > 0).all()


@pytest.mark.parametrize(
    ("k", "n", "tight"), [(2, 40, False), (2, 40, True), (3, 200, False), (27, 481, False)]
)
def test_distinct_draws_give_uniform_subsets(k, n, tight, monkeypatch):
    # The fast segmentation draw: sorted, distinct, and every k-subset (or every value) equally
    # likely; ``tight`` makes exactly k draws a row so that many rows are drawn again.
    from lmlab.objectives import noise

    if tight:
        monkeypatch.setattr(noise, "_draws_for_distinct", lambda k, n: k)
    rows = 60_000 if k < 27 else 4000
    out = noise._distinct_sorted(k, n, rows, torch.Generator().manual_seed(k), torch.device("cpu"))
    assert out is not None and out.shape == (rows, k)
    assert (out.diff(dim=1) > 0).all() and out.min() >= 0 and out.max() < n
    if k == 2:
        counts = collections.Counter(map(tuple, out.tolist()))
        assert len(counts) == math.comb(n, 2)
        expected = rows / math.comb(n, 2)
        assert all(abs(c - expected) < 5 * math.sqrt(expected) for c in counts.values())
    # Each value is in the subset with probability k / n.
    freq = torch.bincount(out.flatten(), minlength=n).float() / rows
    assert (freq - k / n).abs().max() < 5 * math.sqrt(k / n / rows)
