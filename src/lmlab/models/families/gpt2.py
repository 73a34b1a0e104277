"""GPT-2 (Radford et al. 2019): ``GPT2LMHeadModel``, a decoder-only family with learned positions.

Trained by the causal objective (position t predicts token t+1) or, with a ``prefix_mask``, as a
decoder-only prefix LM (Raffel et al. 2020 §3.2.1).  Its projections are ``Conv1D`` modules
(a transposed ``nn.Linear``), which the FLOP count includes; the output layer is tied to ``wte``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lmlab.models.families.base import DecoderOnlyFamily, decoder_only_flops

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class GPT2Family(DecoderOnlyFamily):
    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.transformer.h)

    def flops_per_step(
        self, model: nn.Module, batch_size: int, input_len: int, target_len: int | None = None
    ) -> float:
        c = model.config
        return decoder_only_flops(model, batch_size, input_len, c.n_layer, c.n_embd)


FAMILY = GPT2Family(
    name="gpt2",
    model_types=("gpt2",),
    head_classes=("GPT2LMHeadModel",),
    config_class="GPT2Config",
    body="transformer",
)
