"""lmlab's lean T5 training forward against Hugging Face's T5 forward (the reference)."""

from __future__ import annotations

import pytest
import torch

from lmlab.models import build_model
from lmlab.models.fast_t5 import _gelu_kind, supports, t5_decoder_hidden


def _hf_hidden(model, ids, dec, mask):
    enc = model.encoder(input_ids=ids, attention_mask=mask)[0]
    return model.decoder(
        input_ids=dec, encoder_hidden_states=enc, encoder_attention_mask=mask, use_cache=False
    )[0]


# v1.1 (one-kernel GELU: lmlab's own backward), mT5's composed "gelu_new" (autograd's), T5 1.0
@pytest.mark.parametrize("ff", ["gated-gelu_pytorch_tanh", "gated-gelu", "relu"])
@pytest.mark.parametrize("masked", [False, True])
def test_equals_hugging_face_forward_and_gradients(ff, masked):
    model = build_model("t5-tiny", 200, seed=0, feed_forward_proj=ff)
    assert supports(model)
    if ff.startswith("gated"):  # which backward the gate takes: lmlab's (one-kernel GELU) or autograd's
        act = model.encoder.block[0].layer[1].DenseReluDense.act
        assert _gelu_kind(act) == ("tanh" if ff == "gated-gelu_pytorch_tanh" else None)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 200, (3, 20), generator=g)
    dec = torch.randint(4, 200, (3, 9), generator=g)
    mask = None
    if masked:
        mask = torch.ones(3, 20, dtype=torch.long)
        mask[1, 14:] = 0
    params = list(model.parameters())
    # A fixed random readout: the squared sum of RMS-normed states would be nearly constant, its
    # gradients rounding noise.
    readout = torch.randn(3, 9, model.config.d_model, generator=g)
    ref = _hf_hidden(model, ids, dec, mask)
    ref_g = torch.autograd.grad((ref * readout).sum(), params, allow_unused=True)
    got = t5_decoder_hidden(model, ids, dec, mask)
    got_g = torch.autograd.grad((got * readout).sum(), params, allow_unused=True)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(got_g, ref_g, strict=True):
        if r is None:
            assert a is None
        else:
            torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5 * r.abs().max().item())
    if masked:  # the mask matters: without it row 1 differs
        assert not torch.allclose(t5_decoder_hidden(model, ids, dec)[1], got[1], atol=1e-4)


def test_position_bias_equals_hugging_faces_for_any_lengths():
    from lmlab.models.fast_t5 import _position_bias

    model = build_model("t5-tiny", 100, seed=0)
    enc = model.encoder.block[0].layer[0].SelfAttention
    dec = model.decoder.block[0].layer[0].SelfAttention
    for q, k in ((7, 7), (40, 300), (1, 9), (130, 130)):
        torch.testing.assert_close(_position_bias(enc, q, k, bidirectional=True), enc.compute_bias(q, k))
        torch.testing.assert_close(_position_bias(dec, q, k, bidirectional=False), dec.compute_bias(q, k))


def test_dropout_in_training_falls_back():
    model = build_model("t5-tiny", 100, seed=0, dropout_rate=0.1)
    model.train()
    assert not supports(model)
    model.eval()
    assert supports(model)
    assert not supports(build_model("gpt-tiny", 100, seed=0))


def test_decoder_hidden_switch():
    """``impl``: "reference" is Hugging Face's forward, "auto" the lean one where it applies, "fast"
    an error where it does not (dropout in training)."""
    from lmlab.errors import LmlabError
    from lmlab.models.fast_t5 import decoder_hidden

    model = build_model("t5-tiny", 100, seed=0)
    g = torch.Generator().manual_seed(3)
    ids, dec = torch.randint(4, 100, (2, 12), generator=g), torch.randint(4, 100, (2, 5), generator=g)
    with torch.no_grad():
        assert torch.equal(
            decoder_hidden(model, ids, dec, impl="reference"), _hf_hidden(model, ids, dec, None)
        )
        assert torch.equal(decoder_hidden(model, ids, dec), t5_decoder_hidden(model, ids, dec))
    dropping = build_model("t5-tiny", 100, seed=0, dropout_rate=0.1).train()
    with pytest.raises(LmlabError, match="lean T5 forward: impl='fast' does not apply"):
        decoder_hidden(dropping, ids, dec, impl="fast")


def test_quantized_layers_fall_back():
    from lmlab.quant import NF4Config, quantize_
    from lmlab.train.loss import loss_sum

    model = build_model("t5-tiny", 100, seed=0)
    batch = {"input_ids": torch.randint(4, 100, (2, 64)), "labels": torch.randint(4, 100, (2, 9))}
    quantize_(model, NF4Config())
    assert not supports(model)
    with torch.no_grad():  # the loss still runs, through the model's own forward
        fused, plain = (
            loss_sum(model, batch),
            loss_sum(model, batch, impl="reference"),
        )
    assert fused.item() == pytest.approx(plain.item(), rel=1e-5)


def test_bf16_autocast_is_close_to_hugging_faces_under_autocast():
    model = build_model("t5-tiny", 200, seed=0)
    g = torch.Generator().manual_seed(2)
    ids, dec = torch.randint(4, 200, (4, 24), generator=g), torch.randint(4, 200, (4, 8), generator=g)
    readout = torch.randn(4, 8, model.config.d_model, generator=g)
    params = list(model.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _hf_hidden(model, ids, dec, None)
        got = t5_decoder_hidden(model, ids, dec)
    ref_g = torch.autograd.grad((ref.float() * readout).sum(), params)
    got_g = torch.autograd.grad((got.float() * readout).sum(), params)
    assert got.dtype == ref.dtype
    torch.testing.assert_close(got.float(), ref.float(), rtol=0.02, atol=0.02)
    for a, r in zip(got_g, ref_g, strict=True):  # bf16 products: compare each gradient as a whole
        assert a.dtype == r.dtype
        assert (a - r).norm() <= 0.02 * r.norm() + 1e-6


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rms_norm_backward_against_autograd(dtype):
    from lmlab.models.fast_t5 import _RMSNorm

    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 16, generator=g, dtype=dtype, requires_grad=True)
    w = (1 + 0.2 * torch.randn(16, generator=g, dtype=dtype)).requires_grad_()
    dy = torch.randn(3, 5, 16, generator=g, dtype=dtype)
    ref = torch.nn.functional.rms_norm(x, (16,), w, 1e-6)
    got = _RMSNorm.apply(x, w, 1e-6)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, ref, **tol)
    for a, r in zip(torch.autograd.grad(got, (x, w), dy), torch.autograd.grad(ref, (x, w), dy), strict=True):
        torch.testing.assert_close(a, r, **tol)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda x, w: _RMSNorm.apply(x, w, 1e-6), (x, w))


def test_norm_folded_into_the_next_product():
    """rms_norm(x)·g then a linear layer equals the weightless norm into the matrix W·diag(g):
    forward and the gradients of x, g and W; and the weightless norm's backward passes gradcheck."""
    from types import SimpleNamespace

    from lmlab.models.fast_t5 import _norm_then, _RMSScale

    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, 16, generator=g, requires_grad=True)
    gain = (1 + 0.2 * torch.randn(16, generator=g)).requires_grad_()
    w = torch.randn(24, 16, generator=g, requires_grad=True)
    dy = torch.randn(3, 5, 24, generator=g)
    ref = torch.nn.functional.linear(torch.nn.functional.rms_norm(x, (16,), gain, 1e-6), w)
    h, folded = _norm_then(x, SimpleNamespace(weight=gain, variance_epsilon=1e-6), w)
    assert h.grad_fn.name().startswith("_RMSScale")  # the fp32 path folds
    got = torch.nn.functional.linear(h, folded)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(
        torch.autograd.grad(got, (x, gain, w), dy), torch.autograd.grad(ref, (x, gain, w), dy), strict=True
    ):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
    x64 = x.detach().double().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: _RMSScale.apply(x, 1e-6), (x64,))


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gated_gelu_backward_against_autograd(approximate):
    from lmlab.models.fast_t5 import _GatedGelu

    u = torch.randn(2, 7, 12, dtype=torch.float64, requires_grad=True)
    a, b = u.chunk(2, dim=-1)
    torch.testing.assert_close(
        _GatedGelu.apply(u, approximate), torch.nn.functional.gelu(a, approximate=approximate) * b
    )
    assert torch.autograd.gradcheck(lambda u: _GatedGelu.apply(u, approximate), (u,))


def test_split_heads_backward():
    from lmlab.models.fast_t5 import _SplitHeads

    u = torch.randn(2, 5, 3 * 4 * 3, dtype=torch.float64, requires_grad=True)
    q, k, v = _SplitHeads.apply(u, 3, 4)
    assert q.shape == (2, 4, 5, 3) and q.is_contiguous()
    torch.testing.assert_close(k, u.view(2, 5, 3, 4, 3)[:, :, 1].transpose(1, 2))
    assert torch.autograd.gradcheck(lambda u: _SplitHeads.apply(u, 3, 4), (u,))
    # An output left out of the loss gets a zero gradient.
    (gu,) = torch.autograd.grad(q.sum() + v.sum(), u)
    assert (gu.view(2, 5, 3, 4, 3)[:, :, 1] == 0).all() and (gu.view(2, 5, 3, 4, 3)[:, :, 0] == 1).all()


def test_gelu_kind_knows_only_the_one_kernel_modules():
    from transformers import activations

    assert _gelu_kind(activations.GELUTanh()) == "tanh"
    assert _gelu_kind(activations.GELUActivation()) == "none"
    assert _gelu_kind(activations.GELUTanh(use_gelu_tanh_python=True)) is None
    assert _gelu_kind(activations.NewGELUActivation()) is None
    assert _gelu_kind(torch.nn.ReLU()) is None


def test_bf16_weights_are_close_to_hugging_faces():
    model = build_model("t5-tiny", 200, seed=0).to(torch.bfloat16)
    assert supports(model)
    g = torch.Generator().manual_seed(4)
    ids, dec = torch.randint(4, 200, (2, 16), generator=g), torch.randint(4, 200, (2, 6), generator=g)
    readout = torch.randn(2, 6, model.config.d_model, generator=g)
    params = list(model.parameters())
    ref = _hf_hidden(model, ids, dec, None)
    got = t5_decoder_hidden(model, ids, dec)
    assert got.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref.float(), rtol=0.03, atol=0.03)
    ref_g = torch.autograd.grad((ref.float() * readout).sum(), params)
    got_g = torch.autograd.grad((got.float() * readout).sum(), params)
    for a, r in zip(got_g, ref_g, strict=True):
        assert a.dtype == r.dtype == torch.bfloat16
        assert (a.float() - r.float()).norm() <= 0.03 * r.float().norm() + 1e-6
