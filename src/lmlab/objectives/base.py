"""What every objective is and shares: the :class:`Objective` protocol, its registration, the batch
vocabulary, row lengths and the tokenizer's special ids.

Objectives follow the Hugging Face batch vocabulary (``input_ids``, ``attention_mask``, ``labels``
with ``IGNORE_INDEX`` = -100 where no loss is wanted, ``decoder_input_ids`` for encoder–decoder
models), so that any ``transformers`` model trains on their output unchanged.

Rows may be ragged: an optional ``(B, L)`` attention mask marks each row's tokens, and rows must be
right-padded (ones, then zeros), which is what every lmlab loader produces.  Without a mask every
position is a token, a literal pad id included (T5's HF port dropped those by filtering ``> 0``).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

import torch
from torch import Generator, Tensor

from lmlab.errors import LmlabError

IGNORE_INDEX = -100
ARCHITECTURES = ("encoder-decoder", "encoder", "decoder")
SENTINEL_FORMAT = "<extra_id_{}>"


@runtime_checkable
class Objective(Protocol):
    """A pre-training objective: a frozen dataclass of ids and rates that turns raw token rows into a batch.

    * ``objective(tokens, attention_mask=None, generator=None)``: ``tokens`` ``(B, L)`` integer ids
      (``attention_mask`` ``(B, L)``, right-padded, for ragged rows) give a dict of new tensors with
      Hugging Face's keys: ``input_ids``, ``attention_mask``, ``labels`` (``IGNORE_INDEX`` where no
      loss) and, for an encoder–decoder, ``decoder_input_ids``; the same seed gives the same batch.
    * ``architectures``: the model kinds it trains, a subset of :data:`ARCHITECTURES`.
    * ``pad_id``: what the training data pads a block's outputs with.
    * ``raw_length(inputs_length)``: raw tokens a row needs for inputs of ``inputs_length``;
      ``targets_length(inputs_length)``: the targets' width, ``None`` where the draw decides it.
    * ``from_tokenizer(tok, **kw)``: the objective with its ids read from a tokenizer.

    Objectives built on :class:`ObjectiveBase` (all of lmlab's) also take a list of Hugging Face
    feature dicts in place of ``tokens`` (a ``data_collator``), and know which model kinds their
    instance fits (``kinds``, ``check_kind(kind)``).
    """

    architectures: ClassVar[tuple[str, ...]]
    pad_id: int

    def __call__(
        self,
        tokens: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]: ...

    @classmethod
    def from_tokenizer(cls, tok: Any, **kw: Any) -> Objective: ...

    def raw_length(self, inputs_length: int) -> int: ...

    def targets_length(self, inputs_length: int) -> int | None: ...


# name -> (class, keyword defaults that make the named variant), in the order of registration
OBJECTIVES: dict[str, tuple[type, dict[str, Any]]] = {}
# name -> model kind -> keyword defaults for that kind (PrefixLM is one sequence for a decoder)
KIND_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {}

_T = TypeVar("_T", bound=type)
_MEMBERS = ("architectures", "pad_id", "from_tokenizer", "raw_length", "targets_length")


def register_objective(
    name: str,
    defaults: Mapping[str, Any] | None = None,
    *,
    kind_defaults: Mapping[str, Mapping[str, Any]] | None = None,
) -> Callable[[_T], _T]:
    """Class decorator: register an :class:`Objective` as ``name`` (with keyword ``defaults``).

    ``kind_defaults`` maps a model kind to further defaults for it.  Stack it to register variants
    of one class (``span`` and ``iid-span``).  A name taken by another class is an error.
    """

    def register(cls: _T) -> _T:
        params = getattr(cls, "__dataclass_params__", None)
        # issubclass() does not take a protocol with data members: check its members by name.
        fields = {f.name for f in dataclasses.fields(cls) if f.init} if params is not None else set()
        missing = [m for m in _MEMBERS if not hasattr(cls, m) and m not in fields]
        if params is None or not params.frozen or missing:
            raise LmlabError(
                f"objective {name!r}: {cls.__qualname__} is not a frozen dataclass Objective"
                + (f" (it has no {', '.join(missing)})" if missing else "")
            )
        kinds = {*cls.architectures, *(kind_defaults or {})}
        if not cls.architectures or not kinds <= set(ARCHITECTURES):
            raise LmlabError(f"objective {name!r}: architectures must be among {', '.join(ARCHITECTURES)}")
        given = {*(defaults or {})}.union(*(d for d in (kind_defaults or {}).values()))
        if given - fields:
            raise LmlabError(
                f"objective {name!r}: {cls.__qualname__} has no field {sorted(given - fields)[0]}"
            )
        old = OBJECTIVES.get(name)
        if old is not None and _where(old[0]) != _where(cls):  # the same class again is a module reload
            raise LmlabError(f"objective {name!r} is already registered, by {_where(old[0])}")
        OBJECTIVES[name] = (cls, dict(defaults or {}))
        KIND_DEFAULTS[name] = {k: dict(v) for k, v in (kind_defaults or {}).items()}
        return cls

    return register


def _where(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


Batch = dict[str, torch.Tensor]


class ObjectiveBase(abc.ABC):
    """The prologue every objective shares, written once.

    ``__call__`` checks the batch (``(B, L)`` integer ids, a right-padded mask of the same shape:
    :func:`row_lengths`), widens the ids to int64 and hands them with each row's length (``None``
    when every row is full) to :meth:`transform`, which is the objective itself.

    It is also a Hugging Face ``data_collator``: called on a list of features (dicts with
    ``input_ids``, a list of ints or a 1-D tensor, and optionally ``attention_mask``), as
    ``transformers.Trainer`` calls ``DataCollatorForLanguageModeling``, it right-pads them with
    ``pad_id`` into a ``(B, L)`` batch (:func:`collate_features`) and transforms that.  Randomness:
    ``generator=None`` draws from torch's global generator, as Hugging Face's collators do —
    ``Trainer`` seeds it from ``TrainingArguments.seed`` and gives each data-loader worker its own
    seed, so such runs repeat; for a stream independent of the global state pass a generator
    (``functools.partial(objective, generator=g)``, with ``dataloader_num_workers=0``: each worker
    would get a copy of ``g`` and draw the same masks).
    """

    def __call__(
        self,
        tokens: torch.Tensor | Sequence[Mapping[str, Any]] | Mapping[str, Any],
        attention_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Batch:
        if not isinstance(tokens, torch.Tensor):
            if attention_mask is not None:
                raise LmlabError("attention_mask goes inside the features when an objective collates them")
            tokens, attention_mask = collate_features(tokens, self.pad_id)  # type: ignore[attr-defined]
        lengths = row_lengths(tokens, attention_mask)
        return self.transform(tokens.long(), lengths, generator)

    @property
    def kinds(self) -> tuple[str, ...]:
        """The model kinds this instance's batches fit: :attr:`architectures`, narrowed by a
        ``decoder_only`` field where the objective has one (True: a decoder's one sequence;
        False: an encoder–decoder's inputs and targets)."""
        archs = tuple(self.architectures)  # type: ignore[attr-defined]
        decoder_only = getattr(self, "decoder_only", None)
        if decoder_only is None:
            return archs
        return tuple(a for a in archs if (a == "decoder") == bool(decoder_only))

    def check_kind(self, kind: str) -> None:
        """Raise a one-line :class:`LmlabError` unless this instance's batches fit a model of ``kind``."""
        if kind in self.kinds:
            return
        name = type(self).__name__
        if kind in self.architectures and getattr(self, "decoder_only", None) is not None:  # type: ignore[attr-defined]
            fix = "True" if kind == "decoder" else "False"
            given = self.decoder_only  # type: ignore[attr-defined]
            raise LmlabError(
                f"{name}(decoder_only={given}) batches do not fit a {kind} model; use decoder_only={fix}"
            )
        raise LmlabError(f"{name} trains {' or '.join(self.kinds)} models, but the model is {kind}")

    @abc.abstractmethod
    def transform(self, tokens: Tensor, lengths: Tensor | None, generator: Generator | None) -> Batch:
        """The batch from ``tokens`` ``(B, L)`` int64 (checked) and ``lengths`` ``(B,)`` or ``None``."""

    @classmethod
    def from_tokenizer(cls, tok: Any, **kw: Any) -> Any:
        """The objective with its id fields (``pad_id``, ``eos_id``, ``vocab_size``, …, named as in
        :class:`SpecialIds`) read from ``tok``; ``kw`` overrides any field."""
        return cls(**{**ids_kw(cls, special_ids_of(tok)), **kw})

    @property
    def start_id(self) -> int:
        """The decoder's first input: ``decoder_start_id``, else the pad id as in T5."""
        start = getattr(self, "decoder_start_id", None)
        return self.pad_id if start is None else start  # type: ignore[attr-defined]


class LengthPreserving(ObjectiveBase):
    """For objectives whose encoder inputs are as long as the raw rows (all but T5's span law).

    ``raw_length`` is the identity; ``targets_length`` is ``None`` (the targets' width depends on
    the draw) unless a subclass knows it.
    """

    def raw_length(self, inputs_length: int) -> int:
        return inputs_length

    def targets_length(self, inputs_length: int) -> int | None:
        return None


def row_lengths(tokens: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Each row's number of tokens, ``(B,) int64``, or ``None`` when every row is full.

    ``tokens`` is ``(B, L)`` int64; ``attention_mask`` is ``(B, L)`` (bool or integer) and must
    be right-padded.  A mask of all ones gives ``None`` so that the fast full-row path runs.
    """
    if tokens.dim() != 2:
        raise LmlabError(f"tokens must be a (batch, length) tensor, got shape {tuple(tokens.shape)}")
    if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise LmlabError(f"tokens must be integer token ids, got dtype {tokens.dtype}")
    if attention_mask is None:
        return None
    if attention_mask.shape != tokens.shape:
        raise LmlabError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but tokens have {tuple(tokens.shape)}"
        )
    if attention_mask.device != tokens.device:
        raise LmlabError(f"attention_mask is on {attention_mask.device} but tokens are on {tokens.device}")
    valid = attention_mask != 0
    lengths = valid.sum(dim=1)
    L = tokens.shape[1]
    if bool((lengths == L).all()):
        return None
    positions = torch.arange(L, device=tokens.device)
    if not torch.equal(valid, positions < lengths[:, None]):
        raise LmlabError("attention_mask must be right-padded: each row ones, then zeros")
    return lengths


# Feature keys a collated batch may carry besides input_ids and attention_mask, and why they may go.
_DROPPABLE = {
    "token_type_ids": "all zeros is what the model assumes without it",
    "special_tokens_mask": "the objective knows the special ids from its tokenizer",
}


def collate_features(features: Sequence[Any] | Mapping[str, Any], pad_id: int) -> tuple[Tensor, Tensor]:
    """``(tokens (B, L) int64, attention_mask (B, L) int64)`` from Hugging Face features.

    ``features``: a list of dicts with ``input_ids`` (a list of ints or a 1-D tensor) and optionally
    ``attention_mask`` (1 on tokens; a row's zeros are dropped, so left- and right-padded rows both
    work), or a list of id sequences, or one dict of already batched ``(B, L)`` tensors.  Rows are
    right-padded with ``pad_id`` to the longest.  ``labels`` are refused (the objective makes
    them), as is any key it would have to drop silently (a ``token_type_ids`` with a second segment).
    """
    if isinstance(features, Mapping):
        _check_keys(features)
        ids = torch.as_tensor(features["input_ids"])
        mask = features.get("attention_mask")
        if ids.dim() != 2:
            raise LmlabError(f"a batch's input_ids must be (batch, length), got shape {tuple(ids.shape)}")
        return ids, torch.ones_like(ids) if mask is None else torch.as_tensor(mask, device=ids.device)
    if isinstance(features, str | bytes) or not isinstance(features, Sequence) or not features:
        raise LmlabError(
            f"expected a non-empty list of features (dicts with input_ids), got {type(features).__name__}"
        )
    rows = []
    for i, f in enumerate(features):
        if isinstance(f, Mapping):
            _check_keys(f)
            row = torch.as_tensor(f["input_ids"])
            mask = f.get("attention_mask")
            if mask is not None:
                mask = torch.as_tensor(mask)
                if mask.shape != row.shape:
                    raise LmlabError(
                        f"feature {i}: attention_mask has shape {tuple(mask.shape)} but input_ids {tuple(row.shape)}"
                    )
                row = row[mask != 0]
        else:
            row = torch.as_tensor(f)
        if row.dim() != 1 or (row.numel() and row.is_floating_point()):
            raise LmlabError(
                f"feature {i}: input_ids must be one row of integer ids, got shape {tuple(row.shape)} {row.dtype}"
            )
        rows.append(row.long())
    L = max(r.numel() for r in rows)
    tokens = torch.full((len(rows), L), pad_id, dtype=torch.long, device=rows[0].device)
    mask = torch.zeros((len(rows), L), dtype=torch.long, device=rows[0].device)
    for b, r in enumerate(rows):
        tokens[b, : r.numel()] = r
        mask[b, : r.numel()] = 1
    return tokens, mask


def _check_keys(feature: Mapping[str, Any]) -> None:
    if "input_ids" not in feature:
        raise LmlabError(f"a feature has no input_ids (its keys: {', '.join(map(str, feature)) or 'none'})")
    if "labels" in feature:
        raise LmlabError("features hold labels, but the objective makes its own; drop the labels column")
    tt = feature.get("token_type_ids")
    if tt is not None and bool(torch.as_tensor(tt).any()):
        raise LmlabError(
            "features hold token_type_ids of a second segment, which an objective would drop; "
            "drop the column or pack single segments"
        )
    other = set(feature) - {"input_ids", "attention_mask", *_DROPPABLE}
    if other:
        raise LmlabError(
            f"features hold {', '.join(sorted(map(str, other)))}, which an objective does not use; "
            "remove those columns (datasets' remove_columns)"
        )


def valid_mask(lengths: torch.Tensor | None, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """``(B, L)`` bool: True on each row's tokens."""
    if lengths is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    return torch.arange(shape[1], device=device) < lengths[:, None]


def length_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """``(B, width)`` bool: True on the first ``lengths[b]`` positions of row ``b``."""
    return torch.arange(width, device=lengths.device) < lengths[:, None]


def seq2seq_batch(
    inputs: torch.Tensor,
    input_lengths: torch.Tensor | None,
    targets: torch.Tensor,
    target_lengths: torch.Tensor | None,
    pad_id: int,
    decoder_start_id: int,
) -> dict[str, torch.Tensor]:
    """The encoder–decoder batch from padded ``inputs`` ``(B, S)`` and ``targets`` ``(B, T)``.

    ``inputs`` and ``targets`` hold ``pad_id`` past each row's length (``None`` = full rows); they
    must be fresh tensors of the caller's own, which the batch then holds.
    ``decoder_input_ids`` is ``targets`` shifted right (padding stays pad, as HF's
    ``shift_tokens_right`` gives), so a literal pad id inside a target is still a label.
    """
    B, S = inputs.shape
    if input_lengths is None:
        attention_mask = torch.ones((B, S), dtype=torch.long, device=inputs.device)
    else:
        attention_mask = length_mask(input_lengths, S).long()
    if target_lengths is None:
        labels = targets  # callers hand over tensors of their own
    else:
        labels = targets.masked_fill(~length_mask(target_lengths, targets.shape[1]), IGNORE_INDEX)
    decoder_input_ids = targets.new_empty(targets.shape)
    decoder_input_ids[:, :1] = decoder_start_id
    decoder_input_ids[:, 1:] = targets[:, :-1]
    return {
        "input_ids": inputs,
        "attention_mask": attention_mask,
        "labels": labels,
        "decoder_input_ids": decoder_input_ids,
    }


def check_fraction(name: str, value: float, *, low_open: bool = False, high_open: bool = False) -> None:
    """Raise a one-line error unless ``value`` is a probability (with optional open ends)."""
    ok = (value > 0.0 if low_open else value >= 0.0) and (value < 1.0 if high_open else value <= 1.0)
    if not ok:
        lo = "(0" if low_open else "[0"
        hi = "1)" if high_open else "1]"
        raise LmlabError(f"{name} must be in {lo}, {hi}, got {value}")


@dataclass(frozen=True)
class SpecialIds:
    """The ids an objective needs from a tokenizer, read from the tokenizer itself.

    lmlab's layout is pad 0, eos 1, unk 2, mask 3, ``<extra_id_k>`` = vocab_size - 1 - k; a
    Hugging Face tokenizer has its own (BERT: ``[PAD]`` 0, ``[MASK]`` 103, no eos; T5: ``<pad>`` 0,
    ``</s>`` 1, ``<extra_id_0>`` 32099 down to ``<extra_id_99>`` 32000, no mask; GPT-2: no pad, no
    mask, ``<|endoftext|>`` 50256).  ``eos_id``, ``mask_id`` and ``sentinel_id`` are ``None`` where
    the tokenizer has none, and the objectives that need one refuse it in one line.
    """

    vocab_size: int
    pad_id: int  # the tokenizer's pad, else its eos (GPT-2's convention: padding is masked anyway)
    eos_id: int | None
    mask_id: int | None
    sentinel_id: int | None  # <extra_id_0>; later sentinels count down from it
    num_sentinels: int
    special_ids: tuple[int, ...]  # every id never to corrupt or sample as a random token


def special_ids_of(tok: Any) -> SpecialIds:
    """Read :class:`SpecialIds` from a ``transformers`` tokenizer (its own special-token attributes
    and ``all_special_ids``) or a raw ``tokenizers.Tokenizer`` (lmlab's token names)."""
    from lmlab.data.tokenizer import role_ids

    r = role_ids(tok)
    pad = r["pad"] if r["pad"] is not None else r["eos"]
    if pad is None:
        raise LmlabError("the tokenizer has neither a pad nor an end-of-sequence token to pad rows with")
    extra = set(getattr(tok, "all_special_ids", ()) or ()) if hasattr(tok, "convert_tokens_to_ids") else set()
    specials = {pad} | extra | {r[k] for k in ("eos", "unk", "mask", "bos", "cls", "sep") if r[k] is not None}
    sentinel, num_sentinels = r["sentinel_0"], int(r["num_sentinels"] or 0)
    if sentinel is not None:
        specials |= set(range(sentinel - num_sentinels + 1, sentinel + 1))
    return SpecialIds(
        vocab_size=int(r["vocab_size"]),
        pad_id=int(pad),
        eos_id=r["eos"],
        mask_id=r["mask"],
        sentinel_id=sentinel,
        num_sentinels=num_sentinels,
        special_ids=tuple(sorted(int(i) for i in specials)),
    )


def ids_kw(cls: type, ids: SpecialIds) -> dict[str, Any]:
    """The fields of the dataclass ``cls`` that :class:`SpecialIds` knows, with the tokenizer's
    values (those it lacks, such as a missing ``mask_id``, left out)."""
    known = {f.name for f in dataclasses.fields(SpecialIds)}
    names = [f.name for f in dataclasses.fields(cls) if f.init and f.name in known]
    return {n: getattr(ids, n) for n in names if getattr(ids, n) is not None}


def check_ids_in_range(tokens: torch.Tensor, low: int, high: int, what: str) -> None:
    """Raise unless every id lies in ``[low, high)`` (one pass; skipped for an empty batch)."""
    if tokens.numel() == 0:
        return
    lo, hi = torch.aminmax(tokens)
    if int(lo) < low or int(hi) >= high:
        bad = int(lo) if int(lo) < low else int(hi)
        raise LmlabError(f"token id {bad} is outside {what} [{low}, {high})")
