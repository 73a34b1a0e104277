"""A model's next-token distributions at the scored positions of a batch: the core every metric reads.

A batch is Hugging Face's vocabulary (``input_ids``, ``attention_mask``, ``labels`` with ``-100``
where unscored, ``decoder_input_ids``); for decoder-only models position t predicts label t+1
(the labels are shifted here, as ``transformers``' causal-LM loss shifts them).  Only the scored
positions ever reach the output projection: a family whose body/head split applies
(:meth:`~lmlab.models.families.base.Family.hidden_and_head`) runs its body once and projects the
scored rows in chunks of at most ``chunk_rows`` × V logits; any other model (another
``transformers`` architecture, a quantized output head) goes through its own forward and its
logits are indexed.  :func:`token_nll` is ``F.cross_entropy(..., reduction="none")`` on those
logits; :func:`iter_logits` hands out the fp32 logits themselves (for the KL divergence of
:mod:`lmlab.eval.damage`).  ``impl="reference"`` is the plain path (the model's forward, whole
logits) that the fast one is tested against.

Which family scores a model is :func:`lmlab.models.families.scoring_family`'s answer, so a new
family needs nothing here.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lmlab.impl import check_impl
from lmlab.models.families import DECODER, scoring_family
from lmlab.models.families.base import fast_routing
from lmlab.objectives.base import IGNORE_INDEX

__all__ = [
    "Scored",
    "aligned_labels",
    "eval_mode",
    "exp_or_inf",
    "iter_logits",
    "scored",
    "start_id",
    "token_nll",
]

# Elements of one chunk of logits: 4 Mi (16 MiB of fp32) on CPUs, 64 Mi on GPUs.
_CPU_CHUNK_ELEMENTS = 1 << 22
_GPU_CHUNK_ELEMENTS = 1 << 26


def start_id(model: torch.nn.Module) -> int:
    """The decoder's start id of an encoder–decoder (``decoder_start_token_id``; T5's pad), else 0."""
    return int(getattr(model.config, "decoder_start_token_id", None) or 0)


def aligned_labels(kind: str, labels: torch.Tensor) -> torch.Tensor:
    """``labels`` (B, T) aligned with the model's output positions: shifted left for a decoder-only
    model (position t predicts label t+1), as they are for the others; −100 where unscored."""
    if kind == DECODER:
        return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return labels


@dataclass
class Scored:
    """A batch's scored positions: ``targets`` (rows,) int64, and either ``hidden`` (rows, d) with the
    ``head`` that projects it, or the ``logits`` (rows, V) of the model's own forward."""

    targets: torch.Tensor
    hidden: torch.Tensor | None = None
    head: torch.nn.Module | None = None
    logits: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.targets.shape[0])


@torch.no_grad()
def scored(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, impl: str = "auto") -> Scored:
    """The scored positions of ``batch`` under ``model``, in row-major (B, T) order."""
    check_impl(impl, "scored")
    fam = scoring_family(model)
    kw = fam.forward_inputs(model, batch, start_id(model))
    labels = aligned_labels(fam.kind, batch["labels"])
    keep = labels != IGNORE_INDEX
    targets = labels[keep]
    if impl != "reference" and fam.splits(model):
        h, head = fam.hidden_and_head(model, kw, keep, impl)
        return Scored(targets, hidden=h, head=head)
    with fast_routing(model, impl):
        logits = model(**kw).logits
    return Scored(targets, logits=logits[keep])


def default_chunk_rows(device: torch.device, vocab: int) -> int:
    """Rows of logits per chunk on ``device`` for a ``vocab``-wide head: 16 MiB of fp32 on CPUs, 256 MiB on GPUs."""
    elements = _GPU_CHUNK_ELEMENTS if device.type != "cpu" else _CPU_CHUNK_ELEMENTS
    return max(8, elements // max(vocab, 1))


def iter_logits(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    chunk_rows: int | None = None,
    impl: str = "auto",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(logits, targets)`` of the scored positions in chunks of ``chunk_rows`` rows: logits
    (m, V) fp32 (fp64 for an fp64 model), targets (m,) int64.  Chunks of two models on one batch
    line up (the same rows, the same ``chunk_rows``)."""
    s = scored(model, batch, impl=impl)
    yield from iter_scored_logits(s, chunk_rows=chunk_rows)


@torch.no_grad()
def iter_scored_logits(
    s: Scored, *, chunk_rows: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The chunks of :func:`iter_logits` from an already :func:`scored` batch."""
    if s.logits is not None:
        vocab, dev = s.logits.shape[-1], s.logits.device
    else:
        vocab, dev = s.head.weight.shape[0], s.hidden.device
    m = int(chunk_rows or default_chunk_rows(dev, vocab))
    for lo in range(0, len(s), m):
        if s.logits is not None:
            z = s.logits[lo : lo + m]
        else:
            z = F.linear(s.hidden[lo : lo + m], s.head.weight, s.head.bias)
        yield z.to(torch.promote_types(z.dtype, torch.float32)), s.targets[lo : lo + m]


def _vocab_major_nll(s: Scored, chunk_rows: int | None) -> torch.Tensor:
    """The NLLs of a split model's scored rows with each chunk's logits held vocabulary-major, (V, m):
    on CPUs in fp32 MKL forms ``W·hᵀ`` faster than ``h·Wᵀ`` (the head's inner dimension is only d),
    and the log-sum-exp runs in place on it.  Measured on 2 cores (d, V: ms per 512 rows, head and
    loss): (128, 8192) 22-26 against 44 for row-major chunks of 512 and ``F.cross_entropy``;
    (384, 8192) 103-110 against 144; (768, 50257) 533 against 747.  The best chunk grows with d."""
    h, W, b, y = s.hidden, s.head.weight, s.head.bias, s.targets
    m = int(chunk_rows or max(32, min(512, h.shape[-1] // 2)))
    parts = []
    for lo in range(0, h.shape[0], m):
        hc, yc = h[lo : lo + m], y[lo : lo + m]
        zt = torch.mm(W, hc.t()) if b is None else torch.addmm(b[:, None], W, hc.t())  # (V, m)
        picked = zt.gather(0, yc[None])[0]
        zmax = zt.amax(dim=0, keepdim=True)
        total = zt.sub_(zmax).exp_().sum(dim=0)
        parts.append((zmax[0] + total.log() - picked).double())
    return torch.cat(parts)


def _vocab_major_applies(s: Scored) -> bool:
    return (
        s.hidden is not None
        and s.hidden.device.type == "cpu"
        and s.hidden.dtype in (torch.float32, torch.float64)
        and s.head.weight.dtype == s.hidden.dtype
        and len(s) > 0
    )


@torch.no_grad()
def token_nll(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    chunk_rows: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Negative log-likelihood (nats) of each scored target, (rows,) float64, row-major over (B, T):
    ``F.cross_entropy(logits, targets, reduction="none")`` without forming the unscored logits (fp32
    and fp64 on CPUs: vocabulary-major chunks, :func:`_vocab_major_nll`)."""
    s = scored(model, batch, impl=impl)
    if _vocab_major_applies(s):
        return _vocab_major_nll(s, chunk_rows)
    parts = [
        F.cross_entropy(z, y, reduction="none").double()
        for z, y in iter_scored_logits(s, chunk_rows=chunk_rows)
    ]
    if not parts:
        return torch.zeros(0, dtype=torch.float64, device=batch["labels"].device)
    return torch.cat(parts)


def model_device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def to_model(batch: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    """The batch's tensors on the model's device."""
    dev = model_device(model)
    return {k: v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@contextlib.contextmanager
def eval_mode(*models: torch.nn.Module) -> Iterator[None]:
    """``models`` in eval mode for the block (no dropout: a score is deterministic), every module's own
    mode restored after, as the caller had it."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for m, training in modes:
            m.training = training


def exp_or_inf(x: float) -> float:
    """``exp(x)``, or ``inf`` where it would overflow (the perplexity of a model that knows nothing)."""
    return math.exp(x) if x < 709.0 else math.inf
