"""BERT's masked LM and T5's BERT-style / MASS-style objectives."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmlab.errors import LmlabError
from lmlab.objectives import IGNORE_INDEX, BertMLM, BertStyle, MassStyle
from lmlab.objectives import reference as ref

V = 1000
SPECIALS = (0, 1, 2, 3, *range(V - 100, V))  # lmlab's layout: pad, eos, unk, mask, 100 sentinels
ORDINARY = (4, V - 100)


def mlm(**kw) -> BertMLM:
    return BertMLM(vocab_size=V, mask_id=3, pad_id=0, special_ids=SPECIALS, **kw)


def split_counts(tokens: torch.Tensor, batch: dict[str, torch.Tensor], mask_id: int = 3):
    """(selected, masked, random, unchanged) counts from a batch and its raw tokens."""
    selected = batch["labels"] != IGNORE_INDEX
    masked = selected & (batch["input_ids"] == mask_id)
    unchanged = selected & (batch["input_ids"] == tokens)
    random_ = selected & ~masked & ~unchanged
    return selected.sum().item(), masked.sum().item(), random_.sum().item(), unchanged.sum().item()


def test_bert_80_10_10_within_one_percent_over_a_million_tokens():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(*ORDINARY, (2048, 512), generator=gen)  # 1,048,576 ordinary tokens
    batch = mlm()(tokens, generator=gen)
    sel, masked, rand, same = split_counts(tokens, batch)
    assert abs(sel / tokens.numel() - 0.15) < 0.01 * 0.15
    # A random replacement equal to the original (1 in 896) counts as unchanged here.
    assert abs(masked / sel - 0.8) < 0.01
    assert abs(rand / sel - 0.1 * (1 - 1 / 896)) < 0.01
    assert abs(same / sel - (0.1 + 0.1 / 896)) < 0.01
    # Labels: the original id where selected, -100 elsewhere.
    selected = batch["labels"] != IGNORE_INDEX
    assert torch.equal(batch["labels"][selected], tokens[selected])
    assert torch.equal(batch["input_ids"][~selected], tokens[~selected])
    # Random replacements are ordinary ids, spread over the whole ordinary range.
    replaced = selected & (batch["input_ids"] != 3) & (batch["input_ids"] != tokens)
    r = batch["input_ids"][replaced]
    assert r.min() >= ORDINARY[0] and r.max() < ORDINARY[1]
    assert torch.bincount(r - ORDINARY[0], minlength=896).gt(0).float().mean() > 0.99


def test_t5_preset_is_90_10_0_and_mass_is_all_mask():
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(*ORDINARY, (512, 512), generator=gen)
    sel, masked, rand, same = split_counts(
        tokens, mlm(mask_replace_prob=0.9, random_replace_prob=0.1)(tokens, generator=gen)
    )
    assert abs(masked / sel - 0.9) < 0.01 and abs(rand / sel - 0.1) < 0.01 and same / sel < 0.002
    batch = MassStyle(vocab_size=V, special_ids=SPECIALS)(tokens, generator=gen)
    corrupted = batch["input_ids"] != tokens
    assert (batch["input_ids"][corrupted] == 3).all()
    assert abs(corrupted.float().mean().item() - 0.15) < 0.003


def test_specials_and_padding_are_never_selected():
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, V, (256, 128), generator=gen)  # specials everywhere
    lengths = torch.randint(0, 129, (256,), generator=gen)
    mask = (torch.arange(128) < lengths[:, None]).long()
    for objective in (
        mlm(mlm_probability=0.9),
        BertStyle(vocab_size=V, special_ids=SPECIALS, noise_density=0.9),
    ):
        batch = objective(tokens, attention_mask=mask, generator=gen)
        special = torch.isin(tokens, torch.tensor(SPECIALS))
        valid = mask.bool()
        changed = batch["input_ids"] != tokens
        assert not (changed & special & valid).any()
        assert (batch["input_ids"][~valid] == 0).all()  # padding comes out as pad
        new = batch["input_ids"][changed & valid]
        assert not torch.isin(new[new != 3], torch.tensor(SPECIALS)).any()
        if isinstance(objective, BertMLM):
            assert (batch["labels"][special | ~valid] == IGNORE_INDEX).all()
            assert abs((batch["labels"] != IGNORE_INDEX).sum() / (valid & ~special).sum() - 0.9) < 0.02
        assert torch.equal(batch["attention_mask"], mask)


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 64), min_size=1, max_size=5),
    pad=st.integers(0, 3),
    seed=st.integers(0, 2**31),
    kind=st.sampled_from(["bert", "bert-style", "mass"]),
)
def test_shapes_ranges_and_purity(lengths, pad, seed, kind):
    B, L = len(lengths), max(lengths) + pad
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B, L), generator=gen)
    mask = (torch.arange(L) < torch.tensor(lengths)[:, None]).long()
    objective = {"bert": mlm(), "bert-style": BertStyle(V, special_ids=SPECIALS), "mass": MassStyle(V)}[kind]
    before = tokens.clone()
    batch = objective(tokens, attention_mask=mask, generator=gen)
    assert torch.equal(tokens, before)
    for k, v in batch.items():
        assert v.shape == (B, L) and v.dtype == torch.long, k
    assert ((batch["input_ids"] >= 0) & (batch["input_ids"] < V)).all()
    if kind != "bert":
        # The target is the whole original row; padding is -100 / pad.
        valid = mask.bool()
        assert torch.equal(batch["labels"], tokens.masked_fill(~valid, IGNORE_INDEX))
        dec = batch["decoder_input_ids"]
        assert (dec[:, :1] == 0).all() and torch.equal(dec[:, 1:], tokens.masked_fill(~valid, 0)[:, :-1])
    assert BertStyle.architectures == MassStyle.architectures == ("encoder-decoder",)
    assert BertMLM.architectures == ("encoder",)


def test_same_seed_same_batch():
    tokens = torch.randint(*ORDINARY, (8, 64))
    a = mlm()(tokens, generator=torch.Generator().manual_seed(5))
    b = mlm()(tokens, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("L", [0, 1, 2, 3])
def test_tiny_rows(L):
    tokens = torch.full((4, L), 10)
    for objective in (mlm(mlm_probability=1.0), BertStyle(V), MassStyle(V)):
        batch = objective(tokens, generator=torch.Generator().manual_seed(0))
        assert all(v.shape == (4, L) for v in batch.values())


def test_non_contiguous_specials_use_a_table():
    # Specials in the middle of the vocabulary (e.g. a BPE tokenizer's added tokens).
    objective = BertMLM(
        vocab_size=50,
        mask_id=20,
        pad_id=0,
        special_ids=(10, 30),
        mlm_probability=1.0,
        mask_replace_prob=0.0,
        random_replace_prob=1.0,
    )
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50, (64, 64), generator=gen)
    batch = objective(tokens, generator=gen)
    special = torch.isin(tokens, torch.tensor([0, 10, 20, 30]))
    assert torch.equal(batch["input_ids"][special], tokens[special])
    assert not torch.isin(batch["input_ids"][~special], torch.tensor([0, 10, 20, 30])).any()
    assert (batch["labels"][~special] != IGNORE_INDEX).all()


def test_bad_arguments_raise():
    with pytest.raises(LmlabError):
        mlm(mlm_probability=1.5)
    with pytest.raises(LmlabError):
        mlm(mask_replace_prob=0.8, random_replace_prob=0.3)
    with pytest.raises(LmlabError):
        BertMLM(vocab_size=4, special_ids=(0, 1, 2, 3))
    with pytest.raises(LmlabError, match="outside"):
        mlm()(torch.tensor([[5, V]]))


def test_distribution_matches_reference():
    # The per-example reference and the vectorised path draw the same law.
    gen = torch.Generator().manual_seed(6)
    tokens = torch.randint(0, V, (256, 256), generator=gen)
    fast = split_counts(tokens, mlm()(tokens, generator=gen))
    slow = split_counts(
        tokens,
        ref.bert_mlm_batch(tokens, random.Random(6), special_ids=set(SPECIALS), vocab_size=V, mask_id=3),
    )
    for f, s in zip(fast, slow, strict=True):
        assert abs(f - s) < 5 * max(f, s) ** 0.5 + 5


@pytest.mark.peer
def test_hf_collator_agrees_on_the_split(hf_tokenizer):
    transformers = pytest.importorskip("transformers")
    collator = transformers.DataCollatorForLanguageModeling(
        hf_tokenizer, mlm_probability=0.15, return_tensors="pt"
    )
    objective = BertMLM.from_tokenizer(hf_tokenizer)
    torch.manual_seed(0)
    lo, hi = 4, len(hf_tokenizer) - 100
    tokens = torch.randint(lo, hi, (256, 256))
    theirs = collator([{"input_ids": row} for row in tokens.tolist()])
    ours = objective(tokens, generator=torch.Generator().manual_seed(0))
    a, b = split_counts(tokens, ours), split_counts(tokens, {k: theirs[k] for k in ("input_ids", "labels")})
    assert abs(a[0] - b[0]) < 5 * a[0] ** 0.5
    assert abs(a[1] / a[0] - b[1] / b[0]) < 0.02
