"""Llama (Touvron et al. 2023): ``LlamaForCausalLM``, a decoder-only family without position tables.

Pre-norm RMSNorm, SwiGLU feed-forward (``down(silu(gate(x)) ⊙ up(x))``, Shazeer 2020) and rotary
position embeddings (RoPE, Su et al. 2021) on the queries and keys; no biases.  Trained like GPT-2
by the causal objective or as a decoder-only prefix LM.  lmlab's ``llama-*`` presets tie the input
and output embeddings (as Llama 3.2's 1B and 3B models do, and GPT-2), where LLaMA 1 and 2 keep a
separate output matrix: at these small sizes the (V, d) matrix would be a large share of the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmlab.models.families.base import DECODER, decoder_inputs, decoder_only_flops, fast_routing, plain_head

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class LlamaFamily:
    name: str = "llama"
    kind: str = DECODER
    model_types: tuple[str, ...] = ("llama",)
    head_classes: tuple[str, ...] = ("LlamaForCausalLM",)

    def hf_config(self, sizes: dict[str, Any], vocab_size: int, ids: dict[str, int]):
        from transformers import LlamaConfig

        return LlamaConfig(
            **sizes,
            vocab_size=vocab_size,
            bos_token_id=ids["eos"],
            eos_token_id=ids["eos"],
            pad_token_id=ids["pad"],
        )

    def model_class(self, config) -> type:
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM

    def forward_inputs(self, model: nn.Module, batch: dict[str, torch.Tensor], start_id: int = 0):
        return decoder_inputs(model, batch)

    def splits(self, model: nn.Module) -> bool:
        return plain_head(model, self.head_classes)

    def hidden_and_head(self, model: nn.Module, kw: dict[str, Any], keep: torch.Tensor, impl: str = "auto"):
        with fast_routing(model, impl):
            h = model.model(
                input_ids=kw["input_ids"], attention_mask=kw.get("attention_mask"), use_cache=False
            )[0]
        return h[keep], model.lm_head

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.model.layers)  # LlamaDecoderLayer

    def flops_per_step(
        self, model: nn.Module, batch_size: int, input_len: int, target_len: int | None = None
    ) -> float:
        # Attention's QKᵀ and AV run over the query heads (grouped keys and values share them).
        c = model.config
        inner = c.num_attention_heads * getattr(c, "head_dim", c.hidden_size // c.num_attention_heads)
        return decoder_only_flops(model, batch_size, input_len, c.num_hidden_layers, inner)


FAMILY = LlamaFamily()
