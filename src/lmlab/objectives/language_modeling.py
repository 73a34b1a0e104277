"""Language-modelling objectives: next-token prediction, prefix LM and deshuffling.

* :class:`CausalLM` — next-token prediction for a decoder (GPT).  ``labels`` are the input ids
  (-100 on padding); Hugging Face's causal-LM heads shift them by one themselves.
* :class:`PrefixLM` — Raffel et al. 2020, §3.3.1 and Table 3 ("prefix language modeling"): a split
  point is drawn per row, uniformly in ``[1, L − 1]`` as T5's ``random_prefix_noise_mask`` does; the
  prefix is the input and the rest the target.  ``decoder_only=True`` gives one sequence for a
  decoder with the loss on the continuation only (the prefix's labels are -100) and
  ``prefix_mask`` (1 on the prefix), with which lmlab's training loss lets the prefix attend to
  itself fully and the continuation causally — §3.2.1's "causal with prefix" mask (Figure 3,
  right).  T5X carries the same signal, shifted by one, as ``decoder_causal_attention``.
* :class:`Deshuffle` — §3.3.1 and Table 4: the input is a uniformly random permutation of the
  row's tokens, the target the original row.

None of them changes lengths, so ``raw_length`` is the identity; outputs are ``(B, L)``.

    .venv/bin/lmlab corrupt --objective prefix
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Generator, Tensor

from lmlab.objectives.base import (
    IGNORE_INDEX,
    Batch,
    LengthPreserving,
    register_objective,
    seq2seq_batch,
    valid_mask,
)


def _full_lengths(tokens: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    if lengths is not None:
        return lengths
    return torch.full((tokens.shape[0],), tokens.shape[1], dtype=torch.long, device=tokens.device)


@register_objective("causal")
@dataclass(frozen=True)
class CausalLM(LengthPreserving):
    """Next-token prediction: ``input_ids``, ``attention_mask``, ``labels`` (= inputs, -100 on padding)."""

    pad_id: int = 0

    architectures: ClassVar[tuple[str, ...]] = ("decoder",)

    def transform(self, tokens: Tensor, lengths: Tensor | None, generator: Generator | None) -> Batch:
        if lengths is None:
            return {
                "input_ids": tokens.clone(),
                "attention_mask": torch.ones(tokens.shape, dtype=torch.long, device=tokens.device),
                "labels": tokens.clone(),
            }
        valid = valid_mask(lengths, tokens.shape, tokens.device)
        return {
            "input_ids": tokens.masked_fill(~valid, self.pad_id),
            "attention_mask": valid.long(),
            "labels": tokens.masked_fill(~valid, IGNORE_INDEX),
        }


def random_split_points(lengths: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Prefix lengths ``(B,)`` int64, uniform in ``[min(1, L − 1), L − 1]`` per row (T5's law).

    A row of one token gets an empty prefix (its token is the target); an empty row, nothing.
    """
    hi = (lengths - 1).clamp_min(0)
    lo = hi.clamp_max(1)
    u = torch.rand(lengths.shape, generator=generator, device=lengths.device, dtype=torch.float64)
    return lo + (u * (hi - lo + 1).double()).long().minimum(hi - lo)


@register_objective("prefix", kind_defaults={"decoder": {"decoder_only": True}})
@dataclass(frozen=True)
class PrefixLM(LengthPreserving):
    """Prefix LM (T5 §3.3.1).  Encoder–decoder by default; ``decoder_only=True`` for a GPT."""

    pad_id: int = 0
    decoder_only: bool = False
    decoder_start_id: int | None = None

    architectures: ClassVar[tuple[str, ...]] = ("encoder-decoder", "decoder")

    def targets_length(self, inputs_length: int) -> int | None:
        return None if self.decoder_only else inputs_length

    def transform(self, tokens: Tensor, lengths: Tensor | None, generator: Generator | None) -> Batch:
        B, L = tokens.shape
        full = _full_lengths(tokens, lengths)
        split = random_split_points(full, generator)  # (B,)
        positions = torch.arange(L, device=tokens.device)
        if self.decoder_only:
            valid = positions < full[:, None]
            target = valid & (positions >= split[:, None])
            return {
                "input_ids": tokens.masked_fill(~valid, self.pad_id),
                "attention_mask": valid.long(),
                "labels": tokens.masked_fill(~target, IGNORE_INDEX),
                "prefix_mask": (valid & ~target).long(),
            }
        inputs = tokens.masked_fill(positions >= split[:, None], self.pad_id)
        # The continuation, moved to the front of its row: target[t] = tokens[split + t].
        source = (positions + split[:, None]).clamp_max(max(L - 1, 0))
        target_lengths = full - split
        targets = tokens.gather(1, source).masked_fill_(positions >= target_lengths[:, None], self.pad_id)
        return seq2seq_batch(inputs, split, targets, target_lengths, self.pad_id, self.start_id)


@register_objective("deshuffle")
@dataclass(frozen=True)
class Deshuffle(LengthPreserving):
    """Deshuffling (T5 §3.3.1): input = a uniform random permutation of the row, target = the row."""

    pad_id: int = 0
    decoder_start_id: int | None = None

    architectures: ClassVar[tuple[str, ...]] = ("encoder-decoder",)

    def targets_length(self, inputs_length: int) -> int | None:
        return inputs_length

    def transform(self, tokens: Tensor, lengths: Tensor | None, generator: Generator | None) -> Batch:
        B, L = tokens.shape
        # Sorting i.i.d. keys gives a uniform permutation; padding gets keys above every token's
        # (float64 keys make ties, which would favour the original order, practically impossible).
        keys = torch.rand((B, L), generator=generator, device=tokens.device, dtype=torch.float64)
        if lengths is not None:
            valid = valid_mask(lengths, (B, L), tokens.device)
            keys.masked_fill_(~valid, 2.0)
            targets = tokens.masked_fill(~valid, self.pad_id)
        else:
            targets = tokens.clone()
        order = keys.argsort(dim=1)
        inputs = targets.gather(1, order)
        return seq2seq_batch(inputs, lengths, targets, lengths, self.pad_id, self.start_id)
