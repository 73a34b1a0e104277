"""T5's sentinel objectives: "replace corrupted spans" and "drop corrupted tokens".

Raffel et al. 2020, §3.3.2 (Table 3 shows both on one sentence; Table 4 compares them), §3.3.3–3.3.4
(corruption rate and span length; Table 7) and §3.1.4 (the final span-corruption objective: 15%
noise, mean span length 3).

* :class:`SpanCorruption`: every noise span in the input becomes one sentinel, unique within the
  row (``<extra_id_0>`` = the highest id for the first span, then downward); the targets are each
  noise span preceded by its sentinel, then EOS; the inputs end in EOS too.  With T5's span law
  (``noise="spans"``) the lengths are exact: ``span_corruption_lengths(512) == (568, 114)`` and a
  ``(B, 568)`` batch gives ``(B, 512)`` inputs and ``(B, 114)`` targets with no padding.  With
  ``noise="iid"`` (the objective named ``iid-span``: §3.3.2's "replace corrupted spans", whose
  spans are runs of i.i.d. noise) lengths vary and the batch is padded to its longest row.
  The sentinels of inputs and targets always agree, even when a row starts with noise (T5's own
  i.i.d. code numbers the target sentinels by non-noise runs and gets this case wrong).
* :class:`DropTokens`: the noise tokens are removed from the input and are the target (EOS on both).

Both are built from pure functions over a given noise mask, :func:`replace_noise_spans` and
:func:`drop_noise_tokens`, so the tests can feed a hand-made mask (Table 3's golden example).

Vectorisation.  Mask path (any mask, ragged rows): every output token's position is a running
count (non-noise tokens so far plus spans so far), so each output is one ``scatter_``; all tokens
of a span write the same sentinel to the same slot, so repeated writes agree.  Fast path (full
rows under the span law, the training case): :func:`replace_segmented_spans` never builds the
``(B, L)`` mask; from the drawn run lengths it gathers each output token from its source
position.  Both give the same batch from the same seed (a test checks it; ``impl="reference"``
takes the mask path, ``impl="fast"`` insists on the gather path, see :mod:`lmlab.impl`).

    .venv/bin/lmlab corrupt --objective span
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Generator, Tensor

from lmlab.errors import LmlabError
from lmlab.impl import check_impl, use_fast
from lmlab.objectives.base import (
    Batch,
    LengthPreserving,
    ObjectiveBase,
    check_ids_in_range,
    ids_kw,
    register_objective,
    seq2seq_batch,
    special_ids_of,
)
from lmlab.objectives.noise import (
    check_span_args,
    iid_noise_mask,
    noise_span_counts,
    random_span_segmentation,
    random_spans_noise_mask,
    span_corruption_lengths,
)

NOISE_LAWS = ("spans", "iid")


def _compact(
    values: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor, width: int, fill: int
) -> torch.Tensor:
    """``out[b, positions[b, i]] = values[b, i]`` where ``keep``, else ``fill``: ``(B, width)``.

    What a row does not keep goes to a spare last column, which is then cut off.
    """
    out = values.new_full((values.shape[0], width + 1), fill)
    out.scatter_(1, torch.where(keep, positions, width), values)
    return out[:, :width].contiguous()


def _longest(input_lengths: torch.Tensor, target_lengths: torch.Tensor) -> tuple[int, int]:
    """The widths of a batch padded to its longest rows (1, room for EOS, for an empty batch)."""
    if input_lengths.numel() == 0:
        return 1, 1
    return int(input_lengths.max()), int(target_lengths.max())


def _place_eos(out: torch.Tensor, lengths: torch.Tensor, eos_id: int) -> None:
    """``out[b, lengths[b]] = eos_id`` for every row (in place on a tensor we own)."""
    out.scatter_(1, lengths[:, None], eos_id)


def replace_noise_spans(
    tokens: torch.Tensor,
    noise_mask: torch.Tensor,
    *,
    sentinel_id: int,
    eos_id: int,
    pad_id: int,
    num_sentinels: int,
    lengths: torch.Tensor | None = None,
    widths: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """T5's span corruption for a given noise mask.

    ``tokens`` ``(B, L)`` int64, ``noise_mask`` ``(B, L)`` bool (False past each row's length),
    ``lengths`` ``(B,)`` int64 or ``None`` for full rows.  Returns ``(inputs, input_lengths,
    targets, target_lengths)``: inputs ``(B, S)`` are the non-noise tokens with each noise span
    replaced by the next sentinel (``sentinel_id``, ``sentinel_id - 1``, …), then EOS; targets
    ``(B, T)`` are each span preceded by its sentinel, then EOS; both padded with ``pad_id``.
    ``widths`` is ``(S, T)``; ``None``: the batch's longest rows.  Raises when a row has more spans than
    ``num_sentinels``.
    """
    B, L = tokens.shape
    device = tokens.device
    noise = noise_mask
    first = noise.clone()
    first[:, 1:] &= ~noise[:, :-1]  # (B, L) the first token of each span
    span_no = first.cumsum(dim=1)  # (B, L) spans begun so far, this one included
    # Padding counts as non-noise here: it then lands past each row's EOS (see below).
    nonnoise_no = (~noise).cumsum(dim=1)  # (B, L) non-noise tokens so far, this one included
    noise_no = torch.arange(1, L + 1, device=device) - nonnoise_no  # (B, L) noise tokens so far
    if L:
        num_spans, n_noise = span_no[:, -1], noise_no[:, -1]
    else:
        num_spans = n_noise = torch.zeros(B, dtype=torch.long, device=device)
    n_keep = (L - n_noise) if lengths is None else (lengths - n_noise)
    if B and L and int(num_spans.max()) > num_sentinels:
        raise LmlabError(
            f"a row needs {int(num_spans.max())} noise spans but the vocabulary has only {num_sentinels} "
            f"sentinels; use shorter rows, a lower noise_density or longer spans"
        )
    input_lengths = n_keep + num_spans + 1
    target_lengths = n_noise + num_spans + 1
    S, T = widths or _longest(input_lengths, target_lengths)
    if lengths is not None:
        tokens = tokens.masked_fill(torch.arange(L, device=device) >= lengths[:, None], pad_id)
    next_sentinel = sentinel_id - span_no  # (B, L) the sentinel of the next span to begin

    # Inputs: a kept token goes after the kept tokens and sentinels before it.  Every token of a
    # span goes to its sentinel's place with the sentinel as value, so the repeated writes agree
    # and one scatter does it all.  A row's padding follows its last token: the first padding
    # slot is overwritten by EOS, the rest clamp into a spare column.
    in_index = nonnoise_no + span_no - 1
    in_vals = torch.where(noise, next_sentinel + 1, tokens)
    if lengths is None:
        inputs = tokens.new_full((B, S), pad_id).scatter_(1, in_index, in_vals)
    else:
        inputs = tokens.new_full((B, S + 1), pad_id).scatter_(1, in_index.clamp_max_(S), in_vals)
        inputs = inputs[:, :S].contiguous()
    _place_eos(inputs, input_lengths - 1, eos_id)

    # Targets: a noise token goes after the noise tokens and sentinels before it (its own
    # sentinel included).  A non-noise token writes the next span's sentinel to that sentinel's
    # place (again repeated writes that agree); past the last span this is the EOS slot, which
    # EOS then overwrites.  A row that starts with noise has no token before its first span: the
    # first slot is always <extra_id_0> (or EOS, written last, for a row without noise).
    tgt_index = noise_no + span_no - noise.long()
    tgt_vals = torch.where(noise, tokens, next_sentinel)
    targets = tokens.new_full((B, T), pad_id).scatter_(1, tgt_index, tgt_vals)
    if T:
        targets[:, 0] = sentinel_id
    _place_eos(targets, target_lengths - 1, eos_id)
    return inputs, input_lengths, targets, target_lengths


def replace_segmented_spans(
    tokens: torch.Tensor,
    nonnoise_ends: torch.Tensor,
    noise_ends: torch.Tensor,
    *,
    sentinel_id: int,
    eos_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`replace_noise_spans` for full rows whose noise is given as a segmentation.

    ``tokens`` ``(B, L)``; ``nonnoise_ends``/``noise_ends`` ``(B, s + 1)`` as
    :func:`~lmlab.objectives.noise.random_span_segmentation` returns them, every row with the
    same ``m`` non-noise and ``n`` noise tokens in ``s`` spans.  Returns ``(inputs (B, m + s + 1),
    targets (B, n + s + 1))``, no padding.

    The fast path: it never builds the ``(B, L)`` mask but gathers each output token from its
    source.  In the inputs, non-noise run ``k`` is preceded by ``k`` sentinels and by noise runs
    ``0..k-1``; in the targets, noise run ``k`` by ``k + 1`` sentinels and non-noise runs ``0..k``.
    """
    B, L = tokens.shape
    s = noise_ends.shape[1] - 1
    m, n = int(nonnoise_ends[0, -1]) if B else 0, int(noise_ends[0, -1]) if B else 0
    ks = torch.arange(s, device=tokens.device)

    def assemble(width: int, sentinel_at: torch.Tensor, other_ends: torch.Tensor) -> torch.Tensor:
        # In place where possible: each fresh (B, width) tensor costs more than the arithmetic.
        marks = torch.zeros((B, width), dtype=torch.long, device=tokens.device)
        marks.scatter_(1, sentinel_at, 1)  # 1 where a sentinel goes
        q = marks.cumsum(dim=1)  # (B, width) sentinels at or before output position j
        # A token at output j after q sentinels comes from j - q + (tokens of the other kind
        # before its run), which is other_ends[q] in both cases.  EOS's source is L: clamped.
        source = other_ends.gather(1, q).sub_(q).add_(torch.arange(width, device=tokens.device))
        out = tokens.gather(1, source.clamp_(0, max(L - 1, 0)))
        # Where a sentinel goes, add (its id - the gathered token): sentinel q is sentinel_id + 1 - q.
        out.add_(q.neg_().add_(sentinel_id + 1).sub_(out).mul_(marks))
        out[:, -1] = eos_id
        return out

    if s == 0:
        inputs = torch.cat([tokens, tokens.new_full((B, 1), eos_id)], dim=1)
        return inputs, tokens.new_full((B, 1), eos_id)
    inputs = assemble(m + s + 1, nonnoise_ends[:, 1:] + ks, noise_ends)
    targets = assemble(n + s + 1, noise_ends[:, :-1] + ks, nonnoise_ends)
    return inputs, targets


def drop_noise_tokens(
    tokens: torch.Tensor,
    noise_mask: torch.Tensor,
    *,
    eos_id: int,
    pad_id: int,
    lengths: torch.Tensor | None = None,
    widths: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """T5's "drop corrupted tokens": inputs = non-noise tokens + EOS, targets = noise tokens + EOS.

    Same arguments and return layout as :func:`replace_noise_spans`.
    """
    B, L = tokens.shape
    keep = (
        ~noise_mask
        if lengths is None
        else ~noise_mask & (torch.arange(L, device=tokens.device) < lengths[:, None])
    )
    nonnoise_no = keep.cumsum(dim=1)
    noise_no = noise_mask.cumsum(dim=1)
    zero = torch.zeros(B, dtype=torch.long, device=tokens.device)
    input_lengths = (nonnoise_no[:, -1] if L else zero) + 1
    target_lengths = (noise_no[:, -1] if L else zero) + 1
    S, T = widths or _longest(input_lengths, target_lengths)
    inputs = _compact(tokens, nonnoise_no - 1, keep, S, pad_id)
    _place_eos(inputs, input_lengths - 1, eos_id)
    targets = _compact(tokens, noise_no - 1, noise_mask, T, pad_id)
    _place_eos(targets, target_lengths - 1, eos_id)
    return inputs, input_lengths, targets, target_lengths


class _NoiseLaw(ObjectiveBase):
    """What both sentinel objectives share: the noise law of their fields ``noise``,
    ``noise_density`` and ``mean_noise_span_length``, its checks and its draw."""

    noise: str
    noise_density: float
    mean_noise_span_length: float

    def __post_init__(self) -> None:
        if self.noise not in NOISE_LAWS:
            raise LmlabError(f"unknown noise law {self.noise!r}; choose one of {', '.join(NOISE_LAWS)}")
        check_span_args(self.noise_density, self.mean_noise_span_length)

    def noise_counts(self, length: int) -> tuple[int, int]:
        """``(noise tokens, noise spans)`` of a full row of ``length`` under T5's span law."""
        return noise_span_counts(length, self.noise_density, self.mean_noise_span_length)

    def noise_mask(self, tokens: Tensor, lengths: Tensor | None, generator: Generator | None) -> Tensor:
        """``(B, L)`` bool, True = noise, drawn under this objective's law."""
        B, L = tokens.shape
        where = {"lengths": lengths, "generator": generator, "device": tokens.device}
        if self.noise == "spans":
            return random_spans_noise_mask(B, L, self.noise_density, self.mean_noise_span_length, **where)
        return iid_noise_mask(B, L, self.noise_density, **where)


def _need_eos(ids: Any, kw: dict[str, Any], what: str) -> None:
    """Refuse a tokenizer without an end-of-sequence token (BERT's, whose [SEP] is not one) unless
    ``eos_id`` is given: T5's objectives end inputs and targets with it."""
    if ids.eos_id is None and "eos_id" not in kw:
        raise LmlabError(
            f"the tokenizer has no end-of-sequence token (T5's </s>), which {what} ends inputs and "
            "targets with; pass eos_id="
        )


@register_objective("iid-span", {"noise": "iid"})
@register_objective("span")
@dataclass(frozen=True)
class SpanCorruption(_NoiseLaw):
    """T5's span corruption ("replace corrupted spans"), an encoder–decoder objective.

    ``objective(tokens (B, L) int64, attention_mask=None, generator=None)`` returns ``input_ids``
    and ``attention_mask`` ``(B, S)``, ``labels`` and ``decoder_input_ids`` ``(B, T)``.  With
    ``noise="spans"`` ``S`` and ``T`` depend on ``L`` only (shorter ragged rows are padded);
    with ``noise="iid"`` they are the batch's longest row.  ``impl``: ``"fast"`` gathers full rows
    under the span law from the drawn run lengths (:func:`replace_segmented_spans`),
    ``"reference"`` goes through the ``(B, L)`` noise mask; both give the same batch from a seed.
    """

    sentinel_id: int  # <extra_id_0>, the highest id of the vocabulary in lmlab's layout
    eos_id: int = 1
    pad_id: int = 0
    num_sentinels: int = 100
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0
    noise: str = "spans"
    decoder_start_id: int | None = None  # None: the pad id, as in T5
    impl: str = "auto"  # see lmlab.impl; "fast" is the gather path, "reference" the mask path

    architectures: ClassVar[tuple[str, ...]] = ("encoder-decoder",)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_impl(self.impl, "SpanCorruption")
        if self.num_sentinels < 1 or self.sentinel_id - self.num_sentinels + 1 < 0:
            raise LmlabError(
                f"need sentinels: sentinel_id={self.sentinel_id} with num_sentinels={self.num_sentinels}"
            )

    @classmethod
    def from_tokenizer(cls, tok: Any, **kw: Any) -> SpanCorruption:
        """Ids from ``tok``: its ``<extra_id_k>`` sentinels (T5's ``<extra_id_0>`` = 32099 …
        ``<extra_id_99>`` = 32000, read, not assumed) and its ``</s>``; refused without them."""
        ids = special_ids_of(tok)
        if (ids.sentinel_id is None or ids.num_sentinels == 0) and "sentinel_id" not in kw:
            raise LmlabError("the tokenizer has no <extra_id_0> sentinel, which span corruption needs")
        _need_eos(ids, kw, "span corruption")
        return cls(**{**ids_kw(cls, ids), **kw})

    def raw_length(self, inputs_length: int) -> int:
        if self.noise == "iid":
            return inputs_length
        return span_corruption_lengths(inputs_length, self.noise_density, self.mean_noise_span_length)[0]

    def targets_length(self, inputs_length: int) -> int | None:
        if self.noise == "iid":
            return None
        return span_corruption_lengths(inputs_length, self.noise_density, self.mean_noise_span_length)[1]

    def output_widths(self, length: int) -> tuple[int, int] | None:
        """``(inputs_width, targets_width)`` for raw rows of ``length``; ``None`` when random."""
        if self.noise == "iid":
            return None
        n, s = self.noise_counts(length)
        return length - n + s + 1, n + s + 1

    def _check_sentinels(self, tokens: Tensor, lengths: Tensor | None) -> None:
        """Fail before drawing anything: ids must leave the sentinels free, and under the span law
        each row's length fixes how many sentinels it needs."""
        check_ids_in_range(tokens, 0, self.sentinel_id - self.num_sentinels + 1, "the non-sentinel ids")
        if self.noise != "spans":
            return
        B, L = tokens.shape
        row_max = L if lengths is None else int(lengths.max()) if B else 0
        _, s = self.noise_counts(row_max)
        if s > self.num_sentinels:
            raise LmlabError(
                f"rows of {row_max} tokens need {s} noise spans but the vocabulary has only "
                f"{self.num_sentinels} sentinels; use shorter rows, a lower noise_density or longer spans"
            )

    def _fast(self, tokens: Tensor, lengths: Tensor | None) -> bool:
        why = "noise='iid' has no run lengths to gather from" if self.noise != "spans" else "rows are ragged"
        applies = self.noise == "spans" and lengths is None
        # An empty batch has nothing to gather: the mask path gives its (0, S) shapes.
        return use_fast(self.impl, applies, "SpanCorruption", why) and tokens.shape[0] > 0

    def transform(self, tokens: Tensor, lengths: Tensor | None, generator: Generator | None) -> Batch:
        self._check_sentinels(tokens, lengths)
        if self._fast(tokens, lengths):
            B, L = tokens.shape
            A, C = random_span_segmentation(
                B,
                L,
                self.noise_density,
                self.mean_noise_span_length,
                generator=generator,
                device=tokens.device,
            )
            inputs, targets = replace_segmented_spans(
                tokens, A, C, sentinel_id=self.sentinel_id, eos_id=self.eos_id
            )
            return seq2seq_batch(inputs, None, targets, None, self.pad_id, self.start_id)
        widths = self.output_widths(tokens.shape[1])
        inputs, in_len, targets, tgt_len = replace_noise_spans(
            tokens,
            self.noise_mask(tokens, lengths, generator),
            sentinel_id=self.sentinel_id,
            eos_id=self.eos_id,
            pad_id=self.pad_id,
            num_sentinels=self.num_sentinels,
            lengths=lengths,
            widths=widths,
        )
        if widths is not None and lengths is None:  # full rows under the span law: no padding
            in_len = tgt_len = None
        return seq2seq_batch(inputs, in_len, targets, tgt_len, self.pad_id, self.start_id)


@register_objective("drop")
@dataclass(frozen=True)
class DropTokens(_NoiseLaw, LengthPreserving):
    """T5's "drop corrupted tokens" (Table 3): noise tokens leave the input and are the target.

    I.i.d. noise by default, as in Table 4, with outputs as wide as the batch's longest row;
    ``noise="spans"`` uses T5's span law instead, with widths ``L − n + 1`` and ``n + 1``.
    """

    eos_id: int = 1
    pad_id: int = 0
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0
    noise: str = "iid"
    decoder_start_id: int | None = None

    architectures: ClassVar[tuple[str, ...]] = ("encoder-decoder",)

    @classmethod
    def from_tokenizer(cls, tok: Any, **kw: Any) -> DropTokens:
        ids = special_ids_of(tok)
        _need_eos(ids, kw, "dropping tokens")
        return cls(**{**ids_kw(cls, ids), **kw})

    def transform(self, tokens: Tensor, lengths: Tensor | None, generator: Generator | None) -> Batch:
        L = tokens.shape[1]
        widths = None
        if self.noise == "spans":
            n, _ = self.noise_counts(L)
            widths = (L - n + 1, n + 1)
        inputs, in_len, targets, tgt_len = drop_noise_tokens(
            tokens,
            self.noise_mask(tokens, lengths, generator),
            eos_id=self.eos_id,
            pad_id=self.pad_id,
            lengths=lengths,
            widths=widths,
        )
        return seq2seq_batch(inputs, in_len, targets, tgt_len, self.pad_id, self.start_id)


__all__ = [
    "DropTokens",
    "SpanCorruption",
    "drop_noise_tokens",
    "replace_noise_spans",
]
