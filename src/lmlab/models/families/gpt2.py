"""GPT-2 (Radford et al. 2019): ``GPT2LMHeadModel``, a decoder-only family with learned positions.

Trained by the causal objective (position t predicts token t+1) or, with a ``prefix_mask``, as a
decoder-only prefix LM (Raffel et al. 2020 §3.2.1).  Its projections are ``Conv1D`` modules
(a transposed ``nn.Linear``), which the FLOP count includes; the output layer is tied to ``wte``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmlab.models.families.base import DECODER, decoder_inputs, decoder_only_flops, fast_routing, plain_head

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class GPT2Family:
    name: str = "gpt2"
    kind: str = DECODER
    model_types: tuple[str, ...] = ("gpt2",)
    head_classes: tuple[str, ...] = ("GPT2LMHeadModel",)

    def hf_config(self, sizes: dict[str, Any], vocab_size: int, ids: dict[str, int]):
        from transformers import GPT2Config

        return GPT2Config(
            **sizes,
            vocab_size=vocab_size,
            bos_token_id=ids["eos"],
            eos_token_id=ids["eos"],
            pad_token_id=ids["pad"],
        )

    def model_class(self, config) -> type:
        from transformers import GPT2LMHeadModel

        return GPT2LMHeadModel

    def forward_inputs(self, model: nn.Module, batch: dict[str, torch.Tensor], start_id: int = 0):
        return decoder_inputs(model, batch)

    def splits(self, model: nn.Module) -> bool:
        return plain_head(model, self.head_classes)

    def hidden_and_head(self, model: nn.Module, kw: dict[str, Any], keep: torch.Tensor, impl: str = "auto"):
        with fast_routing(model, impl):
            h = model.transformer(
                input_ids=kw["input_ids"], attention_mask=kw.get("attention_mask"), use_cache=False
            )[0]
        return h[keep], model.lm_head

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.transformer.h)

    def flops_per_step(
        self, model: nn.Module, batch_size: int, input_len: int, target_len: int | None = None
    ) -> float:
        c = model.config
        return decoder_only_flops(model, batch_size, input_len, c.n_layer, c.n_embd)


FAMILY = GPT2Family()
