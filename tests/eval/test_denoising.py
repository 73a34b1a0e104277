"""The denoising NLL (fixed corruptions, equal to ``evaluate``'s on a prepared val split) and the
pseudo-log-likelihood (against a naive one-forward-per-position loop, and by hand with a zeroed head)."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from lmlab.data import load_tokens
from lmlab.errors import LmlabError
from lmlab.eval.bytes import token_byte_lengths
from lmlab.eval.denoising import (
    default_objective,
    denoising_loss,
    objective_batches,
    pll_batches,
    pseudo_log_likelihood,
)
from lmlab.eval.loss import evaluate
from lmlab.eval.text import documents_from_paths, encode_documents, load_eval_text
from lmlab.objectives.base import IGNORE_INDEX


@pytest.fixture(scope="module")
def val_ids(eval_data) -> np.ndarray:
    return np.asarray(load_tokens(eval_data, "val"), dtype=np.int64)


def _zero_head(model: torch.nn.Module) -> torch.nn.Module:
    """A copy whose logits are all zero: every target has probability 1/V."""
    m = copy.deepcopy(model)
    head = m.get_output_embeddings()
    with torch.no_grad():
        head.weight.zero_()
        if getattr(head, "bias", None) is not None:
            head.bias.zero_()
    return m


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------------------------------ denoising NLL


def _collect(tok, ids, objective, kind, **kw):
    return list(objective_batches(tok, ids, objective, kind, seq_len=32, **kw))


def test_batches_fixed_by_seed_and_rows_not_by_batch_size(eval_tokenizer, val_ids):
    a = _collect(eval_tokenizer, val_ids, "span", "encoder-decoder", batch_size=3, seed=5, max_rows=7)
    b = _collect(eval_tokenizer, val_ids, "span", "encoder-decoder", batch_size=7, seed=5, max_rows=7)
    c = _collect(eval_tokenizer, val_ids, "span", "encoder-decoder", batch_size=7, seed=6, max_rows=7)
    assert [len(r) for _, r in a] == [3, 3, 1] and len(b) == 1
    for key in ("input_ids", "labels", "decoder_input_ids"):
        assert torch.equal(torch.cat([x[key] for x, _ in a]), b[0][0][key])  # span widths are fixed
    raw = torch.cat([r for _, r in a])
    R = raw.shape[1]
    assert torch.equal(raw, torch.from_numpy(val_ids[: 7 * R].reshape(7, R)))  # consecutive rows
    assert torch.equal(b[0][1], raw)
    assert torch.equal(c[0][1], raw) and not torch.equal(c[0][0]["input_ids"], b[0][0]["input_ids"])
    for x, _ in a:  # the corruption is fresh tensors; the raw rows are untouched
        assert x["input_ids"].dtype == torch.int64


def test_same_seed_same_loss_and_a_copy_scores_the_same(tiny_model, eval_tokenizer, val_ids):
    m = tiny_model("t5")
    kw = dict(objective="span", seq_len=32, batch_size=4, seed=1, max_rows=6)
    r1 = denoising_loss(m, eval_tokenizer, val_ids, **kw)
    r2 = denoising_loss(copy.deepcopy(m), eval_tokenizer, torch.from_numpy(val_ids), **kw)
    r3 = denoising_loss(m, eval_tokenizer, val_ids, **{**kw, "seed": 2})
    assert r1.to_dict() == r2.to_dict()
    assert r3.nll_sum != r1.nll_sum
    d = r1.to_dict()
    json.dumps(d)
    assert d["rows"] == 6 and d["objective"] == "span" and d["seq_len"] == 32 and d["seed"] == 1
    assert d["raw_tokens"] % 6 == 0 and d["raw_tokens"] // 6 > 32  # span rows are longer than the inputs
    assert math.isclose(d["loss"], d["nll_sum"] / d["target_tokens"], rel_tol=1e-12)
    assert math.isclose(d["perplexity"], math.exp(d["loss"]), rel_tol=1e-12)
    assert math.isclose(d["bits_per_byte"], d["nll_sum"] / d["bytes"] / math.log(2), rel_tol=1e-12)
    assert 0 < d["loss_stderr"] < d["loss"]


def test_scored_without_dropout_and_the_mode_restored(tiny_model, eval_tokenizer, val_ids):
    m = tiny_model("bert")  # hidden dropout 0.1
    training = copy.deepcopy(m).train()
    kw = dict(objective="bert", seq_len=32, max_rows=3)
    assert denoising_loss(training, eval_tokenizer, val_ids, **kw) == denoising_loss(
        m, eval_tokenizer, val_ids, **kw
    )
    assert pseudo_log_likelihood(
        training, eval_tokenizer, val_ids[:20], max_length=20
    ) == pseudo_log_likelihood(m, eval_tokenizer, val_ids[:20], max_length=20)
    assert all(x.training for x in training.modules()) and not m.training


@pytest.mark.parametrize(
    ("family", "objective"), [("t5", "span"), ("bert", "bert"), ("t5", "prefix"), ("gpt2", "prefix")]
)
def test_equals_evaluate_on_the_val_split(tiny_model, eval_tokenizer, eval_data, val_ids, family, objective):
    m = tiny_model(family)
    # evaluate() leaves its model in train mode (LossHead starts in train mode): give it a copy.
    ref = evaluate(copy.deepcopy(m), eval_data, objective, batch_size=4, seq_len=48, max_batches=2, seed=3)
    got = denoising_loss(
        m, eval_tokenizer, val_ids, objective=objective, seq_len=48, batch_size=3, seed=3, max_rows=8
    )
    assert got.rows == ref["rows"] == 8
    assert got.target_tokens == ref["tokens"]
    assert abs(got.loss - ref["loss"]) < 1e-6


def test_uniform_model_by_hand(tiny_model, eval_tokenizer, val_ids):
    """Zero logits: every target costs ln V, so loss = ln V and bits per byte = targets·log2 V / bytes."""
    m = _zero_head(tiny_model("bert"))
    V = m.config.vocab_size
    r = denoising_loss(m, eval_tokenizer, val_ids, objective="bert", seq_len=40, batch_size=8, max_rows=5)
    assert r.raw_tokens == 5 * 40
    table = token_byte_lengths(eval_tokenizer)
    assert r.bytes == int(table[val_ids[:200]].sum()) > 0
    assert r.loss == pytest.approx(math.log(V), abs=1e-6)
    assert r.bits_per_byte == pytest.approx(r.target_tokens * math.log2(V) / r.bytes, rel=1e-6)
    assert r.loss_stderr == pytest.approx(0.0, abs=1e-6)
    # BERT masks 15% of 200 tokens (specials excepted): a count near 30, never 0.
    assert 10 <= r.target_tokens <= 60


def test_default_objective_and_length(tiny_model, eval_tokenizer, val_ids, tmp_path):
    assert default_objective(tiny_model("t5")) == "span"
    assert default_objective(tiny_model("bert")) == "bert"
    with pytest.raises(LmlabError, match="scored by lmlab.eval.perplexity") as e:
        default_objective(tiny_model("gpt2"))
    _one_line(e)
    # A run's final/ records what it was trained with: a GPT trained as a prefix LM is scored so.
    (tmp_path / "lmlab_training.json").write_text(json.dumps({"seq_len": 24, "objective": "prefix"}))
    gpt = copy.deepcopy(tiny_model("gpt2"))
    gpt.name_or_path = gpt.config._name_or_path = str(tmp_path)
    r = denoising_loss(gpt, eval_tokenizer, val_ids, max_rows=3)
    assert (r.objective, r.seq_len, r.raw_tokens) == ("prefix", 24, 72)


def test_text_documents_and_eval_text_score_as_their_ids(tiny_model, eval_tokenizer, eval_corpus):
    docs = documents_from_paths([eval_corpus])[:6]
    ids = encode_documents(eval_tokenizer, docs)
    m, kw = tiny_model("bert"), dict(objective="bert", seq_len=32, max_rows=3)
    want = denoising_loss(m, eval_tokenizer, ids, **kw)
    assert denoising_loss(m, eval_tokenizer, docs, **kw) == want
    assert denoising_loss(m, eval_tokenizer, load_eval_text(eval_tokenizer, texts=docs), **kw) == want
    assert pseudo_log_likelihood(
        m, eval_tokenizer, docs[0], max_length=16, max_rows=1
    ) == pseudo_log_likelihood(
        m, eval_tokenizer, encode_documents(eval_tokenizer, docs[:1]), max_length=16, max_rows=1
    )
    with pytest.raises(LmlabError, match="empty") as e:
        denoising_loss(m, eval_tokenizer, "  \n ", **kw)
    _one_line(e)


def test_refusals_are_one_line(tiny_model, eval_tokenizer, val_ids):
    t5, bert = tiny_model("t5"), tiny_model("bert")
    cases = [
        (dict(model=t5, ids=np.zeros(0, dtype=np.int64)), "empty"),
        (dict(model=t5, ids=val_ids[:20], seq_len=32), "fewer than one row of"),
        (dict(model=bert, ids=val_ids, objective="span"), "encoder-decoder"),
        (dict(model=t5, ids=val_ids, objective="no-such"), "unknown objective"),
        (dict(model=t5, ids=np.array([5, 99999] * 40)), "outside the model's vocabulary"),
        (dict(model=t5, ids=val_ids, batch_size=0), "batch_size"),
        (dict(model=t5, ids=val_ids, seq_len=0), "seq_len"),
        (dict(model=t5, ids=val_ids, max_rows=0), "max_rows"),
        (dict(model=t5, ids=np.ones((4, 40), dtype=np.int64)), "one flat sequence"),
    ]
    for kw, match in cases:
        model, ids = kw.pop("model"), kw.pop("ids")
        with pytest.raises(LmlabError, match=match) as e:
            denoising_loss(model, eval_tokenizer, ids, **{"seq_len": 32, **kw})
        _one_line(e)


# ------------------------------------------------------------------------------------------ pseudo-log-likelihood


def _naive_pll(model, ids: np.ndarray, L: int, mask_id: int, specials: set[int]) -> list[tuple[float, int]]:
    """Per row of ``L`` tokens, (PLL, positions scored): one forward of the plain model per masked
    position, the log-softmax of its logits."""
    out = []
    for s in range(0, len(ids), L):
        row = torch.from_numpy(ids[s : s + L].copy())
        total, n = 0.0, 0
        for t in range(len(row)):
            if int(row[t]) in specials:
                continue
            x = row.clone()
            x[t] = mask_id
            logits = model(input_ids=x[None]).logits[0, t].double()
            total += float(logits.log_softmax(-1)[row[t]])
            n += 1
        out.append((total, n))
    return out


@torch.no_grad()
def test_pll_equals_a_naive_loop(tiny_model, eval_tokenizer, val_ids):
    m = tiny_model("bert")
    specials = set(eval_tokenizer.all_special_ids)
    eos = int(np.flatnonzero(val_ids == eval_tokenizer.eos_token_id)[0])
    ids = val_ids[max(0, eos - 14) : max(0, eos - 14) + 28]  # rows of 12, 12 and 4 tokens, a </s> among them
    assert specials & set(ids.tolist())  # the test covers skipped positions
    rows = _naive_pll(m, ids, 12, eval_tokenizer.mask_token_id, specials)
    want, n = sum(r[0] for r in rows), sum(r[1] for r in rows)
    got = pseudo_log_likelihood(m, eval_tokenizer, ids, max_length=12, batch_size=5)  # batches straddle rows
    assert (got.tokens, got.rows) == (n, 3)
    assert got.pll == pytest.approx(want, abs=1e-5)
    assert got.mean_nll == pytest.approx(-want / n, abs=1e-7)
    assert got.pseudo_perplexity == pytest.approx(math.exp(-want / n), rel=1e-6)
    two = pseudo_log_likelihood(m, eval_tokenizer, ids, max_length=12, batch_size=64, max_rows=2)
    assert (two.tokens, two.rows) == (rows[0][1] + rows[1][1], 2)
    assert two.pll == pytest.approx(rows[0][0] + rows[1][0], abs=1e-5)


def test_pll_batches_mask_one_position_per_copy():
    ids = np.array([1, 10, 11, 1, 12, 13, 14], dtype=np.int64)
    batches = list(pll_batches(ids, max_length=4, mask_id=3, special_ids={0, 1}, pad_id=0, batch_size=3))
    # rows [1, 10, 11, 1] (2 copies: the </s> are not scored) and [12, 13, 14] (3 copies), 3 copies a batch
    assert [b["input_ids"].tolist() for b in batches] == [
        [[1, 3, 11, 1], [1, 10, 3, 1], [3, 13, 14, 0]],
        [[12, 3, 14], [12, 13, 3]],
    ]
    assert [b["labels"][b["labels"] != IGNORE_INDEX].tolist() for b in batches] == [[10, 11, 12], [13, 14]]
    for b in batches:  # one scored position per copy: the masked one
        assert torch.equal(b["labels"] != IGNORE_INDEX, b["input_ids"] == 3)
    # the batch mixing the two rows marks the short row's padding; the other needs no mask
    assert batches[0]["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]]
    assert "attention_mask" not in batches[1]


def test_pll_uniform_by_hand(tiny_model, eval_tokenizer, val_ids):
    """Zero logits: PLL = −tokens·ln V, bits per byte = tokens·log2 V / bytes."""
    m = _zero_head(tiny_model("bert"))
    V = m.config.vocab_size
    ids = val_ids[:50]
    r = pseudo_log_likelihood(m, eval_tokenizer, ids, max_length=20)
    n = int(sum(1 for i in ids.tolist() if i not in set(eval_tokenizer.all_special_ids)))
    table = token_byte_lengths(eval_tokenizer)
    assert (r.tokens, r.rows, r.bytes) == (n, 3, int(table[ids].sum()))
    assert r.pll == pytest.approx(-n * math.log(V), rel=1e-6)
    assert r.bits_per_byte == pytest.approx(n * math.log2(V) / r.bytes, rel=1e-6)
    assert r.pseudo_perplexity == pytest.approx(V, rel=1e-6)
    json.dumps(r.to_dict())


def test_pll_refusals_are_one_line(tiny_model, eval_tokenizer, val_ids):
    no_mask = copy.deepcopy(eval_tokenizer)
    no_mask.mask_token = None
    cases = [
        (tiny_model("t5"), eval_tokenizer, val_ids[:20], "masked LMs"),
        (tiny_model("gpt2"), eval_tokenizer, val_ids[:20], "masked LMs"),
        (tiny_model("bert"), no_mask, val_ids[:20], "no mask token"),
        (tiny_model("bert"), eval_tokenizer, np.zeros(0, dtype=np.int64), "empty"),
        (tiny_model("bert"), eval_tokenizer, np.array([1, 0, 1]), "only special tokens"),
    ]
    for model, tok, ids, match in cases:
        with pytest.raises(LmlabError, match=match) as e:
            pseudo_log_likelihood(model, tok, ids, max_length=16)
        _one_line(e)
