"""Fused output projection + cross-entropy, and the per-family split of a model into body and head.

A language model's last step, ``logits = h @ Wᵀ + b`` followed by the softmax cross-entropy, is
the widest tensor of training: (tokens × vocabulary), 134 MB in fp32 for 4096 tokens of an
8192-id vocabulary, written by the projection, read and rewritten by ``log_softmax``, its
backward and the zero-filled gradient of ``nll_loss``.  :func:`linear_cross_entropy` never
forms it: it walks the scored rows in chunks, and for each chunk computes the logits, their
log-sum-exp, the loss and — at once, while the chunk is still in cache — the chunk's gradient
``softmax − onehot``, which it folds straight into ∂h and ∂W.  The backward pass only scales
those by the incoming gradient.  The arithmetic is the textbook one (∂CE/∂z = softmax(z) −
onehot(y)); chunking the vocabulary projection this way is the idea of "Cut Your Losses in
Large-Vocabulary Language Models" (Wijmans et al. 2024) and Liger-Kernel's fused linear
cross-entropy (Hsu et al. 2024), here in plain PyTorch ops so it runs on any device.

Rows whose label is ``-100`` are dropped before the projection, so BERT's masked LM (15% of
positions scored) projects 15% of the rows, where Hugging Face's heads project them all.

:func:`linear_cross_entropy_reference` is the plain PyTorch path (materialised logits,
``F.cross_entropy``) the fast path is tested against.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lmlab.models import onednn
from lmlab.objectives.base import IGNORE_INDEX

# Elements of one chunk's logits: 4 Mi (16 MiB of fp32, 512 rows of an 8192-id vocabulary) on CPUs.
# Measured on 2 cores, d 128 (bench/loss.py): 32-row chunks were 1.4x slower than 128-512 rows, and
# 512 beat 128 where there are few rows (960: fp32 1.0-1.1x the plain path instead of 0.8-1.0x),
# as bigger chunks give the weight-gradient product a longer inner dimension.  GPUs take bigger chunks.
_CPU_CHUNK_ELEMENTS = 1 << 22
_GPU_CHUNK_ELEMENTS = 1 << 26


# fp32 on CPUs: logits laid out vocabulary-major, (V, rows), in chunks of 1 Mi elements (128 rows of
# 8192).  MKL's fp32 product W·hᵀ runs at ~185 GFLOP/s on 2 cores where h·Wᵀ (rows, V) runs at
# ~125-150 (d 128, 512 rows); the other two products and the softmax take strided views either way.
_CPU_FP32_CHUNK_ELEMENTS = 1 << 20


# fp32 through oneDNN (where lmlab.models.onednn applies): row-major logits, 4 Mi elements a chunk.  bench/loss.py
# on 2 cores, d 128, V 8192, fwd+bwd ms for 960 / 4096 rows: 1 Mi 26.4 / 134, 2 Mi 26.8 / 110, 4 Mi 24.4 / 90,
# 8 Mi 24.7 / 141 (MKL's vocabulary-major path: 41.5 / 164).
_CPU_ONEDNN_CHUNK_ELEMENTS = 1 << 22


def _vocab_major(device: torch.device, mm_dtype: torch.dtype) -> bool:
    return device.type == "cpu" and mm_dtype in (torch.float32, torch.float64)


def _chunk_rows(device: torch.device, vocab: int, layout: str) -> int:
    if device.type != "cpu":
        elements = _GPU_CHUNK_ELEMENTS
    elif layout == "vocab":
        elements = _CPU_FP32_CHUNK_ELEMENTS
    elif layout == "onednn":
        elements = _CPU_ONEDNN_CHUNK_ELEMENTS
    else:
        elements = _CPU_CHUNK_ELEMENTS
    return max(8, elements // max(vocab, 1))


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of CE(h @ Wᵀ + b, y); the gradients are formed in the forward pass."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk: int, layout: str):
        n, vocab = h.shape[0], weight.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        # The matrix products run in the autocast dtype when autocast is on (bf16), the softmax, the
        # sum and the weight gradients in fp32 at least.  Cast once here, not once per chunk.
        dev = h.device.type
        mm_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        acc = torch.promote_types(mm_dtype, torch.float32)
        grad_h = torch.empty_like(h) if need_h else None
        # oneDNN accumulates ∂Wᵀ (d, V), the orientation it forms fastest, transposed once at the end.
        w_shape = weight.shape[::-1] if layout == "onednn" else weight.shape
        grad_w = torch.zeros(w_shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(vocab, dtype=acc, device=weight.device) if need_b else None
        total = torch.zeros((), dtype=acc, device=h.device)
        hm, wm = h.to(mm_dtype), weight.to(mm_dtype)
        bm = bias.to(mm_dtype) if bias is not None else None
        wt = wm.t().contiguous() if layout == "onednn" and need_h else None  # (d, V): ∂h's operand
        rows = torch.arange(chunk, device=h.device)
        with torch.autocast(dev, enabled=False):
            for start in range(0, n, chunk):
                hc, yc = hm[start : start + chunk], targets[start : start + chunk]
                m = hc.shape[0]
                if layout == "onednn":
                    z = onednn.mm_nt(hc, wm, bm)  # (m, V) logits
                elif layout == "vocab":
                    # stored (V, m), used through its transpose: see _CPU_FP32_CHUNK_ELEMENTS
                    zt = torch.mm(wm, hc.t()) if bm is None else torch.addmm(bm[:, None], wm, hc.t())
                    z = zt.to(acc).t()
                else:
                    z = F.linear(hc, wm, bm).to(acc)  # (m, V) logits
                picked = z.gather(1, yc[:, None])  # the target logits, before z is overwritten
                zmax = z.amax(dim=1, keepdim=True)
                z.sub_(zmax).exp_()  # z ← exp(z − max): the softmax numerators, in place
                denom = z.sum(dim=1, keepdim=True)
                total += (zmax + denom.log() - picked).sum()
                if grad_h is None and grad_w is None and grad_b is None:
                    continue
                z.div_(denom)  # softmax
                z[rows[:m], yc] -= 1.0  # softmax − onehot = ∂CE/∂z for each row
                if grad_b is not None:
                    grad_b += z.sum(dim=0)
                g = z.to(mm_dtype)
                if layout == "onednn":
                    if grad_h is not None:
                        grad_h[start : start + m] = onednn.mm_nt(g, wt)
                    if grad_w is not None:
                        grad_w += onednn.mm_nt(hc.t(), g.t())  # ∂Wᵀ: (d, m)·(m, V)
                    continue
                if grad_h is not None:
                    if grad_h.dtype == g.dtype:
                        torch.mm(g, wm, out=grad_h[start : start + m])
                    else:
                        grad_h[start : start + m] = g @ wm
                if grad_w is not None:
                    if grad_w.dtype == g.dtype:
                        grad_w.addmm_(g.t(), hc)  # accumulate in place: no (V, d) temporary
                    else:
                        grad_w += (g.t() @ hc).to(acc)
        if layout == "onednn" and grad_w is not None:
            grad_w = grad_w.t().contiguous()
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(w_dtype) if grad_w is not None else None
        gb = (grad_b * grad_out).to(b_dtype) if grad_b is not None else None
        return gh, gw, gb, None, None, None


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    chunk_rows: int | None = None,
    vocab_major: bool | None = None,
) -> torch.Tensor:
    """Σ over scored rows of cross-entropy(``h @ weightᵀ + bias``, ``targets``), a scalar in fp32 (fp64 for fp64 inputs).

    ``h``: (..., d) hidden states; ``weight``: (V, d); ``bias``: (V,) or None; ``targets``:
    (...) int64 ids, ``-100`` where unscored.  Differentiable in ``h``, ``weight`` and ``bias``;
    never forms more than ``chunk_rows`` × V logits at once (defaults: 16 MiB on CPUs, 4 MiB for
    MKL's vocabulary-major fp32 layout; 256 MiB on GPUs).  ``vocab_major`` (default None: the
    fastest measured) True/False forces torch's own products with each chunk's logits held as
    (V, rows) / (rows, V); by default fp32 on CPUs takes oneDNN's products where
    :mod:`lmlab.models.onednn` applies (AMD's AVX-512 cores), other CPU fp32/fp64 the
    vocabulary-major layout, everything else row-major.  Equal to :func:`linear_cross_entropy_reference` to float rounding.
    """
    h2 = h.reshape(-1, h.shape[-1])
    y = targets.reshape(-1)
    keep = y != IGNORE_INDEX
    h2, y = h2[keep], y[keep]
    dev = h.device.type
    mm_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    if vocab_major is None and onednn.applies(h2, weight) and (bias is None or bias.dtype == torch.float32):
        layout = "onednn"
    elif vocab_major is None:
        layout = "vocab" if _vocab_major(h.device, mm_dtype) else "row"
    else:
        layout = "vocab" if vocab_major else "row"
    chunk = int(chunk_rows or _chunk_rows(h.device, weight.shape[0], layout))
    if chunk < 1:
        raise ValueError(f"chunk_rows must be positive, not {chunk}")
    return _LinearCrossEntropy.apply(h2, weight, bias, y, chunk, layout)


def linear_cross_entropy_reference(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
) -> torch.Tensor:
    """The plain path: full fp32 logits, then ``F.cross_entropy(..., reduction="sum")``."""
    logits = F.linear(h, weight, bias)
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).to(torch.promote_types(logits.dtype, torch.float32)),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


# ---------------------------------------------------------------------------------------------- model split


def shift_right(labels: torch.Tensor, start: int) -> torch.Tensor:
    """T5's decoder inputs: the labels moved one step right, ``start`` first and in place of -100."""
    out = labels.new_full(labels.shape, start)
    out[:, 1:] = labels[:, :-1]
    return out.masked_fill(out == IGNORE_INDEX, start)


def model_inputs(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], family: str, start_id: int = 0
) -> dict[str, Any]:
    """The keyword arguments of ``model``'s forward for an objective's batch (no labels: lmlab scores)."""
    from lmlab.models import DECODER, ENCODER_DECODER

    kw: dict[str, Any] = {"input_ids": batch["input_ids"]}
    if "attention_mask" in batch:
        kw["attention_mask"] = batch["attention_mask"]
    if family == ENCODER_DECODER:
        dec = batch.get("decoder_input_ids")
        kw["decoder_input_ids"] = dec if dec is not None else shift_right(batch["labels"], start_id)
        kw["use_cache"] = False
    elif family == DECODER:
        kw["use_cache"] = False
        if "prefix_mask" in batch:
            mask = prefix_lm_mask(batch["prefix_mask"], batch.get("attention_mask"))
            if model.config._attn_implementation == "eager":
                # Eager attention adds its mask: 0 where attended, the dtype's minimum elsewhere.
                dtype = next(model.parameters()).dtype
                bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
                mask = bias.masked_fill_(~mask, torch.finfo(dtype).min)
            kw["attention_mask"] = mask
    return kw


def prefix_lm_mask(prefix_mask: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 1, T, T) bool, True where query i may attend to key j: the prefix LM's mask.

    Raffel et al. 2020 §3.2.1, Figure 3 (right): fully visible inside the prefix (``prefix_mask``
    (B, T), 1 on the prefix), causal elsewhere, and never onto padding (``attention_mask``).  A
    prepared 4D mask, which Hugging Face's decoders take as it is.
    """
    T = prefix_mask.shape[1]
    p = prefix_mask.bool()
    causal = torch.ones(T, T, dtype=torch.bool, device=p.device).tril_()
    allowed = causal[None] | (p[:, :, None] & p[:, None, :])
    if attention_mask is not None:
        allowed &= attention_mask.bool()[:, None, :]
    return allowed[:, None]


def _scored_labels(batch: dict[str, torch.Tensor], family: str) -> torch.Tensor:
    """The labels aligned with the model's output positions (−100 where unscored)."""
    from lmlab.models import DECODER

    labels = batch["labels"]
    if family == DECODER:
        # Position t predicts label t+1 (Hugging Face's convention for causal LMs).
        labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return labels


def split_head(model: torch.nn.Module) -> str | None:
    """Which of lmlab's body/head splits fits ``model`` ("t5", "gpt2", "bert"), or None.

    The split must reproduce the model's own ``forward`` exactly (tested against it); any
    model it does not know keeps the plain logits path.
    """
    t = getattr(getattr(model, "config", None), "model_type", None)
    name = type(model).__name__
    kind = None
    if t in ("t5", "mt5") and name in ("T5ForConditionalGeneration", "MT5ForConditionalGeneration"):
        kind = "t5"
    elif t == "gpt2" and name == "GPT2LMHeadModel":
        kind = "gpt2"
    elif t == "bert" and name == "BertForMaskedLM":
        kind = "bert"
    # The fused loss reads the output layer's weight: it must be a plain nn.Linear, not a quantized one.
    if kind is None or type(model.get_output_embeddings()) is not torch.nn.Linear:
        return None
    return kind


def _on_cpu_in_fp32(model: torch.nn.Module) -> bool:
    p = next(model.parameters(), None)
    return p is not None and p.device.type == "cpu" and p.dtype == torch.float32


def _hidden_and_head(model: torch.nn.Module, kind: str, kw: dict[str, Any], labels: torch.Tensor):
    """(scored hidden rows, their targets, output weight, output bias): everything before the projection."""
    keep = labels != IGNORE_INDEX
    # Hugging Face's own forwards take oneDNN's fp32 products where lmlab.models.onednn applies;
    # lmlab's T5 forward calls them itself.
    route = onednn.routing(_on_cpu_in_fp32(model))
    if kind == "t5":
        from lmlab.models import fast_t5

        if fast_t5.supports(model):
            h = fast_t5.t5_decoder_hidden(
                model, kw["input_ids"], kw["decoder_input_ids"], kw.get("attention_mask")
            )
        else:
            with route:
                enc = model.encoder(input_ids=kw["input_ids"], attention_mask=kw.get("attention_mask"))[0]
                h = model.decoder(
                    input_ids=kw["decoder_input_ids"],
                    encoder_hidden_states=enc,
                    encoder_attention_mask=kw.get("attention_mask"),
                    use_cache=False,
                )[0]
        h = h[keep]
        if model.config.scale_decoder_outputs:
            h = h * (model.model_dim**-0.5)
        head = model.lm_head
    elif kind == "gpt2":
        with route:
            h = model.transformer(
                input_ids=kw["input_ids"], attention_mask=kw.get("attention_mask"), use_cache=False
            )[0][keep]
        head = model.lm_head
    else:  # bert: the head's transform is per token, so it runs on the scored rows only
        with route:
            h = model.bert(input_ids=kw["input_ids"], attention_mask=kw.get("attention_mask"))[0][keep]
            h = model.cls.predictions.transform(h)
        head = model.cls.predictions.decoder
    return h, labels[keep], head.weight, head.bias


def loss_sum(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    family: str,
    start_id: int = 0,
    fused: bool = True,
) -> torch.Tensor:
    """Sum of the token cross-entropies of the batch's scored labels, fp32 scalar.

    ``input_ids`` / ``labels``: (B, T) int64 (``labels`` −100 where unscored).  For decoder-only
    models position t predicts label t+1 (Hugging Face's convention), so both are shifted here.
    ``fused`` (default): the model's body, then :func:`linear_cross_entropy` on the scored
    rows, for the models :func:`split_head` knows; otherwise the model's own forward and
    ``F.cross_entropy`` on its logits.  Either way fp32 linear layers on CPUs take oneDNN's
    products where :mod:`lmlab.models.onednn` applies.  ``fused=False`` is the plain reference: the model's
    own forward with torch's own kernels, then ``F.cross_entropy``.
    """
    kw = model_inputs(model, batch, family, start_id)
    labels = _scored_labels(batch, family)
    kind = split_head(model) if fused else None
    if kind is not None:
        h, y, weight, bias = _hidden_and_head(model, kind, kw, labels)
        return linear_cross_entropy(h, weight, bias, y)
    with onednn.routing(fused and _on_cpu_in_fp32(model)):
        logits = model(**kw).logits  # (B, T, V)
    V = logits.shape[-1]
    return F.cross_entropy(
        logits.reshape(-1, V).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
