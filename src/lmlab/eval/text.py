"""The text a model is evaluated on: documents, their token ids framed as ``lmlab prepare`` frames
them, and the bytes and words that the tokenizer-independent metrics divide by.

Three sources give one :class:`EvalText`: texts in memory, files (read by the same readers as
``lmlab prepare``: plain text with blank-line or per-line documents, JSON Lines, directories,
``.gz``), or a split of a prepared directory.  Documents are tokenized exactly as ``prepare`` writes
them into ``train.bin`` / ``val.bin`` (:func:`lmlab.data.pipeline.encode_documents`: the tokenizer's
own special tokens around each, its end-of-sequence token appended where they end nothing, literal
special-token text spelled out), so a model is scored on files as it was trained on data.

The counts follow EleutherAI's lm-evaluation-harness (``bits_per_byte``, ``byte_perplexity``,
``word_perplexity`` of its loglikelihood-rolling tasks): bytes are the UTF-8 bytes of the
documents' text, words are ``len(re.split(r"\\s+", doc))`` per document.  For texts and files they
are counted on the text itself; for a prepared split, whose text is gone, on the documents decoded
from its ids (:func:`decode_documents`), which can be a few bytes shorter where the tokenizer
normalized the text (runs of blanks made one space, unknown characters).

:func:`causal_stream` prefixes the start token a causal scorer needs so that the first real token is
predicted too (lm-eval-harness prefixes BOS, or GPT-2's ``<|endoftext|>``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.errors import LmlabError

__all__ = [
    "EvalText",
    "TextStats",
    "causal_stream",
    "decode_documents",
    "documents_from_paths",
    "encode_documents",
    "load_eval_text",
    "text_stats",
]

_WORD_SPLIT = re.compile(r"\s+")


@dataclass(frozen=True)
class TextStats:
    """What a text holds: UTF-8 ``bytes``, ``words`` (lm-eval-harness's count) and ``documents``."""

    bytes: int
    words: int
    documents: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def text_stats(docs: Sequence[str]) -> TextStats:
    """UTF-8 bytes, words (``len(re.split(r"\\s+", doc))`` each, as lm-eval-harness counts them) and
    the number of ``docs``."""
    n_bytes = sum(len(d.encode("utf-8", "surrogatepass")) for d in docs)
    words = sum(len(_WORD_SPLIT.split(d)) for d in docs)
    return TextStats(bytes=n_bytes, words=words, documents=len(docs))


@dataclass(frozen=True)
class EvalText:
    """A text to evaluate on: ``ids`` (N,) int64, its documents framed as ``prepare`` frames them (no
    start token: causal scorers add it with :func:`causal_stream`); ``stats`` its bytes, words and
    documents; ``docs`` the documents' text."""

    ids: np.ndarray
    stats: TextStats
    docs: list[str]


def documents_from_paths(
    paths: str | os.PathLike | Sequence[str | os.PathLike], doc_sep: str = "blank"
) -> list[str]:
    """The documents of files and directories, read as ``lmlab prepare`` reads a corpus
    (:func:`lmlab.data.corpus.resolve_sources` and :func:`~lmlab.data.corpus.iter_documents`)."""
    from lmlab.data import corpus

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise LmlabError("no text files given")
    docs = [d for p in corpus.resolve_sources(list(paths)) for d in corpus.iter_documents(p, None, doc_sep)]
    if not docs:
        raise LmlabError(f"{', '.join(map(str, paths))} holds no text")
    return docs


@dataclass(frozen=True)
class _Framing:
    """How ``prepare`` frames a document with this tokenizer: ``raw`` its Rust tokenizer (encoding
    special-token text as text), ``eos`` the id appended after each document (or None), ``lead`` and
    ``trail`` the ids its post-processor puts around one."""

    raw: Any
    eos: int | None
    lead: tuple[int, ...]
    trail: tuple[int, ...]


def _framing(tokenizer: Any) -> _Framing:
    from lmlab.data.pipeline import document_eos
    from lmlab.data.tokenizer import backend_copy, framing, role_ids

    raw = backend_copy(tokenizer)
    raw.encode_special_tokens = True  # as prepare encodes: a literal "</s>" in a text is text
    eos = document_eos(raw, role_ids(tokenizer), type(tokenizer).__name__)
    lead_n, trail_n = framing(raw)
    full = raw.encode("a b", add_special_tokens=True).ids
    lead = tuple(full[:lead_n])
    trail = tuple(full[len(full) - trail_n :]) if trail_n else ()
    return _Framing(raw, eos, lead, trail)


def encode_documents(tokenizer: Any, docs: Sequence[str]) -> np.ndarray:
    """The ids of ``docs`` as one stream (N,) int64, each document framed exactly as ``lmlab
    prepare`` writes it into ``train.bin`` / ``val.bin``.  ``tokenizer``: a ``transformers`` fast
    tokenizer or a ``tokenizers.Tokenizer``."""
    from lmlab.data.pipeline import encode_documents as prepare_encode

    if not docs:
        return np.zeros(0, dtype=np.int64)
    f = _framing(tokenizer)
    return prepare_encode(f.raw, list(docs), f.eos, np.dtype(np.int64))


def _role(tokenizer: Any, role: str) -> int | None:
    from lmlab.data.tokenizer import role_ids

    return role_ids(tokenizer).get(role)


def causal_stream(tokenizer: Any, ids: Any) -> np.ndarray:
    """``ids`` (N,) as int64 with a start token first — the tokenizer's BOS, else its EOS (GPT-2's
    ``<|endoftext|>``, lmlab's ``</s>``) — unless it already starts with that token, so that a causal
    model predicts every real token (lm-eval-harness's rolling windows do the same)."""
    arr = _as_ids(ids)
    start = _role(tokenizer, "bos")
    if start is None:
        start = _role(tokenizer, "eos")
    if start is None:
        raise LmlabError(
            "the tokenizer has neither a beginning- nor an end-of-sequence token to start the text with"
        )
    if arr.size and arr[0] == start:
        return arr
    return np.concatenate([np.array([start], dtype=np.int64), arr])


def decode_documents(tokenizer: Any, ids: Any) -> list[str]:
    """The documents of a framed stream (N,) (a prepared split), split at the tokens that frame
    them and decoded with ``skip_special_tokens``; pieces that decode to nothing are dropped."""
    arr = _as_ids(ids)
    if arr.size == 0:
        return []
    f = _framing(tokenizer)
    end = f.eos if f.eos is not None else (f.trail[-1] if f.trail else None)
    if end is not None:
        cuts = np.flatnonzero(arr == end) + 1  # after each document's last token
    elif f.lead:
        cuts = np.flatnonzero(arr == f.lead[0])  # before each document's first token
    else:  # prepare refuses such a tokenizer: the stream is one text
        cuts = np.zeros(0, dtype=np.int64)
    pieces = [p.tolist() for p in np.split(arr, cuts) if p.size]
    decode = getattr(tokenizer, "batch_decode", None)
    if decode is not None:
        texts = decode(pieces, skip_special_tokens=True)
    else:  # a tokenizers.Tokenizer
        texts = tokenizer.decode_batch(pieces, skip_special_tokens=True)
    return [t for t in texts if t]


def _as_ids(ids: Any) -> np.ndarray:
    """Token ids of any array-like (list, numpy, torch) as a (N,) int64 array."""
    if hasattr(ids, "detach"):  # torch.Tensor
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise LmlabError(f"token ids must be one sequence (N,), got shape {tuple(arr.shape)}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise LmlabError(f"token ids must be integers, got {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _check_data_tokenizer(tokenizer: Any, data_dir: str | os.PathLike, meta: dict[str, Any]) -> None:
    """Refuse data prepared with another tokenizer than ``tokenizer`` (the same ids for the same
    tokens: :func:`lmlab.data.tokenizer.vocab_sha256`)."""
    from lmlab.data.tokenizer import load_tokenizer, vocab_sha256

    want = (meta.get("tokenizer") or {}).get("vocab_sha256")
    if want is None:  # a directory from an lmlab that did not record it
        want = vocab_sha256(load_tokenizer(data_dir))
    if vocab_sha256(tokenizer) != want:
        raise LmlabError(
            f"{data_dir} was prepared with another tokenizer than the model's; evaluate on data prepared "
            "with the model's tokenizer (lmlab prepare --tokenizer <model dir>), or give text files"
        )


def _texts(texts: str | Sequence[str]) -> list[str]:
    docs = [texts] if isinstance(texts, str) else list(texts)
    if not all(isinstance(d, str) for d in docs):
        raise LmlabError("texts must be a string or a list of strings")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise LmlabError("the text is empty")
    return docs


def load_eval_text(
    tokenizer: Any,
    *,
    texts: str | Sequence[str] | None = None,
    paths: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    data_dir: str | os.PathLike | None = None,
    split: str = "val",
    ids: Any = None,
    doc_sep: str = "blank",
) -> EvalText:
    """The text to evaluate on, from exactly one source: ``texts`` (a string is one document; blank
    ones are dropped), ``paths`` (files / directories, :func:`documents_from_paths` with ``doc_sep``),
    ``data_dir`` (the ``split`` of a prepared directory, whose tokenizer must be ``tokenizer``), or
    ``ids`` (a framed stream (N,), as given; bytes and words of its decoded documents)."""
    given = [
        k
        for k, v in (("texts", texts), ("paths", paths), ("data_dir", data_dir), ("ids", ids))
        if v is not None
    ]
    if len(given) != 1:
        raise LmlabError(
            "give exactly one of texts, paths, data_dir or ids"
            + (f" (got {', '.join(given)})" if given else "")
        )
    if texts is not None or paths is not None:
        docs = _texts(texts) if texts is not None else documents_from_paths(paths, doc_sep)
        return EvalText(encode_documents(tokenizer, docs), text_stats(docs), docs)
    if data_dir is not None:
        from lmlab.data import load_meta, load_tokens

        meta = load_meta(data_dir)
        _check_data_tokenizer(tokenizer, data_dir, meta)
        arr = np.asarray(load_tokens(data_dir, split), dtype=np.int64)
        if arr.size == 0:
            raise LmlabError(
                f"the {split} split of {Path(data_dir)} is empty"
                + (
                    " (prepared with --val-fraction 0)"
                    if split == "val" and not meta.get("val_fraction")
                    else ""
                )
            )
    else:
        arr = _as_ids(ids)
        if arr.size == 0:
            raise LmlabError("the text is empty (no token ids)")
    docs = decode_documents(tokenizer, arr)
    return EvalText(arr, text_stats(docs), docs)
