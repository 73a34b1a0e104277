"""Prefix LM, deshuffling and next-token prediction."""

from __future__ import annotations

import collections
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmlab.objectives import IGNORE_INDEX, CausalLM, Deshuffle, PrefixLM
from lmlab.objectives.language_modeling import random_split_points


def ragged(lengths: list[int], pad: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(lengths) + pad
    tokens = torch.randint(0, 500, (len(lengths), L), generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(L) < torch.tensor(lengths)[:, None]).long()
    return tokens, mask


# Ragged batches: row lengths, extra padding columns and a seed, as ragged() takes them.
RAGGED = {
    "lengths": st.lists(st.integers(0, 50), min_size=1, max_size=5),
    "pad": st.integers(0, 3),
    "seed": st.integers(0, 2**31),
}


@settings(max_examples=50, deadline=None)
@given(**RAGGED)
def test_prefix_lm_splits_and_reassembles(lengths, pad, seed):
    tokens, mask = ragged(lengths, pad, seed)
    before = tokens.clone()
    batch = PrefixLM()(tokens, attention_mask=mask, generator=torch.Generator().manual_seed(seed))
    gpt = PrefixLM(decoder_only=True)(
        tokens, attention_mask=mask, generator=torch.Generator().manual_seed(seed)
    )
    assert torch.equal(tokens, before)
    B, L = tokens.shape
    for v in (*batch.values(), *gpt.values()):
        assert v.shape == (B, L)
    for b, n in enumerate(lengths):
        k = int(batch["attention_mask"][b].sum())
        target = [t for t in batch["labels"][b].tolist() if t != IGNORE_INDEX]
        assert batch["input_ids"][b, :k].tolist() + target == tokens[b, :n].tolist()
        assert (k >= 1 and len(target) >= 1) or n <= 1  # both parts non-empty from 2 tokens on
        assert (batch["input_ids"][b, k:] == 0).all()
        # Decoder-only: the same split, loss on the continuation only.
        labels = gpt["labels"][b].tolist()
        assert labels == [IGNORE_INDEX] * k + tokens[b, k:n].tolist() + [IGNORE_INDEX] * (L - n)
        assert gpt["attention_mask"][b].tolist() == [1] * n + [0] * (L - n)
        assert gpt["prefix_mask"][b].tolist() == [1] * min(k, n) + [0] * (L - min(k, n))
        assert gpt["input_ids"][b, :n].tolist() == tokens[b, :n].tolist()
    dec = batch["decoder_input_ids"]
    assert (dec[:, :1] == 0).all() and torch.equal(dec[:, 1:], batch["labels"][:, :-1].clamp_min(0))


def test_prefix_split_is_uniform():
    # T5: the prefix length is uniform in [1, L - 1].
    splits = random_split_points(torch.full((60_000,), 7), torch.Generator().manual_seed(0))
    counts = collections.Counter(splits.tolist())
    assert sorted(counts) == [1, 2, 3, 4, 5, 6]
    assert all(abs(c - 10_000) < 500 for c in counts.values())
    assert random_split_points(torch.tensor([0, 1, 2])).tolist() == [0, 0, 1]


@settings(max_examples=50, deadline=None)
@given(**RAGGED)
def test_deshuffle_is_a_permutation_of_each_row(lengths, pad, seed):
    tokens, mask = ragged(lengths, pad, seed)
    batch = Deshuffle()(tokens, attention_mask=mask, generator=torch.Generator().manual_seed(seed))
    for b, n in enumerate(lengths):
        assert sorted(batch["input_ids"][b, :n].tolist()) == sorted(tokens[b, :n].tolist())
        assert (batch["input_ids"][b, n:] == 0).all()
        assert batch["labels"][b].tolist() == tokens[b, :n].tolist() + [IGNORE_INDEX] * (tokens.shape[1] - n)


def test_deshuffle_permutations_are_uniform():
    tokens = torch.tensor([[10, 11, 12]]).repeat(24_000, 1)
    batch = Deshuffle()(tokens, generator=torch.Generator().manual_seed(0))
    counts = collections.Counter(tuple(r) for r in batch["input_ids"].tolist())
    assert set(counts) == set(itertools.permutations([10, 11, 12]))
    assert all(abs(c - 4000) < 300 for c in counts.values())


@pytest.mark.parametrize("L", [0, 1, 2, 3])
def test_tiny_rows(L):
    tokens = torch.arange(5, 5 + 2 * L).view(2, L)
    for objective in (PrefixLM(), PrefixLM(decoder_only=True), Deshuffle(), CausalLM()):
        batch = objective(tokens, generator=torch.Generator().manual_seed(0))
        assert all(v.shape == (2, L) for v in batch.values())


def test_causal_lm():
    tokens, mask = ragged([5, 3, 0], 1, 0)
    batch = CausalLM()(tokens, attention_mask=mask)
    assert torch.equal(batch["labels"], tokens.masked_fill(mask == 0, IGNORE_INDEX))
    assert torch.equal(batch["input_ids"], tokens.masked_fill(mask == 0, 0))
    assert torch.equal(batch["attention_mask"], mask)
    full = CausalLM()(tokens)
    assert torch.equal(full["labels"], tokens) and full["labels"].data_ptr() != tokens.data_ptr()
    assert full["input_ids"].data_ptr() != tokens.data_ptr()


def test_contract_attributes():
    assert CausalLM.architectures == ("decoder",)
    assert PrefixLM.architectures == ("encoder-decoder", "decoder")
    assert Deshuffle.architectures == ("encoder-decoder",)
    for objective in (CausalLM(), PrefixLM(), PrefixLM(decoder_only=True), Deshuffle()):
        assert objective.raw_length(512) == 512
    assert PrefixLM(decoder_only=True).targets_length(512) is None and CausalLM().targets_length(512) is None
    assert PrefixLM().targets_length(512) == 512 == Deshuffle().targets_length(512)
