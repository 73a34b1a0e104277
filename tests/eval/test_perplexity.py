"""Sliding-window perplexity: the window plan, its batches, and the result against an independent
recomputation written as Hugging Face's perplexity guide writes it (one window at a time, batch 1,
the model's plain forward and ``F.cross_entropy``)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lmlab.errors import LmlabError
from lmlab.eval.causal import (
    Window,
    default_max_length,
    perplexity,
    window_batches,
    window_plan,
    windowed_text,
)
from lmlab.eval.text import causal_stream, encode_documents, load_eval_text, text_stats

L = 32  # the window of the model tests (the tiny models have 1024 / 2048 positions)


@pytest.fixture(scope="module")
def docs(eval_corpus) -> list[str]:
    """Three documents of the fixture corpus, about 250 tokens of real text."""
    paras = [p.strip() for p in eval_corpus.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    return [p[:500].rsplit(" ", 1)[0] for p in paras[:3]]


@pytest.fixture(scope="module")
def stream(docs, eval_tokenizer) -> np.ndarray:
    return causal_stream(eval_tokenizer, encode_documents(eval_tokenizer, docs))


# --- the plan ---------------------------------------------------------------------------------


def test_window_plan_golden():
    assert window_plan(10, 4, 2) == [Window(0, 4, 1), Window(2, 6, 4), Window(4, 8, 6), Window(6, 10, 8)]
    assert window_plan(9, 4, 3) == [Window(0, 4, 1), Window(3, 7, 4), Window(6, 9, 7)]
    # Disjoint windows: each later one starts a token early, its one token of context.
    assert window_plan(10, 4, 4) == [Window(0, 4, 1), Window(3, 7, 4), Window(6, 10, 7)]
    assert window_plan(3, 8, 4) == [Window(0, 3, 1)]


@settings(max_examples=150, deadline=None)
@given(st.integers(2, 300), st.integers(2, 48), st.data())
def test_window_plan_scores_each_position_once(n, length, data):
    stride = data.draw(st.integers(1, length))
    plan = window_plan(n, length, stride)
    counts = np.zeros(n, dtype=np.int64)
    context = max(length - stride, 1)
    for w in plan:
        assert 0 <= w.begin < w.score_from < w.end <= n and w.end - w.begin <= length
        counts[w.score_from : w.end] += 1
        # Every scored position sees at least min(position, max_length - stride) earlier tokens.
        assert w.score_from - w.begin >= min(w.score_from, context)
    assert counts[0] == 0 and (counts[1:] == 1).all()
    assert plan[-1].end == n
    assert [w.begin for w in plan] == sorted({w.begin for w in plan})


@pytest.mark.parametrize(
    "args, msg",
    [
        ((100, 1, 1), "max_length must be at least 2"),
        ((100, 8, 0), "stride must be positive"),
        ((100, 8, -2), "stride must be positive"),
        ((100, 8, 9), "stride 9 exceeds max_length 8"),
        ((1, 8, 4), "the text has 1 token"),
    ],
)
def test_window_plan_refuses(args, msg):
    with pytest.raises(LmlabError, match=msg) as e:
        window_plan(*args)
    assert "\n" not in str(e.value)


def test_window_batches_pad_and_mask():
    ids = torch.arange(100, 110)
    plan = window_plan(10, 4, 3)  # (0,4,1) (3,7,4) (6,10,7)
    (b,) = list(window_batches(ids, plan, batch_size=8, pad_id=0))
    assert b["input_ids"].tolist() == [[100, 101, 102, 103], [103, 104, 105, 106], [106, 107, 108, 109]]
    assert b["labels"].tolist() == [[-100, 101, 102, 103], [-100, 104, 105, 106], [-100, 107, 108, 109]]
    assert b["attention_mask"].tolist() == [[1] * 4] * 3
    # (0,6,1) (3,9,6) (6,10,9): the last one is shorter and padded.
    (b,) = window_batches(ids, window_plan(10, 6, 3), batch_size=3, pad_id=7)
    assert b["labels"][1].tolist() == [-100, -100, -100, 106, 107, 108]
    assert b["input_ids"][2].tolist() == [106, 107, 108, 109, 7, 7]
    assert b["attention_mask"].tolist() == [[1] * 6, [1] * 6, [1, 1, 1, 1, 0, 0]]
    assert b["labels"][2].tolist() == [-100, -100, -100, 109, -100, -100]
    assert [len(x["input_ids"]) for x in window_batches(ids, window_plan(10, 6, 3), 2, 0)] == [2, 1]
    assert ids.tolist() == list(range(100, 110))  # the input is not modified


# --- against an independent recomputation -----------------------------------------------------


def _guide_nll(model, ids: np.ndarray, max_length: int, stride: int) -> tuple[float, int]:
    """The Hugging Face guide's loop: windows from ``range(0, n, stride)``, ``trg_len`` new tokens
    labelled, the rest -100; batch 1, the model's own forward, cross-entropy of the shifted labels."""
    x = torch.from_numpy(ids)[None]
    n = x.shape[1]
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        trg_len = end - prev_end
        input_ids = x[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            logits = model(input_ids=input_ids).logits.float()
        shift_logits, shift_labels = logits[0, :-1], target_ids[0, 1:]
        nll += F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum").item()
        count += int((shift_labels != -100).sum())
        prev_end = end
        if end == n:
            break
    return nll, count


def _rolling_nll(model, ids: np.ndarray, max_length: int) -> tuple[float, int]:
    """lm-eval-harness-style disjoint windows: each predicts the tokens after the previous one's,
    with that one's last token as its only context."""
    x = torch.from_numpy(ids)
    n = x.shape[0]
    nll, count, done = 0.0, 0, 1  # position 0 (the start token) is context only
    while done < n:
        begin = max(done - 1, 0)
        end = min(begin + max_length, n)
        with torch.no_grad():
            logits = model(input_ids=x[None, begin:end]).logits[0].float()
        nll += F.cross_entropy(
            logits[done - 1 - begin : end - 1 - begin], x[done:end], reduction="sum"
        ).item()
        count += end - done
        done = end
    return nll, count


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_perplexity_matches_the_guide_loop(family, tiny_model, eval_tokenizer, docs, stream):
    model = tiny_model(family)
    n = stream.size
    assert n > 4 * L and (n - L) % 12 != 0 and L % 12 != 0  # 12 divides neither the length nor the window
    for stride in (L // 2, 12):
        r = perplexity(model, eval_tokenizer, stream, max_length=L, stride=stride, batch_size=4)
        nll, count = _guide_nll(model, stream, L, stride)
        assert r.tokens == count == n - 1
        assert r.nll_sum == pytest.approx(nll, rel=1e-4)
        assert r.perplexity == pytest.approx(math.exp(nll / count), rel=1e-4)
        assert r.windows == len(window_plan(n, L, stride)) and (r.max_length, r.stride) == (L, stride)
        w = windowed_text(model, eval_tokenizer, stream, max_length=L, stride=stride)
        assert w.plan == window_plan(n, L, stride) and (w.ids == stream).all() and w.pad_id == 0
    r = perplexity(model, eval_tokenizer, stream, max_length=L, stride=L, batch_size=3)
    nll, count = _rolling_nll(model, stream, L)
    assert r.tokens == count == n - 1 and r.nll_sum == pytest.approx(nll, rel=1e-4)
    # The documents themselves give the same stream, and their text's counts.
    d = windowed_text(model, eval_tokenizer, docs, max_length=L, stride=L)
    np.testing.assert_array_equal(d.ids, stream)
    stats = text_stats(docs)
    assert (d.bytes, d.words, d.documents) == (stats.bytes, stats.words, len(docs))


def test_fast_path_equals_reference(tiny_model, eval_tokenizer, stream):
    model = tiny_model("gpt2")
    fast = perplexity(model, eval_tokenizer, stream, max_length=L, stride=L // 2, impl="auto")
    ref = perplexity(model, eval_tokenizer, stream, max_length=L, stride=L // 2, impl="reference")
    assert fast.nll_sum == pytest.approx(ref.nll_sum, rel=1e-6)
    assert fast.nll_stderr == pytest.approx(ref.nll_stderr, rel=1e-4)
    # batch size changes nothing
    one = perplexity(model, eval_tokenizer, stream, max_length=L, stride=L // 2, batch_size=1)
    assert one.nll_sum == pytest.approx(fast.nll_sum, rel=1e-6)


# --- the figures by hand ----------------------------------------------------------------------


def test_uniform_model_gives_ln_v_per_token(tiny_model, eval_tokenizer):
    """A zeroed output head predicts the uniform distribution: NLL = ln V at every token."""
    model = copy.deepcopy(tiny_model("gpt2"))
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()
    v = model.config.vocab_size
    text = "Call me Ishmael. Some years ago, never mind how long."
    model.train()  # scored in eval mode, and given back as it was
    r = perplexity(model, eval_tokenizer, text, max_length=8, stride=5, progress=True)
    assert model.training
    n_tokens = len(eval_tokenizer(text).input_ids)  # with its </s>; the start token is context only
    n_bytes, n_words = len(text.encode()), len(text.split())
    assert r.tokens == n_tokens and (r.bytes, r.words, r.documents) == (n_bytes, n_words, 1)
    assert r.mean_nll == pytest.approx(math.log(v), rel=1e-6)
    assert r.perplexity == pytest.approx(v, rel=1e-5)
    assert r.bits_per_byte == pytest.approx(n_tokens * math.log(v) / n_bytes / math.log(2), rel=1e-6)
    assert r.byte_perplexity == pytest.approx(math.exp(n_tokens * math.log(v) / n_bytes), rel=1e-5)
    assert r.word_perplexity == pytest.approx(math.exp(n_tokens * math.log(v) / n_words), rel=1e-5)
    assert r.nll_stderr == pytest.approx(0.0, abs=1e-6)
    # Given counts replace the text's.
    r2 = perplexity(model, eval_tokenizer, text, max_length=8, n_bytes=100, n_words=10)
    assert r2.bits_per_byte == pytest.approx(n_tokens * math.log(v) / 100 / math.log(2), rel=1e-6)
    assert r2.word_perplexity == pytest.approx(math.exp(n_tokens * math.log(v) / 10), rel=1e-5)


def test_stderr_is_the_std_of_token_nlls(tiny_model, eval_tokenizer, stream):
    """nll_stderr = std(token NLLs, ddof=1) / sqrt(tokens), and the delta-method errors from it."""
    model = tiny_model("llama")
    r = perplexity(model, eval_tokenizer, stream, max_length=L, stride=L)
    x = torch.from_numpy(stream)
    per_token = []
    for w in window_plan(stream.size, L, L):
        with torch.no_grad():
            logits = model(input_ids=x[None, w.begin : w.end]).logits[0].float()
        sl = slice(w.score_from - 1 - w.begin, w.end - 1 - w.begin)
        per_token.append(F.cross_entropy(logits[sl], x[w.score_from : w.end], reduction="none").double())
    t = torch.cat(per_token)
    want = float(t.std(correction=1)) / math.sqrt(t.numel())
    assert r.nll_stderr == pytest.approx(want, rel=1e-4)
    assert r.perplexity_stderr == pytest.approx(r.perplexity * want, rel=1e-4)
    assert r.bits_per_byte_stderr == pytest.approx(want * r.tokens / r.bytes / math.log(2), rel=1e-4)
    d = r.to_dict()
    assert set(d) >= {"nll_sum", "tokens", "bits_per_byte", "word_perplexity", "windows"}
    assert all(isinstance(v, (int, float)) for v in d.values())


# --- dtypes and quantized models --------------------------------------------------------------


def test_bf16_and_nf4_models_are_close(tiny_model, eval_tokenizer, stream):
    from lmlab.quant import NF4Config, quantize_

    model = tiny_model("llama")
    base = perplexity(model, eval_tokenizer, stream, max_length=L, stride=L)
    bf16 = perplexity(copy.deepcopy(model).to(torch.bfloat16), eval_tokenizer, stream, max_length=L, stride=L)
    assert bf16.mean_nll == pytest.approx(base.mean_nll, rel=1e-2) and bf16.nll_sum != base.nll_sum
    q = copy.deepcopy(model)
    quantize_(q, NF4Config(double_quant=True))
    nf4 = perplexity(q, eval_tokenizer, stream, max_length=L, stride=L)
    assert nf4.mean_nll == pytest.approx(base.mean_nll, rel=2e-2) and nf4.nll_sum != base.nll_sum


# --- refusals ---------------------------------------------------------------------------------


def test_perplexity_refuses_in_one_line(tiny_model, eval_tokenizer, stream):
    gpt2 = tiny_model("gpt2")
    cases = [
        (tiny_model("t5"), stream, {}, "needs a causal .*denoising_loss"),
        (tiny_model("bert"), stream, {}, "needs a causal"),
        (gpt2, stream, {"max_length": 4096}, "max_length 4096 exceeds the model's 1024 positions"),
        (
            gpt2,
            stream,
            {"max_length": 1000},
            f"the text has {stream.size} tokens, fewer than one window of 1000",
        ),
        (gpt2, "", {}, "the text is empty"),
        (gpt2, [], {}, "the text is empty"),
        (gpt2, ["  ", "\n"], {}, "the text is empty"),
        (gpt2, [5, 6, 99999], {"max_length": 2}, "token id 99999 is outside the model's vocabulary"),
        (gpt2, stream, {"max_length": L, "stride": L + 1}, f"stride {L + 1} exceeds max_length {L}"),
        (gpt2, stream, {"max_length": L, "stride": 0}, "stride must be positive"),
        (gpt2, stream, {"max_length": 1}, "max_length must be at least 2"),
        (gpt2, stream, {"max_length": L, "batch_size": 0}, "batch_size must be positive"),
    ]
    for model, text, kw, msg in cases:
        with pytest.raises(LmlabError, match=msg) as e:
            perplexity(model, eval_tokenizer, text, **kw)
        assert "\n" not in str(e.value)


def test_default_window(tmp_path, tiny_model, saved_model, eval_tokenizer):
    import shutil

    from transformers import AutoModelForCausalLM

    from lmlab.train.state import write_model_settings

    assert default_max_length(tiny_model("gpt2")) == 1024  # its n_positions
    assert default_max_length(tiny_model("llama")) == 2048  # 2048 positions, the cap
    d = shutil.copytree(saved_model("gpt2"), tmp_path / "final")  # the shared one stays as it is
    write_model_settings(d, {"seq_len": 64, "objective": "causal"})
    m = AutoModelForCausalLM.from_pretrained(d).eval()
    assert default_max_length(m) == 64
    text = load_eval_text(eval_tokenizer, texts=["Call me Ishmael. " * 20])
    r = perplexity(m, eval_tokenizer, text)
    assert (r.max_length, r.stride) == (64, 32)
