"""How much a candidate model (a quantized copy, a pruned or distilled one) departs from its base.

This is llama.cpp's quantization protocol (``llama-perplexity --kl-divergence``; tools/perplexity
README, "KL divergence statistics"; the statistics of ggml-org/llama.cpp PRs #5076 and #5081): on
the very same tokens, the base model's next-token distribution p and the candidate's q at every
scored position, and

* the Kullback–Leibler divergence KL(p‖q) = Σ_v p_v (log p_v − log q_v) per position: its mean with
  the standard error, its median, 90/95/99/99.9th percentiles and maximum;
* the share of positions whose most likely token is the same under both ("same top p");
* both models' perplexity (and bits per byte when the text's UTF-8 bytes are known): ΔPPL, the
  ratio PPL(q)/PPL(p) and ln of it with its standard error (paired over positions);
* the change of the correct token's probability, Δp = q(y) − p(y): mean, RMS and percentiles.

Percentiles interpolate linearly between order statistics (numpy's default, llama.cpp's rule);
standard errors are sd/√n with the sample variance, as llama.cpp prints them (its ``± …``).

Which positions are scored: for a decoder-only base, the sliding windows of
:mod:`lmlab.eval.causal`, so ``compare(...).base.perplexity`` is ``perplexity(base, ...)``'s
number; for T5 and BERT, objective batches (:func:`lmlab.eval.denoising.objective_batches`, fixed
by a seed), so both models see the same corruption.  Either way both models score the same batch
and their fp32 logits are walked in lockstep, one chunk of rows at a time
(:func:`lmlab.eval.scoring.iter_scored_logits`): no (tokens, V) tensor is ever formed.

Run: ``lmlab eval QUANTIZED_DIR --compare BASE_DIR --corpus wiki.test.raw`` (or in Python,
``compare(base, quantized, tokenizer, open("wiki.test.raw").read(), max_length=1024, stride=512)``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmlab.errors import LmlabError
from lmlab.eval.scoring import default_chunk_rows, eval_mode, exp_or_inf, iter_scored_logits, scored, to_model
from lmlab.models.families import DECODER, scoring_family

__all__ = ["CompareResult", "ModelScore", "check_same_tokenizer", "compare", "distribution_stats"]

#: The KL percentiles reported, as (name, fraction).
KL_QUANTILES = (("median", 0.5), ("p90", 0.9), ("p95", 0.95), ("p99", 0.99), ("p999", 0.999))
#: The Δp percentiles reported (llama.cpp prints these among others).
DELTA_P_QUANTILES = (("p1", 0.01), ("p5", 0.05), ("p50", 0.5), ("p95", 0.95), ("p99", 0.99))


@torch.no_grad()
def distribution_stats(
    base_logits: torch.Tensor, cand_logits: torch.Tensor, targets: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-position statistics of two models' next-token distributions.

    ``base_logits`` and ``cand_logits`` (m, V), any float dtype, on one device; ``targets`` (m,)
    int64, the correct tokens.  Log-softmax runs in fp32 (fp64 when either input is fp64).

    Returns (m,) tensors: ``kl`` = KL(p‖q) in nats (p the base, q the candidate; exactly 0 for
    identical logits; fp rounding's tiny negatives, ~1e-9, are clamped to 0), ``top1_agree``
    (bool: argmax p == argmax q), ``p_base`` and ``p_cand`` (each model's probability of the
    target), ``nll_base`` and ``nll_cand`` (−log of them).
    """
    if base_logits.dim() != 2 or base_logits.shape != cand_logits.shape:
        raise LmlabError(
            f"distribution_stats: base and candidate logits must both be (m, V), got "
            f"{tuple(base_logits.shape)} and {tuple(cand_logits.shape)}"
        )
    if targets.shape != base_logits.shape[:1]:
        raise LmlabError(
            f"distribution_stats: targets must be ({base_logits.shape[0]},), got {tuple(targets.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(base_logits.dtype, cand_logits.dtype), torch.float32)
    lp = F.log_softmax(base_logits.to(dtype), dim=-1)  # (m, V)
    lq = F.log_softmax(cand_logits.to(dtype), dim=-1)
    p = lp.exp()
    # Where p is 0 (a −inf logit) the term is 0 by convention, even where q is 0 too (nan otherwise).
    kl = torch.where(p > 0, p * (lp - lq), 0.0).sum(-1).clamp_min_(0.0)
    y = targets.long().unsqueeze(-1)
    ll_base = lp.gather(-1, y).squeeze(-1)
    ll_cand = lq.gather(-1, y).squeeze(-1)
    return {
        "kl": kl,
        "top1_agree": base_logits.argmax(-1) == cand_logits.argmax(-1),
        "p_base": ll_base.exp(),
        "p_cand": ll_cand.exp(),
        "nll_base": -ll_base,
        "nll_cand": -ll_cand,
    }


@dataclass(frozen=True)
class ModelScore:
    """One model's score on the compared positions: mean NLL (nats per token), its perplexity and,
    when the text's bytes are known, bits per byte (−Σ log p / bytes / ln 2)."""

    mean_nll: float
    perplexity: float
    bits_per_byte: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CompareResult:
    """What :func:`compare` measured; ``None`` where a figure is undefined (one position, no bytes)."""

    positions: int
    kl_mean: float
    kl_stderr: float | None
    kl_median: float
    kl_p90: float
    kl_p95: float
    kl_p99: float
    kl_p999: float
    kl_max: float
    top1_agreement: float
    top1_agreement_stderr: float | None
    base: ModelScore
    candidate: ModelScore
    delta_perplexity: float
    perplexity_ratio: float
    ln_perplexity_ratio: float
    ln_perplexity_ratio_stderr: float | None
    delta_bits_per_byte: float | None
    mean_delta_p: float
    rms_delta_p: float
    delta_p_percentiles: dict[str, float] = field(default_factory=dict)
    n_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["base"], d["candidate"] = self.base.to_dict(), self.candidate.to_dict()
        return d


def check_same_tokenizer(
    tok_a: Any, tok_b: Any, names: tuple[str, str] = ("MODEL", "--compare BASE")
) -> None:
    """A one-line :class:`LmlabError` naming both when the two tokenizers' ids mean different
    tokens (:func:`lmlab.data.tokenizer.vocab_sha256` differs): their logits are incomparable."""
    from lmlab.data.tokenizer import vocab_sha256

    if vocab_sha256(tok_a) != vocab_sha256(tok_b):
        raise LmlabError(
            f"{names[0]} and {names[1]} have different tokenizers (vocabularies differ): "
            "their distributions cannot be compared token by token"
        )


def _stderr(values: np.ndarray) -> float | None:
    """sd/√n with the sample variance; ``None`` for fewer than two values."""
    n = values.size
    if n < 2:
        return None
    return float(np.std(values, dtype=np.float64, ddof=1) / math.sqrt(n))


class _Tally:
    """Running fp64 sums (on the logits' device: no sync per chunk) and the per-position KL, Δp and
    NLL difference (fp32, on the CPU) for the percentiles and standard errors."""

    # The sums, in this order: NLL of the base, of the candidate, KL, Δp, Δp², same top token.
    _SUMS = ("nll_base", "nll_cand", "kl", "dp", "dp2", "same_top")

    def __init__(self) -> None:
        self.kl: list[torch.Tensor] = []
        self.dp: list[torch.Tensor] = []
        self.d_nll: list[torch.Tensor] = []
        self.sums: torch.Tensor | None = None

    def add(self, s: dict[str, torch.Tensor]) -> None:
        nb, nc = s["nll_base"].double(), s["nll_cand"].double()
        dp = s["p_cand"].double() - s["p_base"].double()
        part = torch.stack(
            [
                nb.sum(),
                nc.sum(),
                s["kl"].double().sum(),
                dp.sum(),
                (dp * dp).sum(),
                s["top1_agree"].sum().double(),
            ]
        )
        self.sums = part if self.sums is None else self.sums + part.to(self.sums.device)
        self.kl.append(s["kl"].float().cpu())
        self.dp.append(dp.float().cpu())
        self.d_nll.append((nc - nb).float().cpu())

    @property
    def n(self) -> int:
        return sum(int(k.numel()) for k in self.kl)

    def result(self, n_bytes: int | None) -> CompareResult:
        n = self.n
        if n == 0 or self.sums is None:
            raise LmlabError("compare: no scored positions (the text is too short, or no batch has a label)")
        sums = dict(zip(self._SUMS, self.sums.cpu().tolist(), strict=True))
        kl = torch.cat(self.kl).numpy().astype(np.float64)
        dp = torch.cat(self.dp).numpy().astype(np.float64)
        d_nll = torch.cat(self.d_nll).numpy().astype(np.float64)
        kq = dict(
            zip([k for k, _ in KL_QUANTILES], np.quantile(kl, [q for _, q in KL_QUANTILES]), strict=True)
        )
        dq = np.quantile(dp, [q for _, q in DELTA_P_QUANTILES])
        top1 = sums["same_top"] / n
        scores = []
        for s in (sums["nll_base"], sums["nll_cand"]):
            bpb = s / n_bytes / math.log(2) if n_bytes else None
            scores.append(ModelScore(mean_nll=s / n, perplexity=exp_or_inf(s / n), bits_per_byte=bpb))
        base, cand = scores
        ln_ratio = cand.mean_nll - base.mean_nll
        return CompareResult(
            positions=n,
            kl_mean=sums["kl"] / n,
            kl_stderr=_stderr(kl),
            kl_median=float(kq["median"]),
            kl_p90=float(kq["p90"]),
            kl_p95=float(kq["p95"]),
            kl_p99=float(kq["p99"]),
            kl_p999=float(kq["p999"]),
            kl_max=float(kl.max()),
            top1_agreement=top1,
            top1_agreement_stderr=math.sqrt(top1 * (1 - top1) / (n - 1)) if n > 1 else None,
            base=base,
            candidate=cand,
            delta_perplexity=cand.perplexity - base.perplexity,
            perplexity_ratio=exp_or_inf(ln_ratio),
            ln_perplexity_ratio=ln_ratio,
            ln_perplexity_ratio_stderr=_stderr(d_nll),
            delta_bits_per_byte=(
                cand.bits_per_byte - base.bits_per_byte if n_bytes else None  # type: ignore[operator]
            ),
            mean_delta_p=sums["dp"] / n,
            rms_delta_p=math.sqrt(sums["dp2"] / n),
            delta_p_percentiles={k: float(v) for (k, _), v in zip(DELTA_P_QUANTILES, dq, strict=True)},
            n_bytes=int(n_bytes) if n_bytes else None,
        )


def _vocab_width(model: torch.nn.Module) -> int | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    w = getattr(head, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 2 and w.is_floating_point():
        return int(w.shape[0])
    v = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(v) if v is not None else None


def _check_pair(base: torch.nn.Module, candidate: torch.nn.Module) -> str:
    """The models' common kind; a one-line error for different kinds or vocabulary widths."""
    kb, kc = scoring_family(base).kind, scoring_family(candidate).kind
    if kb != kc:
        raise LmlabError(
            f"compare: the base is a {kb} model and the candidate a {kc} one; compare models of one kind"
        )
    vb, vc = _vocab_width(base), _vocab_width(candidate)
    if vb is not None and vc is not None and vb != vc:
        raise LmlabError(
            f"compare: the base predicts {vb} tokens and the candidate {vc}; their vocabularies differ"
        )
    return kb


@torch.no_grad()
def _compare_batches(
    base: torch.nn.Module,
    candidate: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    n_bytes: int | None = None,
    impl: str = "auto",
    chunk_rows: int | None = None,
    total: int | None = None,
    progress: bool = False,
) -> CompareResult:
    """:func:`compare` on given batches (HF batch dicts, ``labels`` −100 where unscored), each
    scored by both models on their own devices."""
    from lmlab.progress import progress_bar

    _check_pair(base, candidate)
    tally = _Tally()
    with (
        eval_mode(base, candidate),
        progress_bar(total=total, desc="compare", unit="batch", disable=not progress) as bar,
    ):
        for batch in batches:
            if isinstance(batch, tuple):  # objective_batches' (batch, raw rows)
                batch = batch[0]
            sb = scored(base, to_model(batch, base), impl=impl)
            sc = scored(candidate, to_model(batch, candidate), impl=impl)
            if len(sb) != len(sc):
                raise LmlabError(
                    f"compare: the base scores {len(sb)} positions of a batch, the candidate {len(sc)}"
                )
            rows = chunk_rows
            if rows is None:
                # The same rows on both sides: the smaller of the two models' chunk sizes.
                rows = min(_default_rows(sb), _default_rows(sc))
            for (zb, yb), (zc, yc) in zip(
                iter_scored_logits(sb, chunk_rows=rows), iter_scored_logits(sc, chunk_rows=rows), strict=True
            ):
                if zb.shape[-1] != zc.shape[-1]:
                    raise LmlabError(
                        f"compare: the base predicts {zb.shape[-1]} tokens and the candidate {zc.shape[-1]}; "
                        "their vocabularies differ"
                    )
                if not torch.equal(yb, yc.to(yb.device)):
                    raise LmlabError("compare: the two models score different targets on the same batch")
                tally.add(distribution_stats(zb, zc.to(zb.device), yb))
            bar.update(1)
    return tally.result(n_bytes)


def _default_rows(s: Any) -> int:
    if s.logits is not None:
        return default_chunk_rows(s.logits.device, s.logits.shape[-1])
    return default_chunk_rows(s.hidden.device, s.head.weight.shape[0])


def compare(
    base: torch.nn.Module,
    candidate: torch.nn.Module,
    tokenizer: Any,
    texts_or_ids: Any = None,
    *,
    batches: Iterable[dict[str, torch.Tensor]] | None = None,
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    n_bytes: int | None = None,
    progress: bool = False,
    impl: str = "auto",
) -> CompareResult:
    """llama.cpp's quantization statistics of ``candidate`` against ``base`` on the same tokens.

    ``texts_or_ids``: what :func:`lmlab.eval.causal.perplexity` takes (texts, an
    :class:`~lmlab.eval.text.EvalText`, or ids (N,) int64); or ``batches``, HF batch dicts (the
    objective batches of :func:`lmlab.eval.denoising.objective_batches` for T5 and BERT).  A decoder
    pair without ``batches`` is scored on :mod:`lmlab.eval.causal`'s windows (``max_length``,
    ``stride``, ``batch_size`` as there); an encoder or encoder–decoder pair without them on
    objective batches built from the text with the default objective and seed.  ``n_bytes``: the
    text's UTF-8 bytes for bits per byte (known by itself for texts and an ``EvalText``).

    Both models must be of one kind with one vocabulary; each stays on its own device.
    """
    kind = _check_pair(base, candidate)
    if (texts_or_ids is None) == (batches is None):
        raise LmlabError("compare: give either the text (texts_or_ids) or batches, not both")
    total = len(batches) if hasattr(batches, "__len__") else None
    if batches is None:
        if kind == DECODER:
            made = _window_batches(base, tokenizer, texts_or_ids, max_length, stride, batch_size)
        else:
            made = _objective_batches(base, tokenizer, texts_or_ids, kind, max_length, batch_size)
        batches, total, found = made
        n_bytes = n_bytes if n_bytes is not None else found
    return _compare_batches(
        base, candidate, batches, n_bytes=n_bytes, impl=impl, total=total, progress=progress
    )


def _window_batches(
    model: torch.nn.Module, tokenizer: Any, texts_or_ids: Any, max_length: int | None, stride: int | None,
    batch_size: int,
) -> tuple[Iterator[dict[str, torch.Tensor]], int, int]:  # fmt: skip
    """:func:`lmlab.eval.causal.perplexity`'s window batches of the text (cut on the CPU), their
    number, and the text's bytes (:func:`~lmlab.eval.causal.windowed_text` checks them)."""
    from lmlab.eval.causal import windowed_text

    w = windowed_text(model, tokenizer, texts_or_ids, max_length=max_length, stride=stride)
    return w.batches(batch_size), -(-len(w.plan) // int(batch_size)), w.bytes


def _objective_batches(
    model: torch.nn.Module, tokenizer: Any, texts_or_ids: Any, kind: str, seq_len: int | None, batch_size: int
) -> tuple[list[dict[str, torch.Tensor]], int, int]:
    """:func:`lmlab.eval.denoising.objective_batches` of the text with the model's default objective,
    length and seed 0 (what :func:`~lmlab.eval.denoising.denoising_loss` scores), and the raw rows' bytes."""
    from lmlab.eval import denoising
    from lmlab.eval.bytes import token_byte_lengths

    ids = denoising.token_stream(tokenizer, texts_or_ids)
    denoising.check_vocab(ids, model)
    length = int(seq_len or denoising.default_length(model))
    objective = denoising.default_objective(model)
    table = token_byte_lengths(tokenizer)
    out, n_bytes = [], 0
    for batch, raw in denoising.objective_batches(
        tokenizer, ids, objective, kind, seq_len=length, batch_size=batch_size
    ):
        out.append(batch)
        n_bytes += int(table[raw.numpy()].sum())
    return out, len(out), n_bytes
