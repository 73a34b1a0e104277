"""Any other Hugging Face language model: a family by kind only, for evaluation and generation.

lmlab trains the families of :data:`lmlab.models.families.FAMILIES`; it *measures* any model that
``transformers`` loads with a language-modelling head (OPT, Qwen2, Mistral, RoBERTa, BART, ...).
Such a model gets a :class:`GenericFamily` of its kind (causal, masked or seq2seq, from its config):
the forward inputs of that kind and the plain logits path (no body/head split, so no fused loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmlab.models.families.base import (
    DECODER,
    ENCODER,
    ENCODER_DECODER,
    decoder_inputs,
    encoder_decoder_inputs,
    encoder_inputs,
)

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class GenericFamily:
    """A model type no lmlab family claims, scored through its own forward (``model(**kw).logits``)."""

    kind: str
    model_type: str = "?"

    @property
    def name(self) -> str:
        return self.model_type

    @property
    def model_types(self) -> tuple[str, ...]:
        return (self.model_type,)

    @property
    def head_classes(self) -> tuple[str, ...]:
        return ()

    def forward_inputs(
        self, model: nn.Module, batch: dict[str, torch.Tensor], start_id: int = 0
    ) -> dict[str, Any]:
        if self.kind == ENCODER_DECODER:
            return encoder_decoder_inputs(batch, start_id)
        if self.kind == ENCODER:
            return encoder_inputs(batch)
        return decoder_inputs(model, batch)

    def splits(self, model: nn.Module) -> bool:
        """Never: lmlab does not know this architecture's body/head split, so every caller (the fused
        loss, :mod:`lmlab.eval.scoring`) takes the model's own forward and has no ``hidden_and_head``
        to ask for."""
        return False


def kind_of_config(config: Any) -> str:
    """The kind of a ``transformers`` config no family claims: seq2seq, masked LM, else causal LM."""
    from lmlab.models.families import _MASKED_LM_TYPES

    if getattr(config, "is_encoder_decoder", False):
        return ENCODER_DECODER
    if getattr(config, "model_type", "") in _MASKED_LM_TYPES:
        return ENCODER
    return DECODER
