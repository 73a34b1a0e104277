"""Token-level masking: BERT's masked LM and T5's "BERT-style" and "MASS-style" objectives.

* :class:`BertMLM` — Devlin et al. 2019, §3.1 (Task #1): select ``mlm_probability`` (15%) of the
  tokens; of those, 80% become ``<mask>``, 10% a random token and 10% stay unchanged; the loss is on
  the selected tokens only (``labels`` = -100 elsewhere), for an encoder-only model.  The split is
  configurable; ``preset="t5"`` is Raffel et al.'s variant (90% mask, 10% random, 0% unchanged).
* :class:`BertStyle` — Raffel et al. 2020, §3.3.1 and Table 3: the same i.i.d. corruption (15%,
  90% mask / 10% random) for an encoder–decoder model whose target is the whole original sequence.
* :class:`MassStyle` — §3.3.2 and Table 4 (after Song et al. 2019): mask only, whole target.

Special tokens (pad, EOS, unk, mask, sentinels; BERT's ``[CLS]``/``[SEP]``) and padding are never
selected, as HF's ``DataCollatorForLanguageModeling`` excludes them with its special-tokens mask.
A random replacement is drawn uniformly from the non-special ids; there lmlab departs from both
peers on purpose: Google's ``create_pretraining_data.py`` draws from the whole vocabulary and HF's
collator from ``randint(len(tokenizer))``, specials included, so a ``[SEP]`` or ``[CLS]`` can appear
mid-sequence as a fake frame boundary (at 10% × 15% × the specials' share of the vocabulary: rare
for BERT's 5 of 30,522, not for lmlab's 104 of a small vocabulary).  The ids come from the tokenizer
(:func:`~lmlab.objectives.base.special_ids_of`): lmlab's ``<mask>`` (id 3), BERT's ``[MASK]`` (103);
a tokenizer without one (GPT-2's, T5's) is refused unless ``mask_id=`` is given (T5 used a sentinel).
Inputs keep their length, so ``raw_length`` is the identity and no EOS is appended.

Rows from ``lmlab prepare`` with a BERT tokenizer are packed as ``run_mlm.py`` packs them
(``group_texts``): each document is ``[CLS] … [SEP]``, documents are concatenated and rows cut
wherever they fall, so a row may start mid-document and hold several frames; the framing tokens are
specials, never masked, and are inputs like any other.

Vectorisation: one uniform draw ``u`` per token decides everything: selected iff ``u < p``, masked
iff ``u < p · mask_replace_prob``, random iff between that and ``p · (mask + random)``; only the
random positions get a second draw (their replacement ids).

    .venv/bin/lmlab corrupt --objective bert
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Generator, Tensor

from lmlab.errors import LmlabError
from lmlab.objectives.base import (
    IGNORE_INDEX,
    Batch,
    LengthPreserving,
    check_fraction,
    check_ids_in_range,
    ids_kw,
    register_objective,
    seq2seq_batch,
    special_ids_of,
    valid_mask,
)

# (mask_replace_prob, random_replace_prob); the rest of the selected tokens stay unchanged.
MLM_PRESETS: dict[str, tuple[float, float]] = {"bert": (0.8, 0.1), "t5": (0.9, 0.1), "mass": (1.0, 0.0)}


@dataclass(frozen=True)
class _Vocab:
    """Which ids are special, as two bounds where the specials sit at both ends (lmlab's layout),
    else as tables."""

    low: int  # ordinary ids are [low, high) minus `inner`
    high: int
    inner: tuple[int, ...]  # specials strictly inside [low, high)

    @classmethod
    def of(cls, vocab_size: int, specials: set[int]) -> _Vocab:
        low = 0
        while low in specials:
            low += 1
        high = vocab_size
        while high - 1 in specials and high > low:
            high -= 1
        inner = tuple(sorted(i for i in specials if low <= i < high))
        if high - low - len(inner) <= 0:
            raise LmlabError(f"every id of the vocabulary of {vocab_size} is special: nothing to corrupt")
        return cls(low, high, inner)

    def ordinary(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` bool: True where the id is an ordinary (non-special) token."""
        ok = (tokens >= self.low) & (tokens < self.high)
        if self.inner:
            ok &= ~_is_inner(self.inner, tokens.device)[tokens.clamp(0, _table_size(self.inner) - 1)]
        return ok

    def sample(self, k: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        """``k`` ids drawn uniformly from the ordinary ids, ``(k,)`` int64."""
        if not self.inner:
            return torch.randint(self.low, self.high, (k,), generator=generator, device=device)
        table = _ordinary_table(self, device)
        return table[torch.randint(0, table.numel(), (k,), generator=generator, device=device)]


def _table_size(inner: tuple[int, ...]) -> int:
    return inner[-1] + 2


@functools.lru_cache(maxsize=32)
def _is_inner(inner: tuple[int, ...], device: torch.device) -> torch.Tensor:
    table = torch.zeros(_table_size(inner), dtype=torch.bool, device=device)
    table[list(inner)] = True
    return table


@functools.lru_cache(maxsize=32)
def _ordinary_table(vocab: _Vocab, device: torch.device) -> torch.Tensor:
    ids = torch.arange(vocab.low, vocab.high, device=device)
    return ids[~torch.isin(ids, torch.tensor(vocab.inner, device=device, dtype=torch.long))]


def mask_tokens(
    tokens: torch.Tensor,
    lengths: torch.Tensor | None,
    *,
    probability: float,
    mask_replace_prob: float,
    random_replace_prob: float,
    mask_id: int,
    pad_id: int,
    vocab: _Vocab,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's corruption: returns ``(corrupted (B, L) int64, selected (B, L) bool)``.

    Only ordinary tokens inside each row's length can be selected (each with ``probability``,
    independently); a selected token becomes ``mask_id`` with probability ``mask_replace_prob``,
    a uniformly random ordinary id with ``random_replace_prob``, and stays itself otherwise.
    Padding comes out as ``pad_id``.
    """
    B, L = tokens.shape
    u = torch.rand((B, L), generator=generator, device=tokens.device)  # (B, L)
    eligible = vocab.ordinary(tokens)
    if lengths is not None:
        eligible &= valid_mask(lengths, (B, L), tokens.device)
    # Thresholds on one uniform: P(u < p·a) = p·a, P(p·a <= u < p·(a+r)) = p·r.
    t_mask = probability * mask_replace_prob
    t_rand = probability * min(mask_replace_prob + random_replace_prob, 1.0)
    selected = (u < probability) & eligible
    corrupted = tokens.masked_fill((u < t_mask) & eligible, mask_id)
    if random_replace_prob > 0:
        rand_pos = (u >= t_mask) & (u < t_rand) & eligible
        k = int(rand_pos.sum())
        if k:
            corrupted.masked_scatter_(rand_pos, vocab.sample(k, generator, tokens.device))
    if lengths is not None:
        corrupted.masked_fill_(~valid_mask(lengths, (B, L), tokens.device), pad_id)
    return corrupted, selected


class _Masking(LengthPreserving):
    """What :class:`BertMLM` and :class:`BertStyle` share: the split's checks, the vocabulary's
    specials and the corruption, over the selection rate in the field named ``_rate``."""

    _rate: ClassVar[str]

    def __post_init__(self) -> None:
        p, mask, random = getattr(self, self._rate), self.mask_replace_prob, self.random_replace_prob
        check_fraction(self._rate, p)
        check_fraction("mask_replace_prob", mask)
        check_fraction("random_replace_prob", random)
        if mask + random > 1.0 + 1e-9:
            raise LmlabError(
                f"mask_replace_prob + random_replace_prob must be at most 1, got {mask} + {random}"
            )
        specials = {self.pad_id, self.mask_id, *self.special_ids}
        object.__setattr__(self, "_vocab", _Vocab.of(self.vocab_size, specials))

    @classmethod
    def from_tokenizer(cls, tok: Any, preset: str | None = None, **kw: Any) -> Any:
        """From a tokenizer; ``preset`` ``"bert"`` (80/10/10), ``"t5"`` (90/10/0) or ``"mass"``
        sets the split (the default: the class's own)."""
        ids = special_ids_of(tok)
        if ids.mask_id is None and "mask_id" not in kw:
            raise LmlabError(
                "the tokenizer has no mask token (<mask>, BERT's [MASK]), which masking needs; pass "
                "mask_id= (T5 used a sentinel)"
            )
        out = ids_kw(cls, ids)
        if preset is not None:
            if preset not in MLM_PRESETS:
                raise LmlabError(f"unknown masking preset {preset!r}; choose one of {', '.join(MLM_PRESETS)}")
            out["mask_replace_prob"], out["random_replace_prob"] = MLM_PRESETS[preset]
        return cls(**{**out, **kw})

    def _corrupt(
        self, tokens: Tensor, lengths: Tensor | None, generator: Generator | None
    ) -> tuple[Tensor, Tensor]:
        """:func:`mask_tokens` with this objective's rates: ``(corrupted, selected)``, ``(B, L)``."""
        check_ids_in_range(tokens, 0, self.vocab_size, "the vocabulary")
        return mask_tokens(
            tokens,
            lengths,
            probability=getattr(self, self._rate),
            mask_replace_prob=self.mask_replace_prob,
            random_replace_prob=self.random_replace_prob,
            mask_id=self.mask_id,
            pad_id=self.pad_id,
            vocab=self._vocab,
            generator=generator,
        )


@register_objective("bert")
@dataclass(frozen=True)
class BertMLM(_Masking):
    """BERT's masked language model for an encoder (Devlin et al. 2019, §3.1).

    ``objective(tokens (B, L) int64, attention_mask=None, generator=None)`` returns ``input_ids``,
    ``attention_mask`` and ``labels`` (the original id where selected, else -100), all ``(B, L)``.
    """

    vocab_size: int
    mask_id: int = 3
    pad_id: int = 0
    special_ids: tuple[int, ...] = ()  # besides pad and mask, which are always special
    mlm_probability: float = 0.15
    mask_replace_prob: float = 0.8
    random_replace_prob: float = 0.1
    _vocab: _Vocab = field(init=False, repr=False, compare=False)

    architectures: ClassVar[tuple[str, ...]] = ("encoder",)
    _rate: ClassVar[str] = "mlm_probability"

    def transform(self, tokens: Tensor, lengths: Tensor | None, generator: Generator | None) -> Batch:
        corrupted, selected = self._corrupt(tokens, lengths, generator)
        if lengths is None:
            mask = torch.ones(tokens.shape, dtype=torch.long, device=tokens.device)
        else:
            mask = valid_mask(lengths, tokens.shape, tokens.device).long()
        return {
            "input_ids": corrupted,
            "attention_mask": mask,
            "labels": tokens.masked_fill(~selected, IGNORE_INDEX),
        }


@register_objective("bert-style")
@dataclass(frozen=True)
class BertStyle(_Masking):
    """T5's "BERT-style" encoder–decoder objective: i.i.d. corruption, target = the whole sequence.

    Returns ``input_ids``/``attention_mask`` ``(B, L)`` (the corrupted rows) and
    ``labels``/``decoder_input_ids`` ``(B, L)`` (the original rows; -100 on padding).
    """

    vocab_size: int
    mask_id: int = 3
    pad_id: int = 0
    special_ids: tuple[int, ...] = ()
    noise_density: float = 0.15
    mask_replace_prob: float = 0.9
    random_replace_prob: float = 0.1
    decoder_start_id: int | None = None
    _vocab: _Vocab = field(init=False, repr=False, compare=False)

    architectures: ClassVar[tuple[str, ...]] = ("encoder-decoder",)
    _rate: ClassVar[str] = "noise_density"

    def targets_length(self, inputs_length: int) -> int | None:
        return inputs_length

    def transform(self, tokens: Tensor, lengths: Tensor | None, generator: Generator | None) -> Batch:
        corrupted, _ = self._corrupt(tokens, lengths, generator)
        targets = (
            tokens.clone()
            if lengths is None
            else tokens.masked_fill(~valid_mask(lengths, tokens.shape, tokens.device), self.pad_id)
        )
        return seq2seq_batch(corrupted, lengths, targets, lengths, self.pad_id, self.start_id)


@register_objective("mass")
@dataclass(frozen=True)
class MassStyle(BertStyle):
    """T5's "MASS-style" objective: like :class:`BertStyle` but every corrupted token is masked."""

    mask_replace_prob: float = 1.0
    random_replace_prob: float = 0.0
