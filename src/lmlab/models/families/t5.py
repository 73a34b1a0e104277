"""T5 (v1.0 / v1.1) and mT5: ``T5ForConditionalGeneration``, the encoder–decoder family.

Raffel et al. 2020 §2.1 and §3.2.1: the encoder reads the inputs, the decoder the targets shifted
right behind the pad id (``decoder_start_token_id``).  transformers 5 always ties T5's input and
output embeddings, so the decoder output is rescaled by ``d_model^-0.5`` before the projection
(T5 1.0's rule for tied embeddings), here as in Hugging Face's forward.  The body runs through
lmlab's lean forward (:mod:`lmlab.models.fast_t5`) where it applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmlab.models.families.base import ENCODER_DECODER, encoder_decoder_inputs, plain_head

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class T5Family:
    name: str = "t5"
    kind: str = ENCODER_DECODER
    model_types: tuple[str, ...] = ("t5", "mt5")
    head_classes: tuple[str, ...] = ("T5ForConditionalGeneration", "MT5ForConditionalGeneration")

    def hf_config(self, sizes: dict[str, Any], vocab_size: int, ids: dict[str, int]):
        from transformers import T5Config

        # T5 starts the decoder with the pad id (Raffel et al. 2020, and the released models).
        return T5Config(
            **sizes,
            vocab_size=vocab_size,
            pad_token_id=ids["pad"],
            eos_token_id=ids["eos"],
            decoder_start_token_id=ids["pad"],
        )

    def model_class(self, config) -> type:
        import transformers

        if config.model_type == "mt5":
            return transformers.MT5ForConditionalGeneration
        return transformers.T5ForConditionalGeneration

    def forward_inputs(self, model: nn.Module, batch: dict[str, torch.Tensor], start_id: int = 0):
        return encoder_decoder_inputs(batch, start_id)

    def splits(self, model: nn.Module) -> bool:
        return plain_head(model, self.head_classes)

    def hidden_and_head(self, model: nn.Module, kw: dict[str, Any], keep: torch.Tensor, impl: str = "auto"):
        from lmlab.models import fast_t5

        h = fast_t5.decoder_hidden(
            model, kw["input_ids"], kw["decoder_input_ids"], kw.get("attention_mask"), impl=impl
        )[keep]
        if model.config.scale_decoder_outputs:
            h = h * (model.model_dim**-0.5)
        return h, model.lm_head

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return [*model.encoder.block, *model.decoder.block]

    def flops_per_step(
        self, model: nn.Module, batch_size: int, input_len: int, target_len: int | None = None
    ) -> float:
        """The encoder's matrices see the ``input_len`` tokens, the decoder's (and the head) the
        ``target_len`` ones, except cross-attention's key and value projections (the encoder output)."""
        from lmlab.models.flops import linear_weights

        c = model.config
        T = input_len
        S = target_len if target_len is not None else T
        enc = dec = 0
        for name, n in linear_weights(model):
            if name.startswith("encoder.") or name.endswith(("EncDecAttention.k", "EncDecAttention.v")):
                enc += n
            else:
                dec += n  # decoder blocks and lm_head
        inner = c.num_heads * c.d_kv
        attn_enc = 12 * c.num_layers * inner * T * T
        attn_dec = 12 * c.num_decoder_layers * inner * S * (S + T)
        return float(batch_size * (6 * enc * T + 6 * dec * S + attn_enc + attn_dec))


FAMILY = T5Family()
