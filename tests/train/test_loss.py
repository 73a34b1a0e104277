"""The fused output projection + cross-entropy against the plain path, and loss_sum's fast path (each
family's body/head split) against each model's own forward."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmlab.errors import LmlabError
from lmlab.models import DECODER, ENCODER, ENCODER_DECODER, build_model, onednn
from lmlab.train.loss import (
    IGNORE_INDEX,
    linear_cross_entropy,
    linear_cross_entropy_reference,
    loss_sum,
    model_inputs,
    split_head,
)


def _grads(fn, *leaves):
    for t in leaves:
        t.grad = None
    loss = fn()
    loss.backward()
    return loss.detach(), [None if t.grad is None else t.grad.clone() for t in leaves]


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 70),
    d=st.integers(1, 24),
    vocab=st.integers(2, 300),
    chunk=st.integers(1, 80),
    bias=st.booleans(),
    layout=st.sampled_from(["vocab", "row"]),
    ignored=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_fused_equals_reference(n, d, vocab, chunk, bias, layout, ignored, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(vocab, d, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(vocab, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    y = torch.randint(0, vocab, (n,), generator=g)
    y[torch.rand(n, generator=g) < ignored] = IGNORE_INDEX
    leaves = [t for t in (h, w, b) if t is not None]
    ref, ref_g = _grads(lambda: linear_cross_entropy(h, w, b, y, impl="reference"), *leaves)
    got, got_g = _grads(
        lambda: linear_cross_entropy(h, w, b, y, impl="fast", chunk_rows=chunk, layout=layout), *leaves
    )
    assert got.dtype == torch.float64  # fp64 stays fp64; lower precisions sum in fp32
    assert got.item() == pytest.approx(ref.item(), rel=1e-12, abs=1e-12)
    for a, r in zip(got_g, ref_g, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(not onednn._probe(), reason="no oneDNN fp32 linear in this torch build")
@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 70),
    d=st.integers(1, 40),
    vocab=st.integers(2, 300),
    chunk=st.integers(1, 80),
    bias=st.booleans(),
    ignored=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_fused_fp32_through_onednn_equals_fp64_reference(n, d, vocab, chunk, bias, ignored, seed):
    """The oneDNN layout (fp32 on the CPUs where lmlab.models.onednn applies: ∂Wᵀ accumulated, transposed
    at the end), forced here on any x86 CPU with the op."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, requires_grad=True)
    w = torch.randn(vocab, d, generator=g, requires_grad=True)
    b = torch.randn(vocab, generator=g, requires_grad=True) if bias else None
    y = torch.randint(0, vocab, (n,), generator=g)
    y[torch.rand(n, generator=g) < ignored] = IGNORE_INDEX
    leaves = [t for t in (h, w, b) if t is not None]
    got, got_g = _grads(lambda: linear_cross_entropy(h, w, b, y, chunk_rows=chunk, layout="onednn"), *leaves)
    wide = [t.detach().double().requires_grad_() for t in leaves]
    ref, ref_g = _grads(
        lambda: linear_cross_entropy_reference(wide[0], wide[1], wide[2] if bias else None, y), *wide
    )
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-4)
    for a, r in zip(got_g, ref_g, strict=True):
        assert a.dtype == torch.float32 and a.is_contiguous()
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-4)


def test_fused_scales_by_the_incoming_gradient_and_keeps_batch_shape():
    torch.manual_seed(0)
    h = torch.randn(3, 5, 8, requires_grad=True)
    w = torch.randn(40, 8, requires_grad=True)
    y = torch.randint(0, 40, (3, 5))
    y[0, :2] = IGNORE_INDEX
    _, ref = _grads(lambda: 0.25 * linear_cross_entropy_reference(h, w, None, y), h, w)
    _, got = _grads(lambda: 0.25 * linear_cross_entropy(h, w, None, y, chunk_rows=4), h, w)
    assert got[0].shape == h.shape and (got[0][0, :2] == 0).all()  # unscored rows get no gradient
    for a, r in zip(got, ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


def test_fused_without_grad_and_with_nothing_scored():
    h, w = torch.randn(6, 4), torch.randn(9, 4)
    y = torch.randint(0, 9, (6,))
    with torch.no_grad():
        assert linear_cross_entropy(h, w, None, y).item() == pytest.approx(
            linear_cross_entropy_reference(h, w, None, y).item(), rel=1e-6
        )
    none = torch.full((6,), IGNORE_INDEX)
    hg = h.clone().requires_grad_()
    loss = linear_cross_entropy(hg, w, None, none)
    loss.backward()
    assert loss.item() == 0.0 and (hg.grad == 0).all()


def test_reference_impl_is_the_plain_path_and_a_bad_layout_is_refused():
    g = torch.Generator().manual_seed(1)
    h, w, y = (
        torch.randn(5, 4, generator=g),
        torch.randn(7, 4, generator=g),
        torch.randint(0, 7, (5,), generator=g),
    )
    assert torch.equal(
        linear_cross_entropy(h, w, None, y, impl="reference"), linear_cross_entropy_reference(h, w, None, y)
    )
    with pytest.raises(ValueError, match="layout"):
        linear_cross_entropy(h, w, None, y, layout="vocab-major")
    with pytest.raises(LmlabError, match="impl must be one of"):
        linear_cross_entropy(h, w, None, y, impl="fused")


@pytest.mark.parametrize("layout", [None, "vocab"])
def test_fused_under_bf16_autocast_is_close_to_fp32(layout):
    torch.manual_seed(0)
    h = torch.randn(64, 32, requires_grad=True)
    w = (torch.randn(500, 32) * 0.1).requires_grad_()
    y = torch.randint(0, 500, (64,))
    ref, ref_g = _grads(lambda: linear_cross_entropy_reference(h, w, None, y), h, w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, got_g = _grads(lambda: linear_cross_entropy(h, w, None, y, chunk_rows=16, layout=layout), h, w)
    assert got.dtype == torch.float32 and got_g[0].dtype == h.dtype and got_g[1].dtype == w.dtype
    assert got.item() == pytest.approx(ref.item(), rel=1e-2)
    for a, r in zip(got_g, ref_g, strict=True):
        torch.testing.assert_close(a, r, rtol=0.05, atol=0.02)


def _batch(family: str, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    B, T = 3, 12
    ids = torch.randint(4, vocab, (B, T), generator=g)
    if family == ENCODER_DECODER:
        labels = torch.randint(4, vocab, (B, 7), generator=g)
        labels[1, 5:] = IGNORE_INDEX
        mask = torch.ones(B, T, dtype=torch.long)
        mask[2, 9:] = 0
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
    labels = ids.clone()
    if family == ENCODER:
        labels[torch.rand(B, T, generator=g) > 0.3] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}


@pytest.mark.parametrize(
    "preset,family",
    [("t5-tiny", ENCODER_DECODER), ("gpt-tiny", DECODER), ("bert-tiny", ENCODER), ("llama-tiny", DECODER)],
)
def test_loss_sum_split_equals_the_models_own_forward(preset, family):
    """The body/head split (and, for T5, lmlab's lean forward) computes the model's own loss and gradients."""
    model = build_model(preset, 300, seed=0)
    model.eval()  # BERT's dropout off, so both paths compute the same function
    assert split_head(model) == model.config.model_type
    batch = _batch(family, 300)
    params = [p for p in model.parameters() if p.requires_grad]
    ref, ref_g = _grads(lambda: loss_sum(model, batch, impl="reference"), *params)
    got, got_g = _grads(lambda: loss_sum(model, batch, impl="fast"), *params)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    for p, a, r in zip(params, got_g, ref_g, strict=True):
        if r is None:
            assert a is None or (a == 0).all()
        else:
            scale = max(1e-3, r.abs().max().item())  # fp32 rounding, judged against the gradient's scale
            torch.testing.assert_close(
                a, r, rtol=1e-4, atol=1e-5 * scale, msg=lambda m, p=p: f"{p.shape}: {m}"
            )


@pytest.mark.parametrize("preset", ["gpt-tiny", "llama-tiny"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_prefix_lm_on_a_decoder_sees_the_whole_prefix_and_nothing_after(preset, attn):
    from lmlab.objectives import PrefixLM

    model = build_model(preset, 300, seed=0, attn_implementation=attn)
    tokens = torch.randint(4, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = PrefixLM(decoder_only=True)(tokens, generator=torch.Generator().manual_seed(3))
    k = int(batch["prefix_mask"][0].sum())
    assert 1 <= k < 16

    def hidden(ids):
        kw = model_inputs(model, {**batch, "input_ids": ids})
        body = model.transformer if preset == "gpt-tiny" else model.model
        return body(input_ids=ids, attention_mask=kw["attention_mask"])[0]

    base = hidden(tokens)
    later_prefix = tokens.clone()
    later_prefix[0, k - 1] = (later_prefix[0, k - 1] + 1) % 300  # the prefix's last token
    assert not torch.allclose(hidden(later_prefix)[0, 0], base[0, 0])  # position 0 sees it: bidirectional
    target = tokens.clone()
    target[0, k] = (target[0, k] + 1) % 300  # the first target token
    torch.testing.assert_close(hidden(target)[0, :k], base[0, :k])  # the prefix never sees the targets
    assert not torch.allclose(hidden(target)[0, k], base[0, k])
    # The loss path uses that mask, fused or not, and differs from plain causal attention.
    ref = loss_sum(model, batch, impl="reference")
    assert loss_sum(model, batch, impl="fast").item() == pytest.approx(ref.item(), rel=1e-5)
    causal = {key: v for key, v in batch.items() if key != "prefix_mask"}
    assert loss_sum(model, causal).item() != pytest.approx(ref.item(), rel=1e-5)


def test_models_lmlab_does_not_split_keep_the_logits_path():
    assert split_head(torch.nn.Linear(2, 2)) is None


class _OtherLinear(torch.nn.Linear):
    """Stands for a quantized output layer: not a plain ``nn.Linear``, so the fused loss cannot read it."""


def test_fast_impl_is_refused_where_the_split_does_not_apply_and_auto_falls_back():
    model = build_model("gpt-tiny", 100, seed=0)
    head = _OtherLinear(model.config.n_embd, 100, bias=False)
    head.weight = model.lm_head.weight
    model.lm_head = head
    batch = _batch(DECODER, 100)
    assert split_head(model) is None
    with pytest.raises(LmlabError, match="fused loss: impl='fast' does not apply"):
        loss_sum(model, batch, impl="fast")
    with torch.no_grad():
        auto, ref = loss_sum(model, batch), loss_sum(model, batch, impl="reference")
    assert auto.item() == pytest.approx(ref.item(), rel=1e-5)
