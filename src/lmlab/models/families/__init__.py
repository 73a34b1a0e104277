"""Model-family adapters: one module per Hugging Face architecture lmlab trains, and their registry.

Each family (:mod:`~lmlab.models.families.t5`, :mod:`~lmlab.models.families.gpt2`,
:mod:`~lmlab.models.families.bert`, :mod:`~lmlab.models.families.llama`) is an object implementing
:class:`~lmlab.models.families.base.Family`: its HF config and classes, its forward inputs, its
body/head split for the fused loss, its FSDP blocks and its FLOP count.  Presets, ``--init``,
``lmlab quantize``, the loss, FSDP and the FLOP count all ask :func:`family_of` /
:func:`model_class`, so adding a family is one module here and one line in :data:`FAMILIES`.

Importing this package builds the table below and nothing else: no torch, no transformers.
"""

from __future__ import annotations

from typing import Any

from lmlab.errors import LmlabError
from lmlab.models.families import bert, gpt2, llama, t5
from lmlab.models.families.base import DECODER, ENCODER, ENCODER_DECODER, KINDS, Family

#: Every family lmlab trains, by name.
FAMILIES: dict[str, Family] = {f.name: f for f in (t5.FAMILY, bert.FAMILY, gpt2.FAMILY, llama.FAMILY)}

_BY_MODEL_TYPE: dict[str, Family] = {t: f for f in FAMILIES.values() for t in f.model_types}
# Encoder-only model types whose pre-training head is a masked LM (for types no family claims).
_MASKED_LM_TYPES = (
    "bert",
    "roberta",
    "xlm-roberta",
    "distilbert",
    "albert",
    "electra",
    "deberta",
    "deberta-v2",
)


def get_family(name: str) -> Family:
    """The family called ``name`` (``"t5"``, ``"gpt2"``, ...); a one-line error otherwise."""
    if name not in FAMILIES:
        raise LmlabError(f"unknown model family {name!r}; choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of(model_or_config: Any) -> Family:
    """The family of a model or a ``transformers`` config, from its ``model_type``; a one-line
    :class:`LmlabError` naming the type for one lmlab does not train."""
    config = getattr(model_or_config, "config", model_or_config)
    t = getattr(config, "model_type", None)
    if t not in _BY_MODEL_TYPE:
        known = ", ".join(sorted(_BY_MODEL_TYPE))
        raise LmlabError(f"model type {t!r} is not one lmlab trains (model types: {known})")
    return _BY_MODEL_TYPE[t]


def model_class(config: Any) -> type:
    """The ``transformers`` class that loads a directory saved with ``config`` (and instantiates it).

    The one rule for every caller (``--init``, evaluation, ``lmlab quantize``, presets):

    1. the class the directory was saved from, ``config.architectures[0]``, when ``transformers``
       has it (what ``save_pretrained`` records; a run's ``final/`` names its family's class);
    2. else the class of ``config``'s family (``T5ForConditionalGeneration``, ``BertForMaskedLM``,
       ``GPT2LMHeadModel``, ``LlamaForCausalLM``);
    3. else, for a model type no family claims, the ``transformers`` Auto class of its kind
       (seq2seq, masked LM, causal LM) — ``lmlab quantize`` takes any such model; training and
       evaluation then ask :func:`family_of`, which refuses it in one line.
    """
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type):
            return cls
    if getattr(config, "model_type", None) in _BY_MODEL_TYPE:
        return family_of(config).model_class(config)
    if getattr(config, "is_encoder_decoder", False):
        auto = transformers.AutoModelForSeq2SeqLM
    elif getattr(config, "model_type", "") in _MASKED_LM_TYPES:
        auto = transformers.AutoModelForMaskedLM
    else:
        auto = transformers.AutoModelForCausalLM
    try:
        return auto._model_mapping[type(config)]
    except KeyError:
        raise LmlabError(f"no transformers model class for config type {type(config).__name__}") from None


def scoring_family(model_or_config: Any) -> Any:
    """The family that says how to score and generate with a model: its lmlab family, else a
    :class:`~lmlab.models.families.generic.GenericFamily` of its kind (any ``transformers``
    language model: evaluation and generation take models lmlab does not train)."""
    config = getattr(model_or_config, "config", model_or_config)
    if getattr(config, "model_type", None) in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[config.model_type]
    from lmlab.models.families.generic import GenericFamily, kind_of_config

    return GenericFamily(kind_of_config(config), str(getattr(config, "model_type", "?")))


def check_trained_class(model: Any) -> Family:
    """The family of ``model``, which must be the class lmlab trains and scores for that family
    (its language-modelling head); a one-line error for, e.g., a sequence classifier."""
    family = family_of(model)
    name = type(model).__name__
    if name not in family.head_classes:
        raise LmlabError(
            f"the model is a {name}; lmlab trains and evaluates {family.name} models as "
            f"{' or '.join(family.head_classes)}"
        )
    return family


__all__ = [
    "DECODER",
    "ENCODER",
    "ENCODER_DECODER",
    "FAMILIES",
    "KINDS",
    "Family",
    "family_of",
    "get_family",
    "model_class",
    "check_trained_class",
    "scoring_family",
]
