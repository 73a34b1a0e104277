"""BERT (Devlin et al. 2019): ``BertForMaskedLM``, the encoder family, trained by masked LM.

The masked-LM head is a per-token transform (dense, GELU, layer norm) and then the projection
tied to the word embeddings; as it is per token, lmlab runs it on the scored rows only (15% of
the positions under BERT's masking).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmlab.models.families.base import ENCODER, decoder_only_flops, encoder_inputs, fast_routing, plain_head

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class BertFamily:
    name: str = "bert"
    kind: str = ENCODER
    model_types: tuple[str, ...] = ("bert",)
    head_classes: tuple[str, ...] = ("BertForMaskedLM",)

    def hf_config(self, sizes: dict[str, Any], vocab_size: int, ids: dict[str, int]):
        from transformers import BertConfig

        return BertConfig(**sizes, vocab_size=vocab_size, pad_token_id=ids["pad"])

    def model_class(self, config) -> type:
        from transformers import BertForMaskedLM

        return BertForMaskedLM

    def forward_inputs(self, model: nn.Module, batch: dict[str, torch.Tensor], start_id: int = 0):
        return encoder_inputs(batch)

    def splits(self, model: nn.Module) -> bool:
        return plain_head(model, self.head_classes)

    def hidden_and_head(self, model: nn.Module, kw: dict[str, Any], keep: torch.Tensor, impl: str = "auto"):
        with fast_routing(model, impl):
            h = model.bert(input_ids=kw["input_ids"], attention_mask=kw.get("attention_mask"))[0][keep]
            h = model.cls.predictions.transform(h)
        return h, model.cls.predictions.decoder

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.bert.encoder.layer)

    def flops_per_step(
        self, model: nn.Module, batch_size: int, input_len: int, target_len: int | None = None
    ) -> float:
        # Every matrix (the head's transform and projection included) sees every token, as for a decoder.
        c = model.config
        return decoder_only_flops(model, batch_size, input_len, c.num_hidden_layers, c.hidden_size)


FAMILY = BertFamily()
