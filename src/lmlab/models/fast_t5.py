"""A lean training forward for Hugging Face's T5 (v1.0 / v1.1 / mT5), on the model's own parameters.

``t5_decoder_hidden(model, input_ids, decoder_input_ids, attention_mask)`` computes exactly what
``T5ForConditionalGeneration`` computes up to the decoder's final layer norm — the same
parameters, the same arithmetic (Raffel et al. 2020 §2.1: pre-norm RMS layer norm without
bias, relative position buckets shared by the layers of a stack, unscaled dot-product
attention) — in fewer, larger kernels:

* q, k and v come from one matrix product with the three weights side by side (k and v from
  one for cross-attention), and the gated feed-forward's two input projections from one; their
  backward passes write the parts' gradients into one buffer instead of concatenating them;
* RMS layer norm and the GELU gate have hand-written backward passes (fewer passes over the
  activations than autograd's composites), each tested against autograd with ``gradcheck``;
  where a norm feeds a matrix product (all but each stack's last), its weight is folded into
  that product's matrix, so the norm itself is one scaling;
* the relative-position buckets are computed once per length, and each stack's bias once per
  forward (as Hugging Face does), broadcast over the batch without copying;
* fp32 products go through :func:`lmlab.models.onednn.linear` (oneDNN where it applies, on AMD's
  AVX-512 CPUs by default; ``F.linear`` everywhere else);
* no cache bookkeeping, no fp16 clamping, no output tuples.

The result is a plain function of the model's parameters, so autograd, DDP, checkpoints and
``save_pretrained`` see the unchanged Hugging Face module.  It covers training without dropout
(T5 v1.1's pre-training recipe, and every lmlab ``t5-*`` preset); :func:`supports` says when it
applies.  :func:`decoder_hidden` is the switch (``impl="auto" | "reference" | "fast"``, see
:mod:`lmlab.impl`): the lean forward where it applies, else the model's own encoder and decoder,
the reference it is tested against.
"""

from __future__ import annotations

from functools import lru_cache, partial

import torch
import torch.nn.functional as F

from lmlab.impl import use_fast
from lmlab.models.families.base import fast_routing
from lmlab.models.onednn import linear


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


class _RMSNorm(torch.autograd.Function):
    """``x / sqrt(mean(x²) + eps) · w`` over the last dimension, with a hand-written backward.

    ``F.rms_norm`` on CPU is a composite whose autograd graph makes about ten passes over x
    in the backward; this makes three forward (one norm reduction, two products) and five
    backward.  The statistics are fp32 at least, whatever the input dtype.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        d = x.shape[-1]
        acc = torch.promote_types(x.dtype, torch.float32)
        ss = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=acc)
        rstd = ss.square_().div_(d).add_(eps).rsqrt_()  # (..., 1), fp32 at least
        ctx.save_for_backward(x, w, rstd)
        return torch.mul(x, rstd).mul_(w).to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w, rstd = ctx.saved_tensors
        d = x.shape[-1]
        xhat = x * rstd  # fp32 at least
        dyw = dy.to(rstd.dtype) * w.to(rstd.dtype)  # (the casts are no-ops in fp32)
        # ∂x = rstd · (dy·w − x̂ · mean(dy·w·x̂)), ∂w = Σ_rows dy · x̂
        s = torch.linalg.vecdot(dyw, xhat, dim=-1).unsqueeze(-1).div_(d)
        dx = dyw.addcmul_(xhat, s, value=-1.0).mul_(rstd).to(x.dtype)
        dw = torch.linalg.vecdot(dy.reshape(-1, d).to(xhat.dtype), xhat.reshape(-1, d), dim=0)
        return dx, dw.to(w.dtype), None


class _RMSScale(torch.autograd.Function):
    """``x / sqrt(mean(x²) + eps)`` over the last dimension, fp32, without the norm's weight.

    Used where the norm feeds a matrix product, whose matrix then takes the weight instead
    (:func:`_norm_then`).  The backward needs only the output y (which the product saves
    anyway): ∂x = rstd · (∂y − y · mean(∂y · y)), four passes over the activations.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float) -> torch.Tensor:
        ss = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        rstd = ss.square_().div_(x.shape[-1]).add_(eps).rsqrt_()
        y = x * rstd
        ctx.save_for_backward(y, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        y, rstd = ctx.saved_tensors
        s = torch.linalg.vecdot(dy, y, dim=-1).unsqueeze(-1).div_(y.shape[-1])
        return dy.addcmul(y, s, value=-1.0).mul_(rstd), None


def _norm_then(x: torch.Tensor, norm, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, W)`` with ``F.linear(h, W)`` = ``F.linear(rms_norm(x) ⊙ g, weight)``, g the norm's weight.

    In fp32 (and under autocast, where the residual stream stays fp32) the weight g moves into
    the matrix, W = weight · diag(g): a (out, in) product instead of a pass over the activations,
    and autograd's gradient of g becomes a sum over that small matrix instead of a reduction over
    every row.  Equal in exact arithmetic; rounding differs at the last bit.
    """
    g = norm.weight
    if x.dtype == torch.float32 and g.dtype == torch.float32:
        return _RMSScale.apply(x, norm.variance_epsilon), weight * g
    return _rms(x, norm), weight


def _rms(x: torch.Tensor, norm) -> torch.Tensor:
    if x.dtype == norm.weight.dtype:
        return _RMSNorm.apply(x, norm.weight, norm.variance_epsilon)
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)


class _SplitHeads(torch.autograd.Function):
    """A (B, T, p·n·d) projection output → p contiguous (B, n, T, d) tensors (q, k, v).

    The backward writes the p gradients straight into one (B, T, p·n·d) buffer, where
    autograd's ``chunk`` + ``view`` + ``transpose`` would copy each and then concatenate.
    """

    @staticmethod
    def forward(ctx, u: torch.Tensor, parts: int, n: int):
        B, T, width = u.shape
        ctx.meta = (B, T, width, parts, n, u.dtype, u.device)
        x = u.view(B, T, parts, n, width // (parts * n))
        return tuple(x[:, :, i].transpose(1, 2).contiguous() for i in range(parts))

    @staticmethod
    def backward(ctx, *grads):
        B, T, width, parts, n, dtype, device = ctx.meta
        du = torch.empty(B, T, parts, n, width // (parts * n), dtype=dtype, device=device)
        for i, g in enumerate(grads):
            if g is None:
                du[:, :, i].zero_()
            else:
                du[:, :, i].copy_(g.transpose(1, 2))
        return du.view(B, T, width), None, None


class _GatedGelu(torch.autograd.Function):
    """``gelu(a) ⊙ b`` for ``u = [a | b]`` (the gated feed-forward's one input product).

    The backward writes ∂a and ∂b into one buffer shaped like u: no concatenation.
    """

    @staticmethod
    def forward(ctx, u: torch.Tensor, approximate: str) -> torch.Tensor:
        f = u.shape[-1] // 2
        g = F.gelu(u[..., :f], approximate=approximate)
        ctx.save_for_backward(u, g)
        ctx.approximate = approximate
        return g * u[..., f:]

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        u, g = ctx.saved_tensors
        f = u.shape[-1] // 2
        du = torch.empty_like(u)
        torch.mul(dh, g, out=du[..., f:])
        torch.ops.aten.gelu_backward.grad_input(
            dh * u[..., f:], u[..., :f], approximate=ctx.approximate, grad_input=du[..., :f]
        )
        return du, None


def _gelu_kind(act) -> str | None:
    """``F.gelu``'s ``approximate`` for Hugging Face's one-kernel GELU modules, else None."""
    from transformers import activations

    inner = getattr(act, "act", None)
    # transformers 5's GELUTanh; 4.x's PytorchGELUTanh has no .act and keeps autograd's path.
    gelu_tanh = getattr(activations, "GELUTanh", None)
    one_kernel = isinstance(inner, partial) and inner.func is F.gelu
    if gelu_tanh is not None and type(act) is gelu_tanh and one_kernel:
        return "tanh"
    if type(act) is getattr(activations, "GELUActivation", None) and inner is F.gelu:
        return "none"
    return None


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
            # In place where the dtypes agree (the product's backward keeps q and k, not s): the
            # same numbers, one pass less (fwd+bwd of a (32, 4, 128, 32) attention 12.4 -> 11.7 ms).
            # Under autocast s is bf16 and the fp32 bias promotes it, out of place.
            s = s.add_(bias) if s.dtype == bias.dtype else s + bias
        y = torch.matmul(s.softmax(dim=-1, dtype=torch.float32).to(v.dtype), v)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
    B, n, T, d = y.shape
    return linear(y.transpose(1, 2).reshape(B, T, n * d), attn.o.weight)


def _self_attention(x, norm, attn, bias) -> torch.Tensor:
    h, w = _norm_then(x, norm, torch.cat([attn.q.weight, attn.k.weight, attn.v.weight]))
    q, k, v = _SplitHeads.apply(linear(h, w), 3, attn.n_heads)
    return _attend(q, k, v, bias, attn)


def _cross_attention(x, norm, enc, attn, mask) -> torch.Tensor:
    n = attn.n_heads
    h, w = _norm_then(x, norm, attn.q.weight)
    q = _heads(linear(h, w), n)
    k, v = _SplitHeads.apply(linear(enc, torch.cat([attn.k.weight, attn.v.weight])), 2, n)
    return _attend(q, k, v, mask, attn)


def _feed_forward(x, norm, ff) -> torch.Tensor:
    if hasattr(ff, "wi_0"):  # gated (v1.1, mT5): act(x W0) ⊙ (x W1)
        x, w = _norm_then(x, norm, torch.cat([ff.wi_0.weight, ff.wi_1.weight]))
        u = linear(x, w)
        kind = _gelu_kind(ff.act)
        if kind is not None:
            h = _GatedGelu.apply(u, kind)
        else:
            a, b = u.chunk(2, dim=-1)
            h = ff.act(a) * b
    else:  # T5 1.0: act(x Wi)
        x, w = _norm_then(x, norm, ff.wi.weight)
        h = ff.act(linear(x, w))
    # Hugging Face casts h to wo's dtype; under autocast the product casts it back to bf16 at
    # once, so the round trip (exact) is skipped there.
    if not torch.is_autocast_enabled(h.device.type):
        h = h.to(ff.wo.weight.dtype)
    return linear(h, ff.wo.weight)


def _stack(stack, x, bias, enc=None, cross_mask=None) -> torch.Tensor:
    for block in stack.block:
        layers = block.layer
        x = x + _self_attention(x, layers[0].layer_norm, layers[0].SelfAttention, bias)
        if enc is not None:
            x = x + _cross_attention(x, layers[1].layer_norm, enc, layers[1].EncDecAttention, cross_mask)
        x = x + _feed_forward(x, layers[-1].layer_norm, layers[-1].DenseReluDense)
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


def decoder_hidden(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    decoder_input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """The decoder's final hidden states (B, U, d) of ``model``, before the output projection.

    ``impl="fast"``: :func:`t5_decoder_hidden` (an error where :func:`supports` says no);
    ``"reference"``: Hugging Face's ``model.encoder`` then ``model.decoder`` with torch's own
    kernels; ``"auto"``: the lean forward where it applies, else Hugging Face's forward with fp32
    products through oneDNN where :mod:`lmlab.models.onednn` applies.
    """
    why = "active dropout, a quantized projection or weights neither fp32 nor bf16"
    if use_fast(impl, supports(model), "lean T5 forward", why):
        return t5_decoder_hidden(model, input_ids, decoder_input_ids, attention_mask)
    with fast_routing(model, impl):
        enc = model.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
        return model.decoder(
            input_ids=decoder_input_ids,
            encoder_hidden_states=enc,
            encoder_attention_mask=attention_mask,
            use_cache=False,
        )[0]
