"""Pre-training objectives as pure, vectorised batch transforms (Raffel et al. 2020 §3.3; Devlin et al. 2019 §3.1).

Each objective is a frozen dataclass built from token ids (or ``from_tokenizer(tok, **kw)``) and
called on a ``(B, L)`` int64 batch of raw token ids::

    objective = get_objective("span", load_tokenizer("data/"))
    batch = objective(tokens, attention_mask=None, generator=g)   # dict of new tensors

The batch uses Hugging Face's keys: ``input_ids``, ``attention_mask``, ``labels`` (-100 =
``IGNORE_INDEX`` where there is no loss) and, for encoder–decoder objectives,
``decoder_input_ids`` (``labels`` shifted right after the decoder start id, T5's pad id 0).
Inputs are never modified; the same generator seed gives the same batch; outputs live on the
inputs' device.  :class:`Objective` is the protocol they all follow: ``objective.architectures``
names the model kinds it trains and ``objective.raw_length(inputs_length)`` how many raw tokens a
row needs.  ``@register_objective(name)`` gives a class its name (:mod:`lmlab.objectives.registry`);
``get_objective(name, tokenizer, model=model)`` (or ``make_objective(name, tokenizer, kind)``)
builds one for a model's kind, with a one-line error on a mismatch.

An objective is also a Hugging Face ``data_collator``: called on a list of feature dicts
(``input_ids``, optionally ``attention_mask``) it pads them and returns the batch::

    objective = get_objective("span", tokenizer, model=model)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds, data_collator=objective)

The names below are imported on first use, so that ``lmlab --help`` and ``lmlab.objectives.cli``
do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_EXPORTS = {
    "IGNORE_INDEX": "lmlab.objectives.base",
    "CausalLM": "lmlab.objectives.language_modeling",
    "Deshuffle": "lmlab.objectives.language_modeling",
    "PrefixLM": "lmlab.objectives.language_modeling",
    "BertMLM": "lmlab.objectives.masked_lm",
    "BertStyle": "lmlab.objectives.masked_lm",
    "MassStyle": "lmlab.objectives.masked_lm",
    "iid_noise_mask": "lmlab.objectives.noise",
    "random_spans_noise_mask": "lmlab.objectives.noise",
    "span_corruption_lengths": "lmlab.objectives.noise",
    "OBJECTIVES": "lmlab.objectives.registry",
    "get_objective": "lmlab.objectives.registry",
    "kind_of": "lmlab.objectives.registry",
    "collate_features": "lmlab.objectives.base",
    "make_objective": "lmlab.objectives.registry",
    "objective_names": "lmlab.objectives.registry",
    "register_objective": "lmlab.objectives.registry",
    "Objective": "lmlab.objectives.base",
    "DropTokens": "lmlab.objectives.span_corruption",
    "SpanCorruption": "lmlab.objectives.span_corruption",
}

__all__ = [
    "IGNORE_INDEX",
    "OBJECTIVES",
    "BertMLM",
    "BertStyle",
    "CausalLM",
    "Deshuffle",
    "DropTokens",
    "MassStyle",
    "Objective",
    "PrefixLM",
    "SpanCorruption",
    "collate_features",
    "get_objective",
    "iid_noise_mask",
    "kind_of",
    "make_objective",
    "objective_names",
    "random_spans_noise_mask",
    "register_objective",
    "span_corruption_lengths",
]

if TYPE_CHECKING:
    from lmlab.objectives.base import IGNORE_INDEX, Objective, collate_features
    from lmlab.objectives.language_modeling import CausalLM, Deshuffle, PrefixLM
    from lmlab.objectives.masked_lm import BertMLM, BertStyle, MassStyle
    from lmlab.objectives.noise import iid_noise_mask, random_spans_noise_mask, span_corruption_lengths
    from lmlab.objectives.registry import (
        OBJECTIVES,
        get_objective,
        kind_of,
        make_objective,
        objective_names,
        register_objective,
    )
    from lmlab.objectives.span_corruption import DropTokens, SpanCorruption


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lmlab.objectives' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
