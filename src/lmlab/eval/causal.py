"""Perplexity of a causal language model over a long text, with a sliding window.

The scheme is Hugging Face's "Perplexity of fixed-length models" (transformers docs, the
``perplexity`` guide): the token stream is cut into windows of ``max_length`` tokens whose starts
move by ``stride``; in each window the tokens an earlier window already scored are labelled −100,
so every token is scored exactly once, with at least ``max_length − stride`` tokens of context once
the first window is full (``stride = max_length`` would be disjoint windows; see
:func:`window_plan`).  Text is framed as ``lmlab prepare`` frames documents and starts with a
BOS/EOS token (:func:`lmlab.eval.text.causal_stream`), so that every real token is predicted, as
in EleutherAI's lm-evaluation-harness; the tokens that end each document are scored too, as the
model was trained to predict them.

Besides ``perplexity = exp(Σ NLL / tokens)`` the result holds lm-evaluation-harness's
tokenizer-independent figures: ``bits_per_byte = Σ NLL / bytes / ln 2``, ``byte_perplexity =
exp(Σ NLL / bytes)`` and ``word_perplexity = exp(Σ NLL / words)`` (UTF-8 bytes and
``re.split(r"\\s+")`` words of the documents, :mod:`lmlab.eval.text`).  The standard errors treat
the token NLLs as independent draws (``std / √tokens``, the delta method for the exponentials),
which neighbouring tokens are not: read them as a lower bound.

Windows are batched; the NLL comes from :func:`lmlab.eval.scoring.token_nll`, which runs the model's
body once per batch and projects only the scored positions.  Run it as::

    lmlab eval runs/gpt/final --corpus wiki.test.raw --max-length 1024 --stride 512

or, from Python, ``perplexity(model, tokenizer, text, max_length=1024, stride=512).to_dict()``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from lmlab.errors import LmlabError
from lmlab.eval.scoring import eval_mode, exp_or_inf, model_device, token_nll
from lmlab.eval.text import EvalText, causal_stream, load_eval_text
from lmlab.objectives.base import IGNORE_INDEX

__all__ = [
    "PerplexityResult",
    "Window",
    "WindowedText",
    "default_max_length",
    "perplexity",
    "window_batches",
    "window_plan",
    "windowed_text",
]

#: The longest default window (a model with a larger position table is scored at this length).
MAX_DEFAULT_LENGTH = 2048
#: The window of a model that records neither a training length nor a position table.
FALLBACK_LENGTH = 1024


@dataclass(frozen=True)
class Window:
    """Tokens ``[begin, end)`` of the stream go into the model; positions ``[score_from, end)`` are
    scored (each predicted from the tokens of the window before it)."""

    begin: int
    end: int
    score_from: int


def window_plan(n_tokens: int, max_length: int, stride: int) -> list[Window]:
    """The windows that score positions 1 … n−1 of an ``n_tokens`` stream exactly once.

    Window k holds ``[k·stride, min(k·stride + max_length, n))`` and scores from where the previous
    one ended (the first from 1: position 0 is context only); the last one ends at n.  So every
    scored position has at least ``min(position, max_length − stride)`` tokens of context.  With
    ``stride == max_length`` (disjoint windows) the guide's loop would leave each later window's
    first token unscored; here each later window starts one token earlier instead (that token its
    context, as lm-evaluation-harness's rolling windows have), i.e. the starts move by
    ``max_length − 1``.
    """
    n, length, s = int(n_tokens), int(max_length), int(stride)
    if length < 2:
        raise LmlabError(
            f"max_length must be at least 2 (one token of context and one to score), got {length}"
        )
    if s <= 0:
        raise LmlabError(f"stride must be positive, got {s}")
    if s > length:
        raise LmlabError(
            f"stride {s} exceeds max_length {length}: tokens between the windows would go unscored"
        )
    if n < 2:
        raise LmlabError(f"the text has {n} token(s); scoring needs at least 2 (a context and a target)")
    step = length - 1 if s == length else s
    plan: list[Window] = []
    prev_end = 1
    begin = 0
    while True:
        end = min(begin + length, n)
        plan.append(Window(begin, end, prev_end))
        if end == n:
            return plan
        prev_end = end
        begin += step


def window_batches(ids: torch.Tensor, plan: Sequence[Window], batch_size: int, pad_id: int) -> Iterator[dict]:
    """Hugging Face batches of the windows of ``ids`` (N,) int64, ``batch_size`` windows each, on
    ``ids``' device: ``input_ids`` (B, W) right-padded with ``pad_id``, ``attention_mask`` (B, W)
    int64, ``labels`` (B, W) the ids at scored positions and −100 elsewhere (unshifted: the scorer
    shifts them, as ``transformers``' causal-LM loss does)."""
    if batch_size < 1:
        raise LmlabError(f"batch_size must be positive, got {batch_size}")
    ids = torch.as_tensor(ids)
    n = ids.shape[0]
    for lo in range(0, len(plan), batch_size):
        chunk = plan[lo : lo + batch_size]
        b = torch.tensor(
            [[w.begin, w.end, w.score_from] for w in chunk], dtype=torch.int64, device=ids.device
        )
        begin, end, score_from = b[:, :1], b[:, 1:2], b[:, 2:]
        width = max(w.end - w.begin for w in chunk)
        pos = begin + torch.arange(width, device=ids.device)  # (B, W) stream positions
        real = pos < end
        input_ids = torch.where(real, ids[pos.clamp(max=n - 1)], pad_id)
        labels = torch.where(real & (pos >= score_from), input_ids, IGNORE_INDEX)
        yield {"input_ids": input_ids, "attention_mask": real.long(), "labels": labels}


def default_max_length(model: torch.nn.Module) -> int:
    """The window a model is scored with by default: the sequence length it was trained at (a run's
    ``final/`` records it), else its position table capped at :data:`MAX_DEFAULT_LENGTH`, else
    :data:`FALLBACK_LENGTH`."""
    from lmlab.models import max_positions
    from lmlab.train.state import model_settings

    trained = model_settings(getattr(model, "name_or_path", None) or None, model.config).get("seq_len")
    if trained:
        return int(trained)
    limit = max_positions(model)
    return min(int(limit), MAX_DEFAULT_LENGTH) if limit else FALLBACK_LENGTH


@dataclass(frozen=True)
class PerplexityResult:
    """Sliding-window perplexity of one text (module docstring for the definitions).  Figures whose
    denominator is 0 (no bytes, no words, a single token for an error) are None."""

    nll_sum: float
    tokens: int
    bytes: int
    words: int
    documents: int
    mean_nll: float
    perplexity: float
    bits_per_byte: float | None
    byte_perplexity: float | None
    word_perplexity: float | None
    nll_stderr: float | None
    perplexity_stderr: float | None
    bits_per_byte_stderr: float | None
    max_length: int
    stride: int
    windows: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _result(
    nll_sum: float, m2: float, tokens: int, n_bytes: int, n_words: int, documents: int, length: int, stride: int,
    windows: int,
) -> PerplexityResult:  # fmt: skip
    mean = nll_sum / tokens
    stderr = math.sqrt(m2 / (tokens - 1) / tokens) if tokens > 1 else None
    per_byte = nll_sum / n_bytes / math.log(2) if n_bytes > 0 else None
    return PerplexityResult(
        nll_sum=nll_sum,
        tokens=tokens,
        bytes=n_bytes,
        words=n_words,
        documents=documents,
        mean_nll=mean,
        perplexity=exp_or_inf(mean),
        bits_per_byte=per_byte,
        byte_perplexity=exp_or_inf(nll_sum / n_bytes) if n_bytes > 0 else None,
        word_perplexity=exp_or_inf(nll_sum / n_words) if n_words > 0 else None,
        nll_stderr=stderr,
        perplexity_stderr=None if stderr is None else exp_or_inf(mean) * stderr,
        bits_per_byte_stderr=None
        if stderr is None or n_bytes <= 0
        else stderr * tokens / n_bytes / math.log(2),
        max_length=length,
        stride=stride,
        windows=windows,
    )


def _stream(tokenizer: Any, texts_or_ids: Any) -> tuple[np.ndarray, int, int, int]:
    """``(ids, bytes, words, documents)`` of what :func:`perplexity` was given."""
    x = texts_or_ids
    if isinstance(x, EvalText):
        return causal_stream(tokenizer, x.ids), x.stats.bytes, x.stats.words, x.stats.documents
    if isinstance(x, str) or (isinstance(x, (list, tuple)) and x and all(isinstance(d, str) for d in x)):
        t = load_eval_text(tokenizer, texts=x)
        return causal_stream(tokenizer, t.ids), t.stats.bytes, t.stats.words, t.stats.documents
    if isinstance(x, (list, tuple)) and not x:
        raise LmlabError("the text is empty")
    # Token ids, scored as given: their first token is context only.
    t = load_eval_text(tokenizer, ids=x)
    return t.ids, t.stats.bytes, t.stats.words, t.stats.documents


def _check_model(model: torch.nn.Module) -> None:
    from lmlab.models.families import DECODER, scoring_family

    kind = scoring_family(model).kind
    if kind != DECODER:
        name = getattr(model.config, "model_type", type(model).__name__)
        raise LmlabError(
            f"perplexity needs a causal (decoder-only) language model, and {name} is an {kind} model; "
            "T5 and BERT are scored by their denoising loss (lmlab.eval.denoising_loss)"
        )


def _check_ids(ids: np.ndarray, model: torch.nn.Module) -> None:
    rows = model.get_input_embeddings().num_embeddings
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= rows:
        raise LmlabError(
            f"token id {hi if hi >= rows else lo} is outside the model's vocabulary of {rows} ids: "
            "the text was tokenized with another tokenizer"
        )


@dataclass(frozen=True)
class WindowedText:
    """A text cut into :func:`perplexity`'s windows for one model: ``ids`` (N,) int64 the stream
    scored, ``plan`` its windows, ``pad_id`` what pads a short window, and the text's counts."""

    ids: np.ndarray
    plan: list[Window]
    pad_id: int
    max_length: int
    stride: int
    bytes: int
    words: int
    documents: int

    def batches(self, batch_size: int, device: torch.device | str | None = None) -> Iterator[dict]:
        """:func:`window_batches` of the stream, cut on ``device`` (default the CPU)."""
        ids = torch.from_numpy(self.ids)
        return window_batches(ids if device is None else ids.to(device), self.plan, batch_size, self.pad_id)


def windowed_text(
    model: torch.nn.Module,
    tokenizer: Any,
    texts_or_ids: Any,
    *,
    max_length: int | None = None,
    stride: int | None = None,
    n_bytes: int | None = None,
    n_words: int | None = None,
) -> WindowedText:
    """What :func:`perplexity` scores, with its checks (one-line errors for a model that is not a
    causal LM, a window beyond its positions, a text shorter than a window, ids outside its vocabulary);
    the arguments are :func:`perplexity`'s.  For scorers of the same windows (:mod:`lmlab.eval.damage`)."""
    _check_model(model)
    limit = _max_positions(model)
    length = int(max_length) if max_length is not None else default_max_length(model)
    if limit is not None and length > limit:
        raise LmlabError(f"max_length {length} exceeds the model's {limit} positions")
    s = int(stride) if stride is not None else max(1, length // 2)
    ids, nb, nw, docs = _stream(tokenizer, texts_or_ids)
    if ids.size < length:
        raise LmlabError(
            f"the text has {ids.size} tokens, fewer than one window of {length}; "
            "lower --max-length or give more text"
        )
    plan = window_plan(ids.size, length, s)
    _check_ids(ids, model)
    rows = model.get_input_embeddings().num_embeddings
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = int(pad) if pad is not None and 0 <= pad < rows else 0
    return WindowedText(
        ids=ids,
        plan=plan,
        pad_id=pad,
        max_length=length,
        stride=s,
        bytes=nb if n_bytes is None else int(n_bytes),
        words=nw if n_words is None else int(n_words),
        documents=docs,
    )


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    texts_or_ids: Any,
    *,
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    impl: str = "auto",
    n_bytes: int | None = None,
    n_words: int | None = None,
    progress: bool = False,
) -> PerplexityResult:
    """Sliding-window perplexity of a causal LM (module docstring).

    ``texts_or_ids``: a string (one document), a list of strings (documents), an
    :class:`~lmlab.eval.text.EvalText` (both framed as ``prepare`` frames documents, then started with
    BOS/EOS), or token ids (list / numpy / torch (N,), scored as given: the first is context only).
    ``max_length``: the window (default :func:`default_max_length`); ``stride``: how far windows move
    (default ``max_length // 2``); ``batch_size`` windows per forward pass.  ``n_bytes`` / ``n_words``
    replace the counts of the text (bytes and words of its documents, decoded ones for ids).
    ``impl``: ``"reference"`` scores through the model's plain forward and whole logits.  The model's
    device and dtype are used as they are; it is scored in eval mode (and left in the mode it was in).
    ``progress``: a progress bar over the windows (:func:`lmlab.progress.progress_bar`).
    """
    w = windowed_text(
        model, tokenizer, texts_or_ids, max_length=max_length, stride=stride, n_bytes=n_bytes, n_words=n_words
    )
    stream = torch.from_numpy(w.ids).to(model_device(model))  # batches are cut on the model's device

    # Chan et al.'s pairwise merge of (count, mean, M2): one pass, no per-token list, no sync per batch.
    zero = torch.zeros((), dtype=torch.float64, device=stream.device)
    count, total_nll, mean, m2 = 0, zero, zero, zero
    from lmlab.progress import progress_bar

    with (
        eval_mode(model),
        progress_bar(total=len(w.plan), desc="perplexity", unit="window", disable=not progress) as bar,
    ):
        for batch in window_batches(stream, w.plan, batch_size, w.pad_id):
            nll = token_nll(model, batch, impl=impl)  # (rows,) float64
            k = int(nll.shape[0])
            if k == 0:
                continue
            sb = nll.sum()
            mb = sb / k
            total = count + k
            delta = mb - mean
            m2 = m2 + ((nll - mb) ** 2).sum() + delta**2 * (count * k / total)
            mean = mean + delta * (k / total)
            total_nll = total_nll + sb
            count = total
            bar.update(int(batch["input_ids"].shape[0]))
    if count != w.ids.size - 1:  # every position but the first, by construction of the plan
        raise RuntimeError(f"perplexity scored {count} tokens of {w.ids.size - 1}")
    return _result(
        float(total_nll), float(m2), count, w.bytes, w.words, w.documents, w.max_length, w.stride, len(w.plan)
    )


def _max_positions(model: torch.nn.Module) -> int | None:
    from lmlab.models import max_positions

    p = max_positions(model)
    return int(p) if p else None
