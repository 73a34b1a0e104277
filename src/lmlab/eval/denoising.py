"""Scores for models perplexity does not fit: the denoising objective's NLL, and an MLM's pseudo-log-likelihood.

Perplexity is a causal LM's measure; a T5 or a BERT is scored here in two ways.

* :func:`denoising_loss` -- the model's pre-training objective on *fixed* corruptions: span
  corruption for T5 (Raffel et al. 2020 §3.1.4), BERT's masked LM (Devlin et al. 2019 §3.1), the
  prefix LM (Raffel et al. 2020 §3.3.1) for any kind that takes it.  The text's token stream is cut
  into consecutive rows of ``R = objective.raw_length(seq_len)`` tokens, as a prepared split is cut
  for training (:class:`lmlab.train.data.Sources`), and row ``j`` is corrupted with its own
  generator seeded by ``row_seed(seed, VAL_STREAM, 0, j)``: the keys of the training loop's
  validation pass (:func:`lmlab.train.data.val_keys`).  So two models are scored on identical
  corruptions, and on a prepared ``val`` split the number equals :func:`lmlab.eval.evaluate`'s
  with the same seed, ``seq_len`` and rows.  It is reported per target token (``loss``, the
  perplexity of the targets, e.g. of the dropped spans) and per UTF-8 byte of the raw rows' text
  (``bits_per_byte``): a rate per byte of the corrupted text, comparable across tokenizers only
  for the same objective and noise.
* :func:`pseudo_log_likelihood` -- Salazar et al. 2020, "Masked Language Model Scoring", §2:
  ``PLL(W) = Σ_t log P(w_t | W∖t)``, each non-special position masked in turn, one masked
  position per copy of the row.  Its pseudo-perplexity ``exp(−PLL / N)`` (§2.3) is the MLM's
  analogue of perplexity; it is not a normalised likelihood.

Both score through :func:`lmlab.eval.scoring.token_nll`: unscored positions never reach the output
projection (a BERT copy projects one row).

    lmlab eval RUN/final --data DATA --max-rows 256 --pll     # a T5 or BERT run: both scores
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from lmlab.errors import LmlabError
from lmlab.eval.scoring import eval_mode, exp_or_inf
from lmlab.models.families import DECODER, ENCODER, ENCODER_DECODER, scoring_family
from lmlab.models.presets import max_positions
from lmlab.objectives.base import IGNORE_INDEX, special_ids_of
from lmlab.objectives.registry import OBJECTIVES, make_objective
from lmlab.train.data import VAL_STREAM, pad_parts, row_seed
from lmlab.train.state import model_settings

__all__ = [
    "DenoisingResult",
    "PLLResult",
    "denoising_loss",
    "default_objective",
    "objective_batches",
    "pll_batches",
    "pseudo_log_likelihood",
]

# The objective a model is scored with when it records none, by kind (a decoder: see default_objective).
_KIND_OBJECTIVE = {ENCODER_DECODER: "span", ENCODER: "bert"}


# ------------------------------------------------------------------------------------------ shared helpers


def token_stream(tokenizer: Any, texts_or_ids: Any) -> np.ndarray:
    """The token stream (N,) int64 of ``texts_or_ids``: ids as given (np array, tensor, list of ints),
    an :class:`~lmlab.eval.text.EvalText`'s ids, or text (a str, a list of documents) encoded by
    :func:`lmlab.eval.text.load_eval_text` (each document framed as ``lmlab prepare`` frames it)."""
    x = texts_or_ids
    if hasattr(x, "ids") and hasattr(x, "stats"):  # an EvalText
        x = x.ids
    elif isinstance(x, str) or (isinstance(x, list | tuple) and x and all(isinstance(d, str) for d in x)):
        from lmlab.eval.text import load_eval_text

        x = load_eval_text(tokenizer, texts=x).ids
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    ids = np.asarray(x)
    if ids.size == 0:
        raise LmlabError("the text to score is empty")
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise LmlabError(
            f"token ids must be one flat sequence of integers, got shape {ids.shape} {ids.dtype}"
        )
    return ids.astype(np.int64, copy=False)


def check_vocab(ids: np.ndarray, model: torch.nn.Module) -> None:
    emb = model.get_input_embeddings()
    V = int(getattr(emb, "num_embeddings", 0) or model.config.vocab_size)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= V:
        bad = lo if lo < 0 else hi
        raise LmlabError(
            f"token id {bad} is outside the model's vocabulary of {V} ids: another tokenizer's text?"
        )


def default_length(model: torch.nn.Module) -> int:
    """The length the model was trained at, else ``min(512, its positions)`` (as :func:`lmlab.eval.evaluate`)."""
    trained = model_settings(getattr(model, "name_or_path", None), model.config).get("seq_len")
    return int(trained or min(512, max_positions(model) or 512))


def _byte_table(tokenizer: Any) -> np.ndarray:
    """(V,) int64: the UTF-8 bytes each id contributes to decoded text (0 for special tokens)."""
    from lmlab.eval.bytes import token_byte_lengths

    return token_byte_lengths(tokenizer)


def _n_bytes(table: np.ndarray, ids: np.ndarray) -> int:
    return int(table[ids].sum())


def _stderr(total: float, sumsq: float, n: int) -> float:
    """Standard error of the mean of ``n`` values with sum ``total`` and sum of squares ``sumsq``
    (sample variance, ddof 1); NaN for fewer than two values."""
    if n < 2:
        return float("nan")
    mean = total / n
    var = max(sumsq - n * mean * mean, 0.0) / (n - 1)
    return math.sqrt(var / n)


def _progress(total: int, desc: str, on: bool):
    from lmlab.progress import progress_bar

    return progress_bar(total=total, desc=desc, unit="batch", disable=not on)


def _check_positive(name: str, value: int | None, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or int(value) < 1:
        raise LmlabError(f"{name} must be a positive integer, got {value}")


# ------------------------------------------------------------------------------------------ denoising NLL


def default_objective(model: torch.nn.Module) -> str:
    """The objective ``model`` is scored with by default: what it was trained with (a run's
    ``lmlab_training.json``), else ``"span"`` for an encoder–decoder, ``"bert"`` for an encoder.  A
    decoder-only model takes ``"prefix"`` only when it was trained with it; otherwise it is refused
    (its score is perplexity)."""
    kind = scoring_family(model).kind
    trained = model_settings(getattr(model, "name_or_path", None), model.config).get("objective")
    if kind == DECODER and trained != "prefix":
        raise LmlabError(
            "causal models are scored by lmlab.eval.perplexity, not a denoising loss; "
            "pass objective='prefix' to score one as a prefix LM"
        )
    return str(trained or _KIND_OBJECTIVE[kind])


def _objective_for(objective: Any, tokenizer: Any, kind: str) -> tuple[Any, str]:
    """``(objective instance, its name)``: a registered name built for ``kind``, or an instance checked
    against ``kind`` (one-line errors from :func:`~lmlab.objectives.registry.make_objective`)."""
    if isinstance(objective, str):
        return make_objective(objective, tokenizer, kind), objective
    if not hasattr(objective, "raw_length") or not callable(objective):
        raise LmlabError(
            f"objective must be a registered name or an objective, not {type(objective).__name__}"
        )
    archs = tuple(getattr(objective, "architectures", ()))
    if archs and kind not in archs:
        raise LmlabError(
            f"{type(objective).__name__} trains {' or '.join(archs)} models, but the model is {kind}"
        )
    check = getattr(objective, "check_kind", None)
    if check is not None:
        check(kind)
    names = [n for n, (cls, _) in OBJECTIVES.items() if cls is type(objective)]
    return objective, names[0] if len(names) == 1 else type(objective).__name__


def objective_batches(
    tokenizer: Any,
    ids: np.ndarray,
    objective: Any,
    kind: str,
    *,
    seq_len: int,
    batch_size: int = 16,
    seed: int = 0,
    max_rows: int | None = None,
) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """``(batch, raw)`` pairs: the stream ``ids`` (N,) int64 cut into consecutive rows of
    ``R = objective.raw_length(seq_len)`` tokens (at most ``max_rows``; a partial last row is dropped,
    as a prepared split's is), each row ``j`` corrupted with its own ``torch.Generator`` seeded by
    ``row_seed(seed, VAL_STREAM, 0, j)``, ``batch_size`` rows a batch, right-padded by
    :func:`~lmlab.train.data.pad_parts`.  ``batch`` is the objective's dict of (b, ·) tensors (no
    ``attention_mask`` when it is all ones, as the validation loader drops it); ``raw`` is the
    (b, R) int64 rows before corruption.  ``objective``: a registered name (built for ``kind`` from
    ``tokenizer``) or an objective instance.  The batches depend on ``seed`` and the rows only, not
    on ``batch_size``: they are the ones :func:`lmlab.eval.evaluate` scores on a prepared ``val`` split.

    Checks happen at the call: a stream shorter than one row, or an objective ``kind`` cannot take,
    is a one-line :class:`~lmlab.errors.LmlabError`.
    """
    obj, _ = _objective_for(objective, tokenizer, kind)
    _check_positive("batch_size", batch_size)
    _check_positive("max_rows", max_rows, allow_none=True)
    _check_positive("seq_len", seq_len)
    ids = np.asarray(ids, dtype=np.int64)
    R = int(obj.raw_length(int(seq_len)))
    if R < 1:
        raise LmlabError(f"rows of {R} raw tokens are too short; raise --max-length")
    n_rows = len(ids) // R
    if n_rows == 0:
        raise LmlabError(
            f"the text has {len(ids)} tokens, fewer than one row of {R} tokens; lower --max-length"
        )
    if max_rows is not None:
        n_rows = min(n_rows, int(max_rows))
    return _objective_batches(obj, ids, R, n_rows, int(batch_size), int(seed))


def _objective_batches(
    obj: Any, ids: np.ndarray, R: int, n_rows: int, batch_size: int, seed: int
) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    rows = torch.from_numpy(np.ascontiguousarray(ids[: n_rows * R]).reshape(n_rows, R))  # (n_rows, R)
    pad_id = int(getattr(obj, "pad_id", 0))
    for lo in range(0, n_rows, batch_size):
        raw = rows[lo : lo + batch_size]
        parts = []
        for j in range(lo, lo + raw.shape[0]):
            g = torch.Generator().manual_seed(row_seed(seed, VAL_STREAM, 0, j))
            parts.append(obj(rows[j : j + 1].clone(), generator=g))
        batch = pad_parts(parts, pad_id)
        mask = batch.get("attention_mask")
        if mask is not None and bool(mask.all()):
            del batch["attention_mask"]
        yield batch, raw


@dataclass
class DenoisingResult:
    """A model's NLL under a denoising objective on fixed corruptions (:func:`denoising_loss`).

    ``loss`` = ``nll_sum / target_tokens`` (nats per target token), ``perplexity`` = exp(loss) (of
    the targets), ``loss_stderr`` the standard error of that mean over target tokens (tokens taken
    as independent: an underestimate where they are correlated), ``bits_per_byte`` =
    ``nll_sum / bytes / ln 2`` with ``bytes`` the UTF-8 bytes of the raw rows' text.
    """

    objective: str
    seq_len: int
    seed: int
    rows: int
    target_tokens: int
    raw_tokens: int
    bytes: int
    nll_sum: float
    loss: float
    perplexity: float
    loss_stderr: float
    bits_per_byte: float | None  # None for rows whose text has no bytes (only special tokens)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def denoising_loss(
    model: torch.nn.Module,
    tokenizer: Any,
    texts_or_ids: Any,
    *,
    objective: Any = None,
    seq_len: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    max_rows: int | None = None,
    progress: bool = False,
) -> DenoisingResult:
    """``model``'s NLL under ``objective`` on the rows of ``texts_or_ids`` (text, documents, an
    ``EvalText`` or a (N,) int64 id stream), corrupted as :func:`objective_batches` fixes them.

    ``objective``: a registered name or an instance; by default :func:`default_objective`.
    ``seq_len``: the model's input length (T5: the encoder's; the raw rows are longer), by default
    the length it was trained at, else ``min(512, positions)``.  Runs in the model's dtype on its
    device; the NLL of each target is reduced in float64.
    """
    kind = scoring_family(model).kind
    _check_positive("seq_len", seq_len, allow_none=True)
    obj, name = _objective_for(
        objective if objective is not None else default_objective(model), tokenizer, kind
    )
    seq_len = int(seq_len or default_length(model))
    ids = token_stream(tokenizer, texts_or_ids)
    check_vocab(ids, model)
    batches = objective_batches(
        tokenizer, ids, obj, kind, seq_len=seq_len, batch_size=batch_size, seed=seed, max_rows=max_rows
    )
    from lmlab.eval.scoring import model_device, to_model, token_nll

    table = _byte_table(tokenizer)
    acc = torch.zeros(3, dtype=torch.float64, device=model_device(model))  # Σnll, Σnll², count
    rows = raw_tokens = n_bytes = 0
    R = int(obj.raw_length(seq_len))
    n_rows = min(len(ids) // R, max_rows or len(ids))
    with eval_mode(model), _progress(-(-n_rows // batch_size), "denoising", progress) as bar:
        for batch, raw in batches:
            nll = token_nll(model, to_model(batch, model))
            acc += torch.stack([nll.sum(), (nll * nll).sum(), nll.new_tensor(nll.numel())])
            rows += raw.shape[0]
            raw_tokens += raw.numel()
            n_bytes += _n_bytes(table, raw.numpy())
            bar.update(1)
    total, sumsq, n = float(acc[0]), float(acc[1]), int(acc[2])
    if n == 0:
        raise LmlabError(f"objective {name!r} scored no target tokens in {rows} rows")
    loss = total / n
    return DenoisingResult(
        objective=name,
        seq_len=seq_len,
        seed=int(seed),
        rows=rows,
        target_tokens=n,
        raw_tokens=raw_tokens,
        bytes=n_bytes,
        nll_sum=total,
        loss=loss,
        perplexity=exp_or_inf(loss),
        loss_stderr=_stderr(total, sumsq, n),
        bits_per_byte=total / n_bytes / math.log(2) if n_bytes else None,
    )


# ------------------------------------------------------------------------------------------ pseudo-log-likelihood


def pll_batches(
    ids: np.ndarray,
    *,
    max_length: int,
    mask_id: int,
    special_ids: Any,
    pad_id: int = 0,
    batch_size: int = 64,
    max_rows: int | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """The masked copies of Salazar et al. 2020 §2: the stream ``ids`` (N,) int64 cut into consecutive
    rows of ``max_length`` (the last may be shorter; at most ``max_rows``), and for each row one copy
    per position whose id is not in ``special_ids``, that position replaced by ``mask_id`` and its
    label the original id (−100 elsewhere).  ``batch_size`` copies a batch (copies of consecutive rows
    share one), right-padded with ``pad_id`` (an ``attention_mask`` then marks the padding)."""
    ids = np.asarray(ids, dtype=np.int64)
    specials = np.asarray(sorted(int(i) for i in special_ids), dtype=np.int64)
    starts = range(0, len(ids), int(max_length))
    if max_rows is not None:
        starts = starts[: int(max_rows)]
    parts, held = [], 0
    for s in starts:
        row = torch.from_numpy(ids[s : s + max_length].copy())  # (L,)
        positions = torch.from_numpy(np.flatnonzero(~np.isin(row.numpy(), specials)))  # (k,)
        i = 0
        while i < len(positions):
            take = positions[i : i + batch_size - held]  # this batch's share of the row's positions
            k = len(take)
            copies = row.repeat(k, 1)  # (k, L)
            at = torch.arange(k)
            copies[at, take] = mask_id
            labels = torch.full_like(copies, IGNORE_INDEX)
            labels[at, take] = row[take]
            parts.append({"input_ids": copies, "labels": labels})
            held, i = held + k, i + k
            if held == batch_size:
                yield pad_parts(parts, pad_id)
                parts, held = [], 0
    if parts:
        yield pad_parts(parts, pad_id)


@dataclass
class PLLResult:
    """An MLM's pseudo-log-likelihood (Salazar et al. 2020 §2) of a text (:func:`pseudo_log_likelihood`).

    ``pll`` = Σ_t log P(w_t | W∖t) (nats) over the ``tokens`` scored (non-special positions);
    ``mean_nll`` = −pll / tokens, ``pseudo_perplexity`` = exp(mean_nll), ``nll_stderr`` the standard
    error of ``mean_nll`` over tokens, ``bits_per_byte`` = −pll / bytes / ln 2 with ``bytes`` the
    UTF-8 bytes of the rows' text.
    """

    pll: float
    tokens: int
    rows: int
    max_length: int
    bytes: int
    mean_nll: float
    pseudo_perplexity: float
    nll_stderr: float
    bits_per_byte: float | None  # None for rows whose text has no bytes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def pseudo_log_likelihood(
    model: torch.nn.Module,
    tokenizer: Any,
    texts_or_ids: Any,
    *,
    max_length: int | None = None,
    batch_size: int = 64,
    max_rows: int | None = None,
    progress: bool = False,
) -> PLLResult:
    """The PLL of ``texts_or_ids`` (text, documents, an ``EvalText`` or a (N,) int64 id stream) under the
    masked LM ``model``: every non-special position of each row of ``max_length`` tokens (default: the
    trained length, else ``min(512, positions)``) masked in turn, ``batch_size`` copies a forward pass.
    A row of L tokens costs L forward passes of L tokens."""
    kind = scoring_family(model).kind
    if kind != ENCODER:
        raise LmlabError(
            f"pseudo-log-likelihood is for masked LMs (encoder models such as bert-*), but the model is {kind}"
        )
    ids_of = special_ids_of(tokenizer)
    if ids_of.mask_id is None:
        raise LmlabError("the tokenizer has no mask token, which pseudo-log-likelihood needs")
    _check_positive("batch_size", batch_size)
    _check_positive("max_rows", max_rows, allow_none=True)
    _check_positive("max_length", max_length, allow_none=True)
    max_length = int(max_length or default_length(model))
    ids = token_stream(tokenizer, texts_or_ids)
    check_vocab(ids, model)
    n_rows = -(-len(ids) // max_length)
    if max_rows is not None:
        n_rows = min(n_rows, int(max_rows))
    used = ids[: n_rows * max_length]
    specials = set(ids_of.special_ids) | set(getattr(tokenizer, "all_special_ids", ()) or ())
    n_copies = int((~np.isin(used, np.asarray(sorted(specials), dtype=np.int64))).sum())
    if n_copies == 0:
        raise LmlabError("the text has only special tokens; pseudo-log-likelihood scores none")
    from lmlab.eval.scoring import model_device, to_model, token_nll

    acc = torch.zeros(3, dtype=torch.float64, device=model_device(model))  # Σnll, Σnll², count
    batches = pll_batches(
        used,
        max_length=max_length,
        mask_id=int(ids_of.mask_id),
        special_ids=specials,
        pad_id=ids_of.pad_id,
        batch_size=int(batch_size),
    )
    with eval_mode(model), _progress(-(-n_copies // batch_size), "pseudo-log-likelihood", progress) as bar:
        for batch in batches:
            nll = token_nll(model, to_model(batch, model))
            acc += torch.stack([nll.sum(), (nll * nll).sum(), nll.new_tensor(nll.numel())])
            bar.update(1)
    total, sumsq, n = float(acc[0]), float(acc[1]), int(acc[2])
    n_bytes = _n_bytes(_byte_table(tokenizer), used)
    mean = total / n
    return PLLResult(
        pll=-total,
        tokens=n,
        rows=n_rows,
        max_length=max_length,
        bytes=n_bytes,
        mean_nll=mean,
        pseudo_perplexity=exp_or_inf(mean),
        nll_stderr=_stderr(total, sumsq, n),
        bits_per_byte=total / n_bytes / math.log(2) if n_bytes else None,
    )
