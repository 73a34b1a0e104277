"""Memorization: how much of its training data a model reproduces by greedy decoding.

Carlini et al. 2023, "Quantifying Memorization Across Neural Language Models", §2 (Definition of
extractability): a string s is *extractable with k tokens of context* if the concatenation [p ‖ s]
occurs in the training data and greedy decoding from the k-token prefix p produces s exactly.
Biderman et al. 2023, "Emergent and Predictable Memorization in Large Language Models", §3 (the Pythia
measure): prefix K = 32, greedy continuation of M = 32 tokens, *memorization score* = the fraction
of the M positions whose token matches the true suffix (1.0 is "memorized").

:func:`memorization` reports both on windows of K + M tokens drawn from the training split, and the
same measure on the validation split as the control: text the model never saw gives the rate that
a model reaches by predicting well rather than by remembering.  The windows are spans of the
prepared token stream (:func:`sample_offsets`: distinct, non-overlapping, seeded), so a window may
cross a document boundary exactly as the training rows did.

Greedy decoding (:func:`greedy_continuations`) is Hugging Face's ``model.generate`` with the KV
cache, batched (every prefix has K tokens: no padding), with every setting that could move the
argmax pinned to its neutral value and no end-of-sequence id at all: a model that emits ``</s>``
keeps going (the suffix of a window often continues past a document's end), and generate's
``min_new_tokens`` would otherwise forbid ``</s>``, which is a different decoding.  A T5 model
decodes the suffix as one span corruption whose only noise span is the suffix
(:mod:`lmlab.objectives.span_corruption`): the encoder reads ``p <extra_id_0> </s>``, the decoder
starts ``[decoder_start, <extra_id_0>]`` as its targets do, and its next M tokens are the
continuation.  ``impl="reference"`` is a plain loop (one sequence, full forward each step, argmax)
that the fast path must match token for token.

    memorization(model, tokenizer, load_tokens(data, "train"), load_tokens(data, "val"))
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from lmlab.errors import LmlabError
from lmlab.eval.scoring import eval_mode
from lmlab.impl import check_impl
from lmlab.models.families import DECODER, ENCODER, ENCODER_DECODER, scoring_family
from lmlab.models.presets import max_positions
from lmlab.objectives.base import check_ids_in_range, special_ids_of

__all__ = [
    "MemorizationResult",
    "SplitMemorization",
    "greedy_continuations",
    "memorization",
    "memorization_scores",
    "sample_offsets",
    "split_seed",
]

SPLITS = ("train", "val")

# Greedy search and nothing else, whatever the model's own generation_config.json says (BART's ships
# num_beams=4, no_repeat_ngram_size=3, forced_bos/eos ids): generate() fills every setting left None
# from the model's config, so each one that adds a logits processor or a stopping rule is given here.
# With no eos id, min_length / min_new_tokens add nothing (their processor only forbids eos).
_GREEDY: dict[str, Any] = dict(
    do_sample=False,
    num_beams=1,
    num_beam_groups=1,
    num_return_sequences=1,
    eos_token_id=None,
    forced_bos_token_id=None,
    forced_eos_token_id=None,
    repetition_penalty=1.0,
    encoder_repetition_penalty=1.0,
    no_repeat_ngram_size=0,
    encoder_no_repeat_ngram_size=0,
    bad_words_ids=None,
    sequence_bias=None,
    suppress_tokens=None,
    begin_suppress_tokens=None,
    exponential_decay_length_penalty=None,
    guidance_scale=None,
    watermarking_config=None,
    renormalize_logits=False,
    remove_invalid_values=False,
    temperature=None,
    top_k=None,
    top_p=None,
    min_p=None,
    typical_p=None,
    epsilon_cutoff=None,
    eta_cutoff=None,
    max_time=None,
    stop_strings=None,
    use_cache=True,
    return_dict_in_generate=False,
    output_scores=False,
    output_logits=False,
)


# ---------------------------------------------------------------------------------------------
# Where the windows are


def sample_offsets(
    n_tokens: int, length: int, samples: int, seed: int, *, split: str = "split"
) -> np.ndarray:
    """Starts of ``min(samples, n_tokens // length)`` windows of ``length`` tokens in a stream of
    ``n_tokens``: distinct, non-overlapping, sorted, (n,) int64, drawn with
    ``np.random.default_rng(seed)`` uniformly over all such placements.  When no more than
    ``samples`` windows fit, all of them: the tiling ``0, length, 2·length, …``.

    A placement of n windows is n distinct "slots" in ``[0, n_tokens − n·(length − 1))``: window i
    starts at ``slot_i + i·(length − 1)`` (sorted slots), which leaves ≥ ``length`` between starts.
    """
    if length <= 0 or samples <= 0:
        raise LmlabError(f"memorization windows need length > 0 and samples > 0, got {length} and {samples}")
    if n_tokens < length:
        raise LmlabError(f"the {split} split has {n_tokens} tokens, fewer than one window of {length} tokens")
    fit = n_tokens // length
    if samples >= fit:
        return np.arange(fit, dtype=np.int64) * length
    rng = np.random.default_rng(seed)
    slots = np.sort(
        rng.choice(n_tokens - samples * (length - 1), size=samples, replace=False).astype(np.int64)
    )
    return slots + np.arange(samples, dtype=np.int64) * (length - 1)


def split_seed(seed: int, split: str) -> int:
    """The seed of ``split``'s windows: one stream per split from one ``seed`` (``SeedSequence``)."""
    return int(np.random.SeedSequence([int(seed), SPLITS.index(split)]).generate_state(1)[0])


def _windows(ids: Any, offsets: np.ndarray, length: int) -> torch.Tensor:
    """``ids[o : o + length]`` for each offset: (n, length) int64 (``ids`` a 1-D array or memmap)."""
    index = offsets[:, None] + np.arange(length, dtype=np.int64)  # (n, length)
    return torch.from_numpy(np.asarray(ids)[index].astype(np.int64))


# ---------------------------------------------------------------------------------------------
# Greedy decoding


def _kind(model: torch.nn.Module) -> str:
    kind = scoring_family(model).kind
    if kind == ENCODER:
        raise LmlabError(
            "memorization needs a generative model: causal or T5, not an encoder-only (masked) model"
        )
    return kind


def _model_device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _seq2seq_inputs(
    prefixes: torch.Tensor, sentinel_id: int | None, eos_id: int | None, start_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A T5 model's (encoder input (N, K + 2), decoder start (N, 2)): ``p <extra_id_0> </s>`` and
    ``[decoder_start, <extra_id_0>]``, span corruption of [p ‖ s] with s as the one noise span."""
    if sentinel_id is None or eos_id is None:
        raise LmlabError(
            "memorization of an encoder-decoder needs a T5-style first sentinel (<extra_id_0>) and an eos id"
        )
    n = prefixes.shape[0]
    tail = prefixes.new_tensor([sentinel_id, eos_id]).expand(n, 2)
    start = prefixes.new_tensor([start_id, sentinel_id]).expand(n, 2)
    return torch.cat([prefixes, tail], dim=1), start.contiguous()


def _quiet_generation() -> contextlib.AbstractContextManager:
    """generate()'s advice about its own settings (the model's config, the flags pinned above) off."""
    from transformers.utils import logging as hf_logging

    @contextlib.contextmanager
    def quiet() -> Iterator[None]:
        import warnings

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", module=r"transformers\.generation")
                yield
        finally:
            hf_logging.set_verbosity(level)

    return quiet()


@torch.no_grad()
def greedy_continuations(
    model: torch.nn.Module,
    prefixes: torch.Tensor,
    suffix: int,
    *,
    batch_size: int = 32,
    sentinel_id: int | None = None,
    eos_id: int | None = None,
    impl: str = "auto",
    progress: Any = None,
) -> torch.Tensor:
    """The ``suffix`` tokens greedy decoding appends to each prefix: (N, M) int64 on ``prefixes``' device.

    ``prefixes`` (N, K) int64.  A decoder-only model continues the prefix; an encoder–decoder (T5)
    reads ``prefix <sentinel_id> <eos_id>`` and continues ``[decoder_start, sentinel_id]`` (``eos_id``
    defaults to the model config's).  No end-of-sequence stops decoding.  ``impl="auto"``/``"fast"``:
    ``model.generate`` with the KV cache, ``batch_size`` prefixes at a time; ``"reference"``: one
    prefix at a time, the whole sequence re-read every step, argmax.  ``progress``: a tqdm-like bar
    advanced by the prefixes done.
    """
    check_impl(impl, "greedy_continuations")
    kind = _kind(model)
    if prefixes.ndim != 2 or prefixes.dtype != torch.int64:
        raise LmlabError(f"prefixes must be (N, K) int64, got {tuple(prefixes.shape)} {prefixes.dtype}")
    if suffix <= 0 or batch_size <= 0:
        raise LmlabError(f"suffix and batch_size must be > 0, got {suffix} and {batch_size}")
    n, k = prefixes.shape
    out = prefixes.new_empty((n, suffix))
    if n == 0:
        return out
    if k == 0:
        raise LmlabError("prefixes must have at least one token")
    dev = _model_device(model)
    start_id = int(getattr(model.config, "decoder_start_token_id", None) or 0)
    if eos_id is None:
        eos_id = getattr(model.config, "eos_token_id", None)
    step = 1 if impl == "reference" else batch_size
    with eval_mode(model), _quiet_generation():
        for lo in range(0, n, step):
            p = prefixes[lo : lo + step].to(dev)
            if kind == ENCODER_DECODER:
                enc, dec = _seq2seq_inputs(p, sentinel_id, eos_id, start_id)
            else:
                enc, dec = None, p
            if impl == "reference":
                cont = _greedy_reference(model, enc, dec, suffix)
            else:
                cont = _greedy_generate(model, enc, dec, suffix)
            out[lo : lo + step] = cont.to(out.device)
            if progress is not None:
                progress.update(int(p.shape[0]))
    return out


def _greedy_generate(
    model: torch.nn.Module, enc: torch.Tensor | None, dec: torch.Tensor, m: int
) -> torch.Tensor:
    """``model.generate``'s greedy search: (B, m) int64, the tokens after ``dec``."""
    pad = getattr(model.config, "pad_token_id", None)
    kw = dict(_GREEDY, max_new_tokens=m, min_new_tokens=m, pad_token_id=0 if pad is None else pad)
    if enc is None:
        seqs = model.generate(input_ids=dec, attention_mask=torch.ones_like(dec), **kw)
    else:
        seqs = model.generate(
            input_ids=enc,
            attention_mask=torch.ones_like(enc),
            decoder_input_ids=dec,
            decoder_attention_mask=torch.ones_like(dec),
            **kw,
        )
    cont = seqs[:, dec.shape[1] :]
    if cont.shape[1] != m:  # a stopping rule we did not pin: never a silently short continuation
        raise RuntimeError(f"generate returned {cont.shape[1]} new tokens, expected {m}")
    return cont


def _greedy_reference(
    model: torch.nn.Module, enc: torch.Tensor | None, dec: torch.Tensor, m: int
) -> torch.Tensor:
    """The plain loop: the full forward over everything so far each step, argmax of the last position."""
    seq = dec
    for _ in range(m):
        if enc is None:
            logits = model(input_ids=seq, use_cache=False).logits
        else:
            logits = model(input_ids=enc, decoder_input_ids=seq, use_cache=False).logits
        seq = torch.cat([seq, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    return seq[:, dec.shape[1] :]


# ---------------------------------------------------------------------------------------------
# The scores


def memorization_scores(
    continuations: torch.Tensor, suffixes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per window (both (N, M) int64): (exact (N,) bool — Carlini's extractable, every token equal;
    partial (N,) float64 — Pythia's score, the fraction of the M positions that match)."""
    if continuations.shape != suffixes.shape:
        raise LmlabError(
            f"continuations {tuple(continuations.shape)} and suffixes {tuple(suffixes.shape)} differ"
        )
    hit = continuations == suffixes  # (N, M)
    return hit.all(dim=1), hit.double().mean(dim=1)


@dataclass
class SplitMemorization:
    """One split's figures: ``n`` windows, the extractable rate and Pythia's mean score, each with
    its standard error (√(p(1−p)/n); √(var/n) with the population variance of the scores), and the
    ``seed`` its windows were drawn with (:func:`sample_offsets`)."""

    n: int
    exact_rate: float
    exact_stderr: float
    partial_mean: float
    partial_stderr: float
    seed: int

    @classmethod
    def of(cls, exact: torch.Tensor, partial: torch.Tensor, seed: int) -> SplitMemorization:
        n = int(exact.numel())
        p = float(exact.double().mean())
        mean = float(partial.mean())
        var = float(((partial - mean) ** 2).mean())
        return cls(n, p, math.sqrt(p * (1 - p) / n), mean, math.sqrt(var / n), seed)


@dataclass
class MemorizationResult:
    """Carlini's extractable rate and Pythia's score on the training split and, as the control, the
    validation split (``val`` is None where no validation tokens were given)."""

    prefix: int
    suffix: int
    samples: int
    seed: int
    train: SplitMemorization
    val: SplitMemorization | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"prefix": self.prefix, "suffix": self.suffix, "samples": self.samples}
        d["seed"] = self.seed
        d["train"] = asdict(self.train)
        if self.val is not None:
            d["val"] = asdict(self.val)
        return d


def memorization(
    model: torch.nn.Module,
    tokenizer: Any,
    train_ids: Any,
    val_ids: Any = None,
    *,
    prefix: int = 32,
    suffix: int = 32,
    samples: int = 256,
    batch_size: int = 32,
    seed: int = 0,
    impl: str = "auto",
    progress: bool = False,
) -> MemorizationResult:
    """Extractable rate (Carlini et al. 2023) and memorization score (Pythia) of ``model`` on
    ``samples`` windows of ``prefix + suffix`` tokens of ``train_ids`` and of ``val_ids`` (1-D
    arrays of token ids, e.g. :func:`lmlab.data.load_tokens`; ``val_ids`` may be None).  Each split's
    windows are drawn with its own seed from ``seed`` (:func:`split_seed`)."""
    check_impl(impl, "memorization")
    for name, v in (("prefix", prefix), ("suffix", suffix), ("samples", samples), ("batch_size", batch_size)):
        if v <= 0:
            raise LmlabError(f"memorization: {name} must be > 0, got {v}")
    kind = _kind(model)
    limit = max_positions(model) if kind == DECODER else None
    if limit is not None and prefix + suffix - 1 > limit:
        raise LmlabError(
            f"memorization: prefix + suffix = {prefix + suffix} tokens need {prefix + suffix - 1} positions; "
            f"the model has {limit}"
        )
    sentinel_id = eos_id = None
    if kind == ENCODER_DECODER:
        ids = special_ids_of(tokenizer)
        sentinel_id, eos_id = ids.sentinel_id, ids.eos_id
        if sentinel_id is None:
            raise LmlabError(
                "memorization of an encoder-decoder needs a tokenizer with T5's sentinels (<extra_id_0>)"
            )
    vocab = int(model.get_input_embeddings().num_embeddings)
    length = prefix + suffix
    splits = {"train": train_ids} | ({} if val_ids is None else {"val": val_ids})
    windows = {}
    for name, ids in splits.items():
        s = split_seed(seed, name)
        w = _windows(ids, sample_offsets(len(ids), length, samples, s, split=name), length)
        check_ids_in_range(w, 0, vocab, f"the model's vocabulary ({name} split)")
        windows[name] = (s, w)

    bar = None
    if progress:
        from lmlab.progress import progress_bar

        bar = progress_bar(total=sum(len(w) for _, w in windows.values()), desc="memorization", unit="seq")
    try:
        figures = {}
        for name, (s, w) in windows.items():
            cont = greedy_continuations(
                model,
                w[:, :prefix],
                suffix,
                batch_size=batch_size,
                sentinel_id=sentinel_id,
                eos_id=eos_id,
                impl=impl,
                progress=bar,
            )
            figures[name] = SplitMemorization.of(*memorization_scores(cont, w[:, prefix:]), s)
    finally:
        if bar is not None:
            bar.close()
    return MemorizationResult(prefix, suffix, samples, seed, figures["train"], figures.get("val"))
