"""Objectives by name, as the command line and the training recipes ask for them.

| name | objective | paper |
|---|---|---|
| ``span`` | :class:`SpanCorruption`, T5's span law | Raffel et al. 2020 §3.1.4, §3.3.4, Table 7 |
| ``iid-span`` | :class:`SpanCorruption` over i.i.d. noise | §3.3.2, Table 4 "replace corrupted spans" |
| ``bert`` | :class:`BertMLM`, 80/10/10 (``preset="t5"`` for 90/10/0) | Devlin et al. 2019 §3.1 |
| ``bert-style`` | :class:`BertStyle` | Raffel et al. 2020 §3.3.1, Tables 3–5 |
| ``mass`` | :class:`MassStyle` | §3.3.2, Tables 4–5 |
| ``drop`` | :class:`DropTokens` | §3.3.2, Tables 3–5 |
| ``prefix`` | :class:`PrefixLM` (``decoder_only=True`` for GPT) | §3.3.1, Table 4 |
| ``deshuffle`` | :class:`Deshuffle` | §3.3.1, Table 4 |
| ``causal`` | :class:`CausalLM` | next-token prediction |
"""

from __future__ import annotations

import os
from typing import Any

from lmlab.errors import LmlabError
from lmlab.objectives.language_modeling import CausalLM, Deshuffle, PrefixLM
from lmlab.objectives.masked_lm import BertMLM, BertStyle, MassStyle
from lmlab.objectives.span_corruption import DropTokens, SpanCorruption

# name -> (class, keyword defaults that make the named variant)
OBJECTIVES: dict[str, tuple[type, dict[str, Any]]] = {
    "span": (SpanCorruption, {}),
    "iid-span": (SpanCorruption, {"noise": "iid"}),
    "bert": (BertMLM, {}),
    "bert-style": (BertStyle, {}),
    "mass": (MassStyle, {}),
    "drop": (DropTokens, {}),
    "prefix": (PrefixLM, {}),
    "deshuffle": (Deshuffle, {}),
    "causal": (CausalLM, {}),
}


def get_objective(name: str, tokenizer: Any = None, **kw: Any) -> Any:
    """The objective called ``name``, its ids read from ``tokenizer``; ``kw`` overrides fields.

    ``tokenizer`` is a ``transformers`` tokenizer, a ``tokenizers.Tokenizer``, a path to a
    ``tokenizer.json`` (or a directory holding one), or ``None`` when ``kw`` gives every id.
    """
    if name not in OBJECTIVES:
        raise LmlabError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    cls, defaults = OBJECTIVES[name]
    kw = {**defaults, **kw}
    if isinstance(tokenizer, (str, os.PathLike)):
        from lmlab.data import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    try:
        if tokenizer is None:
            return cls(**kw)
        return cls.from_tokenizer(tokenizer, **kw)
    except TypeError as e:
        raise LmlabError(f"objective {name!r}: {e}") from None
