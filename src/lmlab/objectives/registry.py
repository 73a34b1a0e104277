"""Objectives by name, as the command line and the training recipes ask for them.

| name | objective | paper |
|---|---|---|
| ``span`` | :class:`SpanCorruption`, T5's span law | Raffel et al. 2020 §3.1.4, §3.3.4, Table 7 |
| ``iid-span`` | :class:`SpanCorruption` over i.i.d. noise | §3.3.2, Table 4 "replace corrupted spans" |
| ``drop`` | :class:`DropTokens` | §3.3.2, Tables 3–5 |
| ``bert`` | :class:`BertMLM`, 80/10/10 (``preset="t5"`` for 90/10/0) | Devlin et al. 2019 §3.1 |
| ``bert-style`` | :class:`BertStyle` | Raffel et al. 2020 §3.3.1, Tables 3–5 |
| ``mass`` | :class:`MassStyle` | §3.3.2, Tables 4–5 |
| ``prefix`` | :class:`PrefixLM` (``decoder_only=True`` for GPT) | §3.3.1, Table 4 |
| ``deshuffle`` | :class:`Deshuffle` | §3.3.1, Table 4 |
| ``causal`` | :class:`CausalLM` | next-token prediction |

Each objective module registers its classes with :func:`register_objective`; this module imports
those modules, in the order above, and nothing else fills the registry.  A new objective is one
file with a decorated frozen dataclass, plus its import below.

An objective's batch fits one kind of model: an encoder–decoder batch (``decoder_input_ids``,
targets apart from inputs) given to a GPT does not fail, its labels are silently misaligned.  So
``get_objective(name, tok, model=model)`` (or ``kind="decoder"``) builds the variant for that
model's kind (``prefix`` → ``decoder_only=True`` for a decoder) and refuses a mismatch in one
line, as ``lmlab pretrain`` does; without ``model``/``kind`` it builds the registered default.
"""

from __future__ import annotations

import os
from typing import Any

from lmlab.errors import LmlabError

# isort: off
# The modules whose decorators fill the registry, in the order of `lmlab corrupt --objective all`.
from lmlab.objectives import span_corruption, masked_lm, language_modeling  # noqa: F401

# isort: on
from lmlab.objectives.base import KIND_DEFAULTS, OBJECTIVES, Objective, register_objective

__all__ = [
    "OBJECTIVES",
    "get_objective",
    "kind_of",
    "make_objective",
    "objective_names",
    "register_objective",
]

# What model presets each kind of model has, for the message of a mismatch.
_PRESETS = {"encoder-decoder": "t5-*", "encoder": "bert-*", "decoder": "gpt-*"}


def objective_names() -> tuple[str, ...]:
    """The registered names, in order of registration (for CLI choices and help strings)."""
    return tuple(OBJECTIVES)


def get_objective(
    name: str, tokenizer: Any = None, *, model: Any = None, kind: str | None = None, **kw: Any
) -> Objective:
    """The objective called ``name``, its ids read from ``tokenizer``; ``kw`` overrides fields.

    ``tokenizer`` is a ``transformers`` tokenizer, a ``tokenizers.Tokenizer``, a path to a
    ``tokenizer.json`` (or a directory holding one), or ``None`` when ``kw`` gives every id.
    ``model`` (a ``transformers`` model or config) or ``kind`` (``"encoder-decoder"``,
    ``"encoder"``, ``"decoder"``): build the variant for that kind of model and refuse, in one
    line, an objective whose batches would not fit it (:func:`make_objective`).
    """
    if kind is not None and kind not in _PRESETS:
        raise LmlabError(f"unknown model kind {kind!r}; choose one of {', '.join(_PRESETS)}")
    if model is not None:
        model_kind = kind_of(model)
        if kind is not None and kind != model_kind:
            raise LmlabError(f"kind={kind!r} but the model is {model_kind}")
        kind = model_kind
    if kind is not None:
        return make_objective(name, tokenizer, kind, kw)
    return _build(name, tokenizer, kw)


def _build(name: str, tokenizer: Any, kw: dict[str, Any]) -> Objective:
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


def kind_of(model: Any) -> str:
    """``"encoder-decoder"``, ``"encoder"`` or ``"decoder"``: the kind of a ``transformers`` model
    or config, from its lmlab family, else from the config and the class (``is_encoder_decoder``,
    a masked-LM head, a causal-LM head)."""
    from lmlab.models.families import _MASKED_LM_TYPES, family_of

    try:
        return family_of(model).kind
    except LmlabError:
        pass
    config = getattr(model, "config", model)
    cls = type(model).__name__
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder"
    if "MaskedLM" in cls or getattr(config, "model_type", None) in _MASKED_LM_TYPES:
        return "encoder"
    if cls.endswith(("ForCausalLM", "LMHeadModel")) or getattr(config, "is_decoder", False):
        return "decoder"
    raise LmlabError(
        f"cannot tell what kind of model a {cls} is; pass kind='encoder-decoder', 'encoder' or 'decoder'"
    )


def make_objective(name: str, tokenizer: Any, kind: str, kwargs: dict[str, Any] | None = None) -> Objective:
    """The objective ``name`` for a model of ``kind`` (``"encoder-decoder"``, ``"encoder"`` or
    ``"decoder"``), with the registered defaults for that kind; a one-line error on a mismatch,
    of the objective or of its instance (``prefix`` with ``decoder_only=False`` for a decoder)."""
    if kind not in _PRESETS:
        raise LmlabError(f"unknown model kind {kind!r}; choose one of {', '.join(_PRESETS)}")
    kw = {**KIND_DEFAULTS.get(name, {}).get(kind, {}), **(kwargs or {})}
    obj = _build(name, tokenizer, kw)
    archs = set(getattr(obj, "architectures", ()))
    if kind not in archs:
        want = " or ".join(f"{a} ({_PRESETS.get(a, a)})" for a in sorted(archs)) or "no model lmlab has"
        raise LmlabError(
            f"objective {name!r} trains {want} models, but the model is {kind} ({_PRESETS[kind]})"
        )
    check = getattr(obj, "check_kind", None)
    if check is not None:  # the instance: prefix's decoder_only decides which kind its batches fit
        check(kind)
    return obj
