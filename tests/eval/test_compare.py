"""lmlab.eval.compare (lmlab.eval.damage): llama.cpp's quantization-damage statistics of a candidate against its base."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from lmlab.errors import LmlabError
from lmlab.eval.damage import _Tally, check_same_tokenizer, compare, distribution_stats

# ------------------------------------------------------------------------------- distribution_stats


def _reference(zb: np.ndarray, zc: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """The definitions in float64 numpy: KL(p‖q) = Σ p (log p − log q), p the base."""

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lp, lq = log_softmax(zb.astype(np.float64)), log_softmax(zc.astype(np.float64))
    rows = np.arange(len(y))
    return {
        "kl": (np.exp(lp) * (lp - lq)).sum(-1),
        "top1_agree": zb.argmax(-1) == zc.argmax(-1),
        "p_base": np.exp(lp[rows, y]),
        "p_cand": np.exp(lq[rows, y]),
        "nll_base": -lp[rows, y],
        "nll_cand": -lq[rows, y],
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_distribution_stats_against_numpy(dtype):
    g = torch.Generator().manual_seed(0)
    zb = (torch.randn(64, 50, generator=g) * 3).to(dtype)
    zc = (zb.double() + 0.3 * torch.randn(64, 50, generator=g, dtype=torch.float64)).to(dtype)
    y = torch.randint(0, 50, (64,), generator=g)
    s = distribution_stats(zb, zc, y)
    ref = _reference(zb.double().numpy(), zc.double().numpy(), y.numpy())
    want = torch.float64 if dtype == torch.float64 else torch.float32
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for k, v in ref.items():
        assert s[k].shape == (64,)
        if k == "top1_agree":
            assert s[k].dtype == torch.bool and np.array_equal(s[k].numpy(), v)
        else:
            assert s[k].dtype == want
            np.testing.assert_allclose(s[k].double().numpy(), v, rtol=tol, atol=tol)
    assert (s["kl"] > 0).all() and not s["top1_agree"].all()


def test_distribution_stats_golden():
    """p = (1/4, 3/4), q = (1/2, 1/2): KL = ¼ ln ½ + ¾ ln 3⁄2; argmax differs (1 vs the tie's 0)."""
    zb = torch.tensor([[0.0, math.log(3.0)]])
    zc = torch.tensor([[5.0, 5.0]])
    s = distribution_stats(zb, zc, torch.tensor([0]))
    assert s["kl"].item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), rel=1e-6)
    assert s["p_base"].item() == pytest.approx(0.25) and s["p_cand"].item() == pytest.approx(0.5)
    assert s["nll_base"].item() == pytest.approx(math.log(4.0)) and not s["top1_agree"].item()


def test_kl_properties():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(32, 40, generator=g) * 4
    y = torch.randint(0, 40, (32,), generator=g)
    same = distribution_stats(z, z.clone(), y)
    assert torch.equal(same["kl"], torch.zeros(32)) and same["top1_agree"].all()
    assert torch.equal(same["p_base"], same["p_cand"]) and torch.equal(same["nll_base"], same["nll_cand"])
    # A shift of the logits is the same distribution: KL ≈ 0 (not exactly: rounding).
    assert distribution_stats(z, z + 7.0, y)["kl"].max() < 1e-5
    # KL ≥ 0 on unrelated distributions, and it is not symmetric in general ...
    w = torch.randn(32, 40, generator=g) * 4
    ab, ba = distribution_stats(z, w, y)["kl"], distribution_stats(w, z, y)["kl"]
    assert (ab >= 0).all() and (ba >= 0).all() and not torch.allclose(ab, ba, rtol=1e-3)
    # ... but it is for two-point distributions swapped: p = (a, 1−a), q = (1−a, a).
    two = torch.tensor([[0.0, 1.3], [0.2, -2.0]])
    flip = two.flip(-1)
    k = torch.tensor([0, 1])
    assert torch.allclose(
        distribution_stats(two, flip, k)["kl"], distribution_stats(flip, two, k)["kl"], rtol=1e-6
    )


def test_distribution_stats_masked_vocabulary_and_shapes():
    """A −inf logit (a token the model can never emit) contributes 0, even where both exclude it."""
    zb = torch.tensor([[0.0, 1.0, -math.inf]])
    zc = torch.tensor([[0.5, 1.0, -math.inf]])
    s = distribution_stats(zb, zc, torch.tensor([1]))
    ref = _reference(zb[:, :2].numpy(), zc[:, :2].numpy(), np.array([1]))
    assert s["kl"].item() == pytest.approx(ref["kl"][0], rel=1e-5)
    with pytest.raises(LmlabError, match="must both be"):
        distribution_stats(zb, zc[:, :2], torch.tensor([1]))
    with pytest.raises(LmlabError, match="targets"):
        distribution_stats(zb, zc, torch.tensor([1, 0]))


def test_tally_percentiles_interpolate_as_llama_cpp():
    """Linear interpolation between order statistics; sd/√n standard errors with the sample variance."""
    t = _Tally()
    kl = torch.arange(100, dtype=torch.float32).flip(0)  # order does not matter
    p_base = torch.full((100,), 0.5)
    t.add(
        {
            "kl": kl,
            "top1_agree": torch.arange(100) % 4 != 0,
            "p_base": p_base,
            "p_cand": p_base + (torch.arange(100) - 50) / 200,
            "nll_base": torch.ones(100),
            "nll_cand": torch.full((100,), 2.0),
        }
    )
    r = t.result(n_bytes=50)
    assert r.positions == 100 and r.kl_median == 49.5 and r.kl_max == 99.0
    assert (
        r.kl_p90 == pytest.approx(89.1)
        and r.kl_p99 == pytest.approx(98.01)
        and r.kl_p999 == pytest.approx(98.901)
    )
    assert r.kl_mean == 49.5 and r.kl_stderr == pytest.approx(np.std(np.arange(100), ddof=1) / 10)
    assert r.top1_agreement == 0.75 and r.top1_agreement_stderr == pytest.approx(math.sqrt(0.75 * 0.25 / 99))
    assert r.delta_p_percentiles["p50"] == pytest.approx(-0.0025) and r.delta_p_percentiles[
        "p1"
    ] == pytest.approx((0.99 - 50) / 200)
    assert r.mean_delta_p == pytest.approx(-0.0025)
    assert r.rms_delta_p == pytest.approx(math.sqrt(np.mean(((np.arange(100) - 50) / 200) ** 2)))
    assert r.base.perplexity == pytest.approx(math.e) and r.candidate.perplexity == pytest.approx(math.e**2)
    assert r.perplexity_ratio == pytest.approx(math.e) and r.ln_perplexity_ratio == pytest.approx(1.0)
    assert r.ln_perplexity_ratio_stderr == 0.0
    assert r.base.bits_per_byte == pytest.approx(100 / 50 / math.log(2))
    assert r.delta_bits_per_byte == pytest.approx(100 / 50 / math.log(2))
    with pytest.raises(LmlabError, match="no scored positions"):
        _Tally().result(None)


# ------------------------------------------------------------------------------------------ models


@pytest.fixture(scope="module")
def gpt_ids(eval_data):
    from lmlab.data import load_tokens

    return np.asarray(load_tokens(eval_data, "val"), dtype=np.int64)[:320]


@pytest.fixture(scope="module")
def quantized_gpt(tiny_model):
    from lmlab.quant import Int8Config, NF4Config, quantize_

    out = {}
    for name, cfg in (("nf4", NF4Config(double_quant=True)), ("int8", Int8Config())):
        m = copy.deepcopy(tiny_model("gpt2"))
        quantize_(m, cfg)
        out[name] = m.eval()
    return out


def test_model_against_itself_is_exactly_zero(tiny_model, eval_tokenizer, gpt_ids):
    m = tiny_model("gpt2")
    r = compare(m, m, eval_tokenizer, gpt_ids, max_length=64, stride=32, batch_size=16)
    assert r.positions == len(gpt_ids) - 1
    assert r.kl_mean == r.kl_max == r.kl_p999 == r.kl_stderr == 0.0
    assert r.top1_agreement == 1.0 and r.delta_perplexity == 0.0 and r.perplexity_ratio == 1.0
    assert r.mean_delta_p == r.rms_delta_p == 0.0 and set(r.delta_p_percentiles.values()) == {0.0}
    assert r.base == r.candidate and r.delta_bits_per_byte == 0.0 and r.n_bytes > 0
    d = json.loads(json.dumps(r.to_dict()))  # plain JSON
    assert d["base"]["perplexity"] == r.base.perplexity and d["delta_p_percentiles"]["p99"] == 0.0


KW = dict(max_length=48, stride=20, batch_size=16)


@pytest.fixture(scope="module")
def text(eval_tokenizer, eval_corpus):
    from lmlab.eval.text import load_eval_text

    return load_eval_text(eval_tokenizer, texts=eval_corpus.read_text(encoding="utf-8")[:1200])


@pytest.fixture(scope="module")
def int8_result(tiny_model, eval_tokenizer, text, quantized_gpt):
    return compare(tiny_model("gpt2"), quantized_gpt["int8"], eval_tokenizer, text, **KW)


def test_base_perplexity_is_perplexity(tiny_model, eval_tokenizer, text, quantized_gpt, int8_result):
    """The same scored tokens as perplexity(): the base's figures are its, to fp32 rounding (perplexity
    forms each chunk's logits vocabulary-major, compare row-major: another GEMM blocking)."""
    from lmlab.eval.causal import perplexity, windowed_text
    from lmlab.eval.damage import _compare_batches

    p = perplexity(tiny_model("gpt2"), eval_tokenizer, text, **KW)
    q = perplexity(quantized_gpt["int8"], eval_tokenizer, text, **KW)
    r = int8_result
    assert r.positions == p.tokens and r.n_bytes == p.bytes
    assert r.base.perplexity == pytest.approx(p.perplexity, rel=1e-6)
    assert r.candidate.perplexity == pytest.approx(q.perplexity, rel=1e-6)
    assert r.base.bits_per_byte == pytest.approx(p.bits_per_byte, rel=1e-6)
    assert r.delta_perplexity == pytest.approx(q.perplexity - p.perplexity, abs=4e-6 * p.perplexity)
    # Walked in chunks of 5 rows (in lockstep on both models) it is the same comparison, to the fp32
    # rounding of the logits (another GEMM blocking): ~1e-9 nats of KL per position here.
    w = windowed_text(tiny_model("gpt2"), eval_tokenizer, text, max_length=48, stride=20)
    c = _compare_batches(
        tiny_model("gpt2"), quantized_gpt["int8"], w.batches(16), n_bytes=w.bytes, chunk_rows=5
    )
    assert c.positions == r.positions and c.top1_agreement == r.top1_agreement
    for k in ("kl_mean", "kl_p99", "kl_max", "rms_delta_p", "ln_perplexity_ratio"):
        assert getattr(c, k) == pytest.approx(getattr(r, k), rel=2e-3, abs=1e-8), k


def test_quantized_copies_are_close_and_another_model_is_far(
    tiny_model, eval_tokenizer, text, quantized_gpt, int8_result, eval_data
):
    from lmlab.data import load_meta
    from lmlab.models.presets import build_model

    m = tiny_model("gpt2")
    nf4, int8 = compare(m, quantized_gpt["nf4"], eval_tokenizer, text, **KW), int8_result
    meta = load_meta(eval_data)
    other = build_model("gpt-tiny", meta["vocab_size"], meta["special_ids"], seed=1, n_layer=2).eval()
    far = compare(m, other, eval_tokenizer, text, **KW)
    for r in (nf4, int8):
        assert (
            0 < r.kl_mean < 1e-2
            and 0 < r.kl_median <= r.kl_p90 <= r.kl_p95 <= r.kl_p99 <= r.kl_p999 <= r.kl_max
        )
        assert r.top1_agreement > 0.9 and r.rms_delta_p > 0 and r.delta_perplexity != 0
    assert int8.kl_mean < nf4.kl_mean  # 8 bits lose less than 4
    assert far.kl_mean > 20 * nf4.kl_mean and far.top1_agreement < nf4.top1_agreement


@pytest.mark.parametrize(("family", "given"), [("t5", True), ("bert", False)])
def test_denoising_pairs_on_objective_batches(family, given, tiny_model, eval_tokenizer, gpt_ids):
    """T5 and BERT pairs score the same corrupted batches, given (as the CLI gives them) or built
    from the text: the base's NLL is denoising_loss's on those batches."""
    from lmlab.eval.denoising import denoising_loss, objective_batches
    from lmlab.models.families import scoring_family

    m, ids = tiny_model(family), gpt_ids[:200]
    kind = scoring_family(m).kind
    objective = "span" if family == "t5" else "bert"
    noisy = copy.deepcopy(m)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.002)
    if given:
        batches = objective_batches(eval_tokenizer, ids, objective, kind, seq_len=32, batch_size=8)
        r = compare(m, noisy, eval_tokenizer, batches=batches)
    else:
        r = compare(m, noisy, eval_tokenizer, ids, max_length=32, batch_size=8)
    d = denoising_loss(m, eval_tokenizer, ids, objective=objective, seq_len=32, batch_size=8)
    assert r.positions == d.target_tokens and r.base.mean_nll == pytest.approx(d.loss, rel=1e-6)
    assert r.n_bytes == (None if given else d.bytes)
    assert 0 < r.kl_mean < 0.05 and r.top1_agreement > 0.5


def test_refusals(tiny_model, eval_tokenizer, gpt_ids, eval_data):
    from lmlab.data import load_meta
    from lmlab.models.presets import build_model

    gpt, t5 = tiny_model("gpt2"), tiny_model("t5")
    with pytest.raises(LmlabError, match="decoder model and the candidate a encoder-decoder"):
        compare(gpt, t5, eval_tokenizer, gpt_ids)
    meta = load_meta(eval_data)
    wider = build_model("gpt-tiny", meta["vocab_size"] + 8, meta["special_ids"], seed=0, n_layer=1).eval()
    with pytest.raises(LmlabError, match=r"predicts 1024 tokens and the candidate 1032"):
        compare(gpt, wider, eval_tokenizer, gpt_ids, max_length=64)
    with pytest.raises(LmlabError, match="give either the text"):
        compare(gpt, gpt, eval_tokenizer)
    with pytest.raises(LmlabError, match="not both"):
        compare(gpt, gpt, eval_tokenizer, gpt_ids, batches=[])


def test_check_same_tokenizer(eval_tokenizer):
    from transformers import PreTrainedTokenizerFast

    from lmlab.data.tokenizer import train_tokenizer

    check_same_tokenizer(eval_tokenizer, copy.deepcopy(eval_tokenizer))
    texts = [
        f"{w} number {i} of a different corpus entirely"
        for i, w in enumerate(["alpha", "beta", "gamma"] * 40)
    ]
    other = PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(texts, vocab_size=1024, kind="bpe"))
    with pytest.raises(LmlabError, match=r"^runs/q and --compare runs/base have different tokenizers"):
        check_same_tokenizer(other, eval_tokenizer, names=("runs/q", "--compare runs/base"))
