"""A lean training forward for Hugging Face's T5 (v1.0 / v1.1 / mT5), on the model's own parameters.

``t5_decoder_hidden(model, input_ids, decoder_input_ids, attention_mask)`` computes exactly what
``T5ForConditionalGeneration`` computes up to the decoder's final layer norm — the same
parameters, the same arithmetic (Raffel et al. 2020 §2.1: pre-norm RMS layer norm without
bias, relative position buckets shared by the layers of a stack, unscaled dot-product
attention) — in fewer, larger kernels:

* q, k and v come from one matrix product with the three weights side by side (k and v from
  one for cross-attention), and the gated feed-forward's two input projections from one;
* RMS layer norm is ``F.rms_norm`` (one kernel) instead of five elementwise ops;
* the relative-position buckets are computed once per length, and each stack's bias once per
  forward (as Hugging Face does), broadcast over the batch without copying;
* no cache bookkeeping, no fp16 clamping, no output tuples.

The result is a plain function of the model's parameters, so autograd, DDP, checkpoints and
``save_pretrained`` see the unchanged Hugging Face module.  It covers training without dropout
(T5 v1.1's pre-training recipe, and every lmlab ``t5-*`` preset); :func:`supports` says when it
applies, and callers fall back to the model's own forward otherwise.  The reference it is
tested against is that forward.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F


def supports(model: torch.nn.Module) -> bool:
    """Whether :func:`t5_decoder_hidden` reproduces ``model``'s forward (no active dropout, fp32/bf16)."""
    c = model.config
    if getattr(c, "model_type", None) not in ("t5", "mt5"):
        return False
    if model.training and c.dropout_rate > 0:
        return False
    if model.shared.weight.dtype not in (torch.float32, torch.bfloat16):
        return False
    # Every projection must be a plain nn.Linear: a quantized layer (lmlab.quant, bitsandbytes)
    # keeps packed weights that only its own forward can use.
    projections = {"q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"}
    for stack in (model.encoder, model.decoder):
        for name, sub in stack.named_modules():
            if name.rpartition(".")[2] in projections and type(sub) is not torch.nn.Linear:
                return False
    return True


@lru_cache(maxsize=64)
def _buckets(q_len: int, k_len: int, bidirectional: bool, num_buckets: int, max_distance: int, device: str):
    """T5's relative-position bucket of every (query, key) pair, (q_len, k_len) int64, cached per shape.

    The law itself (Mesh TensorFlow's: exact distances, then logarithmic bins up to
    ``max_distance``) is Hugging Face's ``T5Attention._relative_position_bucket``; only the
    per-forward recomputation is saved here.
    """
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(k_len)[None, :] - torch.arange(q_len)[:, None]  # key − query
    out = T5Attention._relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
    return out.to(device)


def _position_bias(attn, q_len: int, k_len: int, bidirectional: bool) -> torch.Tensor:
    """(1, heads, q_len, k_len) bias from a layer's ``relative_attention_bias`` table."""
    table = attn.relative_attention_bias.weight  # (num_buckets, heads)
    b = _buckets(q_len, k_len, bidirectional, attn.relative_attention_num_buckets,
                 attn.relative_attention_max_distance, str(table.device))  # fmt: skip
    return F.embedding(b, table).permute(2, 0, 1).unsqueeze(0)


def _additive_mask(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, 1, 1, T) with 0 where attended and the dtype's minimum where masked."""
    if attention_mask is None:
        return None
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def _rms(x: torch.Tensor, norm) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)


def _heads(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, T, n·d) → (B, n, T, d)."""
    B, T, _ = x.shape
    return x.view(B, T, n, -1).transpose(1, 2)


def _attend(q, k, v, bias, attn) -> torch.Tensor:
    """T5 attention: softmax(q kᵀ + bias) v (no 1/√d scaling), heads merged, then the output projection."""
    if q.device.type == "cpu":
        # On CPUs three plain kernels beat SDPA: with a learned bias it takes its unfused math path
        # anyway, and its fused CPU kernel was slower for T5's short rows (t5-tiny bf16 step 103 vs
        # 124 ms, interleaved A/B on 2 cores; fp32 even).  The softmax runs in fp32 under autocast.
        s = torch.matmul(q, k.transpose(-1, -2))
        if bias is not None:
            s = s + bias
        y = torch.matmul(s.softmax(dim=-1, dtype=torch.float32).to(v.dtype), v)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
    B, n, T, d = y.shape
    return F.linear(y.transpose(1, 2).reshape(B, T, n * d), attn.o.weight)


def _self_attention(x, attn, bias) -> torch.Tensor:
    w = torch.cat([attn.q.weight, attn.k.weight, attn.v.weight])
    q, k, v = F.linear(x, w).chunk(3, dim=-1)
    n = attn.n_heads
    return _attend(_heads(q, n), _heads(k, n), _heads(v, n), bias, attn)


def _cross_attention(x, enc, attn, mask) -> torch.Tensor:
    n = attn.n_heads
    q = _heads(F.linear(x, attn.q.weight), n)
    k, v = F.linear(enc, torch.cat([attn.k.weight, attn.v.weight])).chunk(2, dim=-1)
    return _attend(q, _heads(k, n), _heads(v, n), mask, attn)


def _feed_forward(x, ff) -> torch.Tensor:
    if hasattr(ff, "wi_0"):  # gated (v1.1, mT5): act(x W0) ⊙ (x W1)
        a, b = F.linear(x, torch.cat([ff.wi_0.weight, ff.wi_1.weight])).chunk(2, dim=-1)
        h = ff.act(a) * b
    else:  # T5 1.0: act(x Wi)
        h = ff.act(F.linear(x, ff.wi.weight))
    return F.linear(h.to(ff.wo.weight.dtype), ff.wo.weight)


def _stack(stack, x, bias, enc=None, cross_mask=None) -> torch.Tensor:
    for block in stack.block:
        layers = block.layer
        x = x + _self_attention(_rms(x, layers[0].layer_norm), layers[0].SelfAttention, bias)
        if enc is not None:
            x = x + _cross_attention(
                _rms(x, layers[1].layer_norm), enc, layers[1].EncDecAttention, cross_mask
            )
        x = x + _feed_forward(_rms(x, layers[-1].layer_norm), layers[-1].DenseReluDense)
    return _rms(x, stack.final_layer_norm)


def t5_decoder_hidden(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    decoder_input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The decoder's final hidden states (B, U, d), before the output projection and its rescaling.

    Equal, to float rounding, to ``model.decoder(...)[0]`` after ``model.encoder(...)`` with the
    same inputs (``attention_mask`` (B, T) masks encoder positions for both stacks).
    """
    enc_stack, dec_stack = model.encoder, model.decoder
    T, U = input_ids.shape[1], decoder_input_ids.shape[1]
    x = F.embedding(input_ids, model.shared.weight)
    pad = _additive_mask(attention_mask, x.dtype)
    first = enc_stack.block[0].layer[0].SelfAttention
    bias = _position_bias(first, T, T, bidirectional=True)
    enc = _stack(enc_stack, x, bias if pad is None else bias + pad)

    y = F.embedding(decoder_input_ids, model.shared.weight)
    first = dec_stack.block[0].layer[0].SelfAttention
    causal = torch.full((U, U), torch.finfo(y.dtype).min, dtype=y.dtype, device=y.device).triu_(1)
    dec_bias = _position_bias(first, U, U, bidirectional=False) + causal
    return _stack(dec_stack, y, dec_bias, enc=enc, cross_mask=pad)
