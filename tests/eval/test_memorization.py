"""Memorization (Carlini et al. 2023 §2; Pythia §3): window sampling, batched greedy decoding against
the plain loop, the T5 framing against span corruption, and a model trained to memorize."""

from __future__ import annotations

import copy
import itertools
import json
import math
from collections import Counter

import numpy as np
import pytest
import torch

from lmlab.errors import LmlabError
from lmlab.eval.extraction import (
    SplitMemorization,
    _seq2seq_inputs,
    greedy_continuations,
    memorization,
    memorization_scores,
    sample_offsets,
    split_seed,
)

SENTINEL = 1023  # <extra_id_0> of the 1024-id eval tokenizer
EOS = 1


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are so small that a second intra-op thread only adds synchronisation, and on a
    busy 2-core machine OpenMP's spinning makes them many times slower; torch's setting is restored."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# sample_offsets


@pytest.mark.parametrize(
    "n,length,samples", [(1000, 64, 10), (1000, 64, 15), (1000, 64, 16), (100, 7, 50), (64, 64, 3), (5, 1, 5)]
)
def test_sample_offsets_properties(n, length, samples):
    for seed in range(20):
        o = sample_offsets(n, length, samples, seed)
        assert o.dtype == np.int64
        assert len(o) == min(samples, n // length)
        assert (o >= 0).all() and (o + length <= n).all()
        assert (np.diff(o) >= length).all()  # sorted, distinct and non-overlapping
        assert np.array_equal(o, sample_offsets(n, length, samples, seed))


def test_sample_offsets_all_windows_when_fewer_fit():
    assert sample_offsets(100, 30, 5, seed=7).tolist() == [0, 30, 60]


def test_sample_offsets_seed_matters_and_placements_are_uniform():
    assert not np.array_equal(sample_offsets(10_000, 32, 8, 0), sample_offsets(10_000, 32, 8, 1))
    # 2 windows of 3 in 10 tokens: C(10 - 2*2, 2) = 15 placements, each 1/15 of 1500 draws = 100.
    counts = Counter(tuple(sample_offsets(10, 3, 2, s).tolist()) for s in range(1500))
    placements = {(a, b) for a, b in itertools.product(range(8), repeat=2) if b >= a + 3}
    assert set(counts) == placements
    assert all(60 < c < 140 for c in counts.values()), counts  # ±40 is ~4 standard deviations


def test_sample_offsets_refuses_bad_inputs():
    with pytest.raises(LmlabError, match="the val split has 10 tokens, fewer than one window of 64"):
        sample_offsets(10, 64, 4, 0, split="val")
    with pytest.raises(LmlabError, match="length > 0 and samples > 0"):
        sample_offsets(100, 0, 4, 0)
    with pytest.raises(LmlabError, match="length > 0 and samples > 0"):
        sample_offsets(100, 8, 0, 0)


def test_split_seeds_differ_and_are_stable():
    assert split_seed(0, "train") != split_seed(0, "val")
    assert split_seed(0, "train") != split_seed(1, "train")
    assert split_seed(3, "val") == split_seed(3, "val")


# ---------------------------------------------------------------------------------------------
# The scores (hand-computed)


def test_scores_golden():
    cont = torch.tensor([[1, 2, 3], [1, 2, 4]])
    true = torch.tensor([[1, 2, 3], [1, 0, 0]])
    exact, partial = memorization_scores(cont, true)
    assert exact.tolist() == [True, False]
    assert partial.tolist() == pytest.approx([1.0, 1 / 3])
    s = SplitMemorization.of(exact, partial, seed=5)
    assert (s.n, s.exact_rate, s.partial_mean, s.seed) == (2, 0.5, pytest.approx(2 / 3), 5)
    assert s.exact_stderr == pytest.approx(math.sqrt(0.25 / 2))
    assert s.partial_stderr == pytest.approx(math.sqrt((1 / 9) / 2))  # population variance 1/9


# ---------------------------------------------------------------------------------------------
# Greedy decoding: fast (generate, KV cache, batched) == reference (plain loop)


def _sharpened(model, seed=0):
    """A copy with large random weights: an untrained tiny model repeats one token, which would let a
    wrong cache or position still match; these continuations vary token to token."""
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 3.0 / p.shape[-1] ** 0.5, generator=g)
    return m


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_fast_equals_reference(tiny_model, family):
    model = _sharpened(tiny_model(family))
    g = torch.Generator().manual_seed(1)
    prefixes = torch.randint(4, 1000, (3, 6), generator=g)
    fast = greedy_continuations(model, prefixes, 6, batch_size=2, sentinel_id=SENTINEL)
    ref = greedy_continuations(model, prefixes, 6, sentinel_id=SENTINEL, impl="reference")
    assert fast.shape == (3, 6) and fast.dtype == torch.int64
    assert torch.equal(fast, ref)
    assert len(set(fast.flatten().tolist())) > 6  # not one repeated token


def test_model_generation_config_cannot_change_greedy(tiny_model):
    # The untrained GPT-2 repeats one token; a model's own generation_config.json (sampling, beams,
    # no_repeat_ngram_size, repetition_penalty) would change that, so generate must be pinned.
    model = copy.deepcopy(tiny_model("gpt2"))
    gc = model.generation_config
    gc.do_sample, gc.temperature, gc.num_beams = True, 0.7, 3
    gc.no_repeat_ngram_size, gc.repetition_penalty = 1, 5.0
    prefixes = torch.randint(4, 1000, (2, 4), generator=torch.Generator().manual_seed(0))
    ref = greedy_continuations(model, prefixes, 5, impl="reference")
    assert len(set(ref[0].tolist())) < 5  # the repetition the settings would have removed
    assert torch.equal(greedy_continuations(model, prefixes, 5), ref)


def test_t5_framing_is_span_corruption_of_the_suffix():
    from lmlab.objectives.span_corruption import replace_noise_spans

    tokens = torch.arange(10, 22).reshape(2, 6)  # [p (4) ‖ s (2)]
    noise = torch.zeros(2, 6, dtype=torch.bool)
    noise[:, 4:] = True
    inputs, _, targets, _ = replace_noise_spans(
        tokens, noise, sentinel_id=SENTINEL, eos_id=EOS, pad_id=0, num_sentinels=100
    )
    enc, dec = _seq2seq_inputs(tokens[:, :4], SENTINEL, EOS, start_id=0)
    assert torch.equal(enc, inputs)  # p <extra_id_0> </s>
    assert targets[:, 0].tolist() == [SENTINEL, SENTINEL] and torch.equal(targets[:, 1:3], tokens[:, 4:])
    assert dec.tolist() == [[0, SENTINEL]] * 2  # the decoder input of those targets, up to the suffix


# ---------------------------------------------------------------------------------------------
# A model that memorized its training rows (the key test)


@pytest.fixture(scope="module")
def memorizer():
    """A fresh 2-layer GPT-2 (vocabulary 64) trained on 8 fixed random rows of 32 tokens until it
    reproduces them; ``</s>`` (1) sits inside every suffix, so decoding must run through it.
    Returns (model, train stream (256,), val stream (256,) of other random ids)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    g = torch.Generator().manual_seed(0)
    rows = torch.randint(4, 64, (16, 32), generator=g)
    rows[:, 21] = EOS
    train, val = rows[:8], rows[8:]
    config = GPT2Config(
        vocab_size=64,
        n_positions=64,
        n_embd=64,
        n_layer=2,
        n_head=2,
        bos_token_id=EOS,
        eos_token_id=EOS,
        loss_type="ForCausalLM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True)
    model.train()
    for _ in range(60):  # exact 1.0 on train at 60 steps for 4 data seeds (checked)
        loss = model(input_ids=train, labels=train).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return model, train.flatten().numpy(), val.flatten().numpy()


def test_memorized_rows_are_extracted_and_val_is_not(memorizer):
    model, train_ids, val_ids = memorizer
    r = memorization(model, None, train_ids, val_ids, prefix=16, suffix=16, samples=64, batch_size=3, seed=0)
    assert r.train.n == 8 and r.val.n == 8  # all 256 // 32 windows: exactly the training rows
    assert r.train.exact_rate >= 0.9 and r.train.partial_mean >= 0.95
    assert r.val.exact_rate == 0.0 and r.val.partial_mean < 0.25  # chance alone is ~1/60 + the </s> column
    d = r.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert (d["prefix"], d["suffix"], d["samples"], d["seed"]) == (16, 16, 64, 0)
    assert d["train"]["seed"] == split_seed(0, "train") and d["val"]["seed"] == split_seed(0, "val")


def test_memorizer_fast_equals_reference(memorizer):
    model, train_ids, _ = memorizer
    w = torch.from_numpy(train_ids).reshape(8, 32)[:3]
    fast = greedy_continuations(model, w[:, :16], 16, batch_size=2)
    assert torch.equal(fast, greedy_continuations(model, w[:, :16], 16, impl="reference"))
    assert (fast[:, 5] == EOS).all()  # the decoding went through </s>


def test_memorization_t5_runs_on_prepared_tokens(tiny_model, eval_data, eval_tokenizer):
    from lmlab.data import load_tokens

    r = memorization(
        tiny_model("t5"),
        eval_tokenizer,
        load_tokens(eval_data, "train"),
        load_tokens(eval_data, "val"),
        prefix=8,
        suffix=4,
        samples=3,
        batch_size=2,
        seed=1,
    )
    assert r.train.n == 3 and r.val.n == 3
    for s in (r.train, r.val):
        assert 0.0 <= s.exact_rate <= s.partial_mean <= 1.0  # an extracted window scores 1.0


def test_memorization_refuses_bad_inputs(tiny_model, eval_tokenizer, memorizer):
    model, train_ids, val_ids = memorizer
    with pytest.raises(LmlabError, match="needs a generative model: causal or T5"):
        memorization(tiny_model("bert"), eval_tokenizer, train_ids, val_ids, prefix=4, suffix=4)
    for bad in ({"prefix": 0}, {"suffix": -1}, {"samples": 0}):
        with pytest.raises(LmlabError, match="must be > 0"):
            memorization(model, None, train_ids, val_ids, **bad)
    with pytest.raises(LmlabError, match="the val split has 10 tokens"):
        memorization(model, None, train_ids, val_ids[:10], prefix=8, suffix=8)
    with pytest.raises(LmlabError, match="the model has 64"):
        memorization(model, None, train_ids, val_ids, prefix=40, suffix=40)
    with pytest.raises(LmlabError, match="outside the model's vocabulary"):
        memorization(model, None, train_ids + 64, None, prefix=8, suffix=8, samples=2)
