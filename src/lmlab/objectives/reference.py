"""Plain per-example reference implementations: the tests' oracle and the benchmark's baseline.

Written to be obviously right rather than fast: Python lists, one example and one token at a
time, following the papers' words (Raffel et al. 2020 §3.1.4 and §3.3, Table 3; Devlin et al.
2019 §3.1).  Randomness comes from a ``random.Random`` so that nothing is shared with the
vectorised code.
"""

from __future__ import annotations

import random
from itertools import pairwise

import numpy as np
import torch

from lmlab.objectives.base import IGNORE_INDEX


def noise_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """T5's counts for one row: noise tokens and noise spans (float32, round half to even)."""
    if noise_density == 0.0 or length < 2:
        return 0, 0
    f32 = np.float32
    # At least one noise token and one kept token; at least one span, each of them non-empty.
    num_noise = sorted([1, int(np.round(f32(length) * f32(noise_density))), length - 1])[1]
    spans = int(np.round(f32(num_noise) / f32(mean_noise_span_length)))
    return num_noise, min(max(spans, 1), num_noise, length - num_noise)


def random_segmentation(num_items: int, num_segments: int, rng: random.Random) -> list[int]:
    """Split ``num_items`` into ``num_segments`` positive parts, every split equally likely."""
    cuts = sorted(rng.sample(range(1, num_items), num_segments - 1))
    bounds = [0, *cuts, num_items]
    return [b - a for a, b in pairwise(bounds)]


def random_spans_noise_mask(
    length: int, noise_density: float, mean_noise_span_length: float, rng: random.Random
) -> list[bool]:
    """One row of T5's span noise: non-noise and noise runs alternate, non-noise first."""
    num_noise, num_spans = noise_counts(length, noise_density, mean_noise_span_length)
    if num_spans == 0:
        return [False] * length
    noise_lengths = random_segmentation(num_noise, num_spans, rng)
    nonnoise_lengths = random_segmentation(length - num_noise, num_spans, rng)
    mask: list[bool] = []
    for keep, drop in zip(nonnoise_lengths, noise_lengths, strict=True):
        mask += [False] * keep + [True] * drop
    return mask


def iid_noise_mask(length: int, noise_density: float, rng: random.Random) -> list[bool]:
    return [rng.random() < noise_density for _ in range(length)]


def span_corruption(
    tokens: list[int], noise: list[bool], sentinel_id: int, eos_id: int
) -> tuple[list[int], list[int]]:
    """T5's "replace corrupted spans" for one row: ``(inputs, targets)``, both ending in EOS."""
    inputs: list[int] = []
    targets: list[int] = []
    sentinel = sentinel_id
    for i, (token, is_noise) in enumerate(zip(tokens, noise, strict=True)):
        starts_span = is_noise and (i == 0 or not noise[i - 1])
        if starts_span:
            inputs.append(sentinel)
            targets.append(sentinel)
            sentinel -= 1
        if is_noise:
            targets.append(token)
        else:
            inputs.append(token)
    return inputs + [eos_id], targets + [eos_id]


def drop_tokens(tokens: list[int], noise: list[bool], eos_id: int) -> tuple[list[int], list[int]]:
    """T5's "drop corrupted tokens" for one row: ``(kept + EOS, dropped + EOS)``."""
    kept = [t for t, z in zip(tokens, noise, strict=True) if not z]
    dropped = [t for t, z in zip(tokens, noise, strict=True) if z]
    return kept + [eos_id], dropped + [eos_id]


def merge_on_sentinels(
    inputs: list[int], targets: list[int], sentinel_ids: set[int], eos_id: int
) -> list[int]:
    """Undo span corruption: put each target span back in place of its sentinel in the inputs.

    Both rows end in EOS, which is dropped (an EOS id inside the text is kept).
    """
    inputs = inputs[:-1] if inputs and inputs[-1] == eos_id else inputs
    targets = targets[:-1] if targets and targets[-1] == eos_id else targets
    spans: dict[int, list[int]] = {}
    current: list[int] | None = None
    for t in targets:
        if t in sentinel_ids:
            current = spans.setdefault(t, [])
        elif current is not None:
            current.append(t)
    out: list[int] = []
    for t in inputs:
        if t in sentinel_ids:
            out.extend(spans.get(t, []))
        else:
            out.append(t)
    return out


def bert_mlm(
    tokens: list[int],
    rng: random.Random,
    *,
    special_ids: set[int],
    vocab_size: int,
    mask_id: int,
    mlm_probability: float = 0.15,
    mask_replace_prob: float = 0.8,
    random_replace_prob: float = 0.1,
) -> tuple[list[int], list[int]]:
    """BERT's masking for one row: ``(inputs, labels)``, labels -100 on unselected tokens."""
    ordinary = [i for i in range(vocab_size) if i not in special_ids]
    inputs, labels = [], []
    for t in tokens:
        if t in special_ids or rng.random() >= mlm_probability:
            inputs.append(t)
            labels.append(IGNORE_INDEX)
            continue
        labels.append(t)
        r = rng.random()
        if r < mask_replace_prob:
            inputs.append(mask_id)
        elif r < mask_replace_prob + random_replace_prob:
            inputs.append(rng.choice(ordinary))
        else:
            inputs.append(t)
    return inputs, labels


def pad_rows(rows: list[list[int]], fill: int) -> torch.Tensor:
    """Right-pad a list of rows into a ``(B, max len)`` int64 tensor."""
    width = max((len(r) for r in rows), default=0)
    return torch.tensor([r + [fill] * (width - len(r)) for r in rows], dtype=torch.long).view(
        len(rows), width
    )


def span_corruption_batch(
    tokens: torch.Tensor,
    rng: random.Random,
    *,
    sentinel_id: int,
    eos_id: int = 1,
    pad_id: int = 0,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
) -> dict[str, torch.Tensor]:
    """Span corruption of a ``(B, L)`` batch, one row at a time (the benchmark's baseline)."""
    ins, tgts = [], []
    for row in tokens.tolist():
        noise = random_spans_noise_mask(len(row), noise_density, mean_noise_span_length, rng)
        i, t = span_corruption(row, noise, sentinel_id, eos_id)
        ins.append(i)
        tgts.append(t)
    inputs, targets = pad_rows(ins, pad_id), pad_rows(tgts, IGNORE_INDEX)
    decoder_input_ids = torch.cat([targets.new_full((len(tgts), 1), pad_id), targets[:, :-1]], dim=1)
    return {
        "input_ids": inputs,
        "attention_mask": pad_rows([[1] * len(i) for i in ins], 0),
        "labels": targets,
        "decoder_input_ids": decoder_input_ids.masked_fill(decoder_input_ids == IGNORE_INDEX, pad_id),
    }


def bert_mlm_batch(
    tokens: torch.Tensor,
    rng: random.Random,
    *,
    special_ids: set[int],
    vocab_size: int,
    mask_id: int,
    **kw: float,
) -> dict[str, torch.Tensor]:
    """BERT masking of a ``(B, L)`` batch, one row at a time (the benchmark's baseline)."""
    rows = [
        bert_mlm(row, rng, special_ids=special_ids, vocab_size=vocab_size, mask_id=mask_id, **kw)
        for row in tokens.tolist()
    ]
    return {
        "input_ids": pad_rows([r[0] for r in rows], 0),
        "attention_mask": torch.ones(tokens.shape, dtype=torch.long),
        "labels": pad_rows([r[1] for r in rows], IGNORE_INDEX),
    }
