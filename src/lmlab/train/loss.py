"""Fused output projection + cross-entropy, and the loss of a model on an objective's batch.

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
``F.cross_entropy``) the fast path is tested against; both take ``impl`` (:mod:`lmlab.impl`).
How a model's body splits from its head is its family's business (:mod:`lmlab.models.families`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lmlab.errors import LmlabError
from lmlab.impl import check_impl, use_fast
from lmlab.models import onednn
from lmlab.models.families import DECODER, family_of
from lmlab.models.families.base import fast_routing, prefix_lm_mask, shift_right
from lmlab.objectives.base import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "loss_sum",
    "model_inputs",
    "prefix_lm_mask",
    "shift_right",
    "split_head",
]

LAYOUTS = ("onednn", "vocab", "row")

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


def _layout(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str:
    """The fastest measured layout of each chunk's logits for these inputs (see the constants above)."""
    if onednn.applies(h, weight) and (bias is None or bias.dtype == torch.float32):
        return "onednn"
    dev = h.device.type
    mm_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    if dev == "cpu" and mm_dtype in (torch.float32, torch.float64):
        return "vocab"
    return "row"


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
    impl: str = "auto",
    chunk_rows: int | None = None,
    layout: str | None = None,
) -> torch.Tensor:
    """Σ over scored rows of cross-entropy(``h @ weightᵀ + bias``, ``targets``), a scalar in fp32 (fp64 for fp64 inputs).

    ``h``: (..., d) hidden states; ``weight``: (V, d); ``bias``: (V,) or None; ``targets``:
    (...) int64 ids, ``-100`` where unscored.  Differentiable in ``h``, ``weight`` and ``bias``.
    ``impl="reference"``: :func:`linear_cross_entropy_reference`; ``"auto"`` / ``"fast"`` (it
    applies everywhere): the fused path, never more than ``chunk_rows`` × V logits at once
    (defaults: 16 MiB on CPUs, 4 MiB for MKL's vocabulary-major fp32 layout; 256 MiB on GPUs).
    ``layout`` (for tests and benchmarks; default the fastest measured for the inputs) holds each
    chunk's logits as ``"vocab"`` (V, rows) or ``"row"`` (rows, V) with torch's products, or
    ``"onednn"`` (rows, V, oneDNN's products, where :mod:`lmlab.models.onednn` applies).  By default
    fp32 on CPUs takes oneDNN where it applies, other CPU fp32/fp64 the vocabulary-major layout,
    everything else row-major.  Equal to the reference to float rounding.
    """
    if not use_fast(impl, True, "linear_cross_entropy"):
        return linear_cross_entropy_reference(h, weight, bias, targets)
    h2 = h.reshape(-1, h.shape[-1])
    y = targets.reshape(-1)
    keep = y != IGNORE_INDEX
    h2, y = h2[keep], y[keep]
    if layout is None:
        layout = _layout(h2, weight, bias)
    elif layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
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


# ---------------------------------------------------------------------------------------------- a model's loss


def model_inputs(model: torch.nn.Module, batch: dict[str, torch.Tensor], start_id: int = 0) -> dict[str, Any]:
    """The keyword arguments of ``model``'s forward for an objective's batch (no labels: lmlab scores),
    as ``model``'s family builds them."""
    return family_of(model).forward_inputs(model, batch, start_id)


def _scored_labels(batch: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """The labels aligned with the model's output positions (−100 where unscored)."""
    labels = batch["labels"]
    if kind == DECODER:
        # Position t predicts label t+1 (Hugging Face's convention for causal LMs).
        labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return labels


def split_head(model: torch.nn.Module) -> str | None:
    """The name of ``model``'s family if its body/head split applies (its own class, a plain
    ``nn.Linear`` head), else None: the model keeps the plain logits path."""
    try:
        fam = family_of(model)
    except LmlabError:
        return None
    return fam.name if fam.splits(model) else None


def loss_sum(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    start_id: int = 0,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """Sum of the token cross-entropies of the batch's scored labels, fp32 scalar.

    ``input_ids`` / ``labels``: (B, T) int64 (``labels`` −100 where unscored).  For decoder-only
    models position t predicts label t+1 (Hugging Face's convention), so both are shifted here.
    ``impl="reference"``: the model's own forward with torch's own kernels, then
    ``F.cross_entropy``; ``"fast"``: the model's body (its family's split, T5's lean forward where
    it applies), then :func:`linear_cross_entropy` on the scored rows (an error for a model whose
    split does not apply, e.g. a quantized head); ``"auto"``: the fast path where it applies, else
    the model's own forward and ``F.cross_entropy``.  Outside the reference, fp32 linear layers on
    CPUs take oneDNN's products where :mod:`lmlab.models.onednn` applies.  The model's family
    (:func:`lmlab.models.families.family_of`) knows its inputs and its body/head split.
    """
    check_impl(impl, "loss_sum")
    fam = family_of(model)
    kw = fam.forward_inputs(model, batch, start_id)
    labels = _scored_labels(batch, fam.kind)
    why = f"{type(model).__name__} is not a plain {'/'.join(fam.head_classes)} with an nn.Linear head"
    if use_fast(impl, fam.splits(model), "fused loss", why):
        keep = labels != IGNORE_INDEX
        h, head = fam.hidden_and_head(model, kw, keep, impl)
        return linear_cross_entropy(h, head.weight, head.bias, labels[keep])
    with fast_routing(model, impl):
        logits = model(**kw).logits  # (B, T, V)
    V = logits.shape[-1]
    return F.cross_entropy(
        logits.reshape(-1, V).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
