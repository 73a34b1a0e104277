"""Llama (Touvron et al. 2023): ``LlamaForCausalLM``, a decoder-only family without position tables.

Pre-norm RMSNorm, SwiGLU feed-forward (``down(silu(gate(x)) ⊙ up(x))``, Shazeer 2020) and rotary
position embeddings (RoPE, Su et al. 2021) on the queries and keys; no biases.  Trained like GPT-2
by the causal objective or as a decoder-only prefix LM.  lmlab's ``llama-*`` presets tie the input
and output embeddings (as Llama 3.2's 1B and 3B models do, and GPT-2), where LLaMA 1 and 2 keep a
separate output matrix: at these small sizes the (V, d) matrix would be a large share of the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lmlab.models.families.base import DecoderOnlyFamily, decoder_only_flops

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class LlamaFamily(DecoderOnlyFamily):
    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.model.layers)  # LlamaDecoderLayer

    def flops_per_step(
        self, model: nn.Module, batch_size: int, input_len: int, target_len: int | None = None
    ) -> float:
        # Attention's QKᵀ and AV run over the query heads (grouped keys and values share them).
        c = model.config
        inner = c.num_attention_heads * getattr(c, "head_dim", c.hidden_size // c.num_attention_heads)
        return decoder_only_flops(model, batch_size, input_len, c.num_hidden_layers, inner)


FAMILY = LlamaFamily(
    name="llama",
    model_types=("llama",),
    head_classes=("LlamaForCausalLM",),
    config_class="LlamaConfig",
    body="model",
)
