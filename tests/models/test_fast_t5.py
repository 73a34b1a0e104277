"""lmlab's lean T5 training forward against Hugging Face's T5 forward (the reference)."""

from __future__ import annotations

import pytest
import torch

from lmlab.models import build_model
from lmlab.models.fast_t5 import supports, t5_decoder_hidden


def _hf_hidden(model, ids, dec, mask):
    enc = model.encoder(input_ids=ids, attention_mask=mask)[0]
    return model.decoder(
        input_ids=dec, encoder_hidden_states=enc, encoder_attention_mask=mask, use_cache=False
    )[0]


@pytest.mark.parametrize("ff", ["gated-gelu_pytorch_tanh", "relu"])  # v1.1 / mT5, and T5 1.0
@pytest.mark.parametrize("masked", [False, True])
def test_equals_hugging_face_forward_and_gradients(ff, masked):
    model = build_model("t5-tiny", 200, seed=0, feed_forward_proj=ff)
    assert supports(model)
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


def test_quantized_layers_fall_back():
    from lmlab.quant import NF4Config, quantize_
    from lmlab.train.loss import loss_sum

    model = build_model("t5-tiny", 100, seed=0)
    batch = {"input_ids": torch.randint(4, 100, (2, 64)), "labels": torch.randint(4, 100, (2, 9))}
    quantize_(model, NF4Config())
    assert not supports(model)
    with torch.no_grad():  # the loss still runs, through the model's own forward
        fused, plain = (
            loss_sum(model, batch, "encoder-decoder"),
            loss_sum(model, batch, "encoder-decoder", fused=False),
        )
    assert fused.item() == pytest.approx(plain.item(), rel=1e-5)
