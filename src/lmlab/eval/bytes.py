"""Bytes of text behind token ids, and the compression floor a language model must beat.

Bits per byte is the tokenizer-independent form of a language model's loss (lm-evaluation-harness's
``bits_per_byte`` = −Σ log p / Σ UTF-8 bytes / ln 2, the Pile's headline, Gao et al. 2020): it needs the
bytes of the text that was scored.  When only token ids are at hand (a prepared split, a training
run's validation rows), :func:`token_byte_lengths` gives the UTF-8 bytes each id adds to the decoded
text and :func:`bytes_of` sums them.

How an id's bytes are found: every id ``x`` is decoded between two fixed ordinary tokens,
``[a, x, b]``, and the length of ``[a, b]``'s decoding is subtracted, so a Metaspace "▁" counts as
the space it becomes inside text, a WordPiece continuation ``##s`` as ``s`` and a word piece as its
word plus the space before it.  Byte-level BPE pieces (GPT-2's; one character per byte, possibly half
of a UTF-8 character) count one byte per character, and byte-fallback pieces ``<0xNN>`` one byte,
since alone they do not decode to valid UTF-8.  Special tokens (``</s>``, ``<pad>``, sentinels,
``[CLS]``) and ``<unk>`` count 0.

What the table counts for a document, against ``len(doc.encode())``:

- the tokenizer's normalized text, not the raw one: lmlab's Unigram applies NFKC and collapses runs of
  spaces and tabs (``tokenizer.normalizer.normalize_str(doc)`` is what is counted), WordPiece lowercases
  and strips accents, byte-level BPE applies NFC;
- **plus one byte per document** for a Metaspace tokenizer (lmlab's Unigram, T5's, Llama's
  SentencePiece): it prepends "▁" to the document's first word, and the table counts every "▁" as a
  space, while the decoder drops that one;
- for WordPiece, the spaces its pre-tokenizer puts around punctuation that its decoder's clean-up
  does not remove (``(`` and ``"``, e.g.): a WordPiece tokenizer does not keep the text's spacing, so
  its byte counts are approximate (all-MiniLM-L6-v2's: 1.7% over on 120 KB of Moby-Dick, single
  short documents up to ~20% either way);
- byte-level BPE: exactly the bytes (0 difference).

:func:`compression_bits_per_byte` is the floor: general-purpose compressors' bits per byte on the same
text.  Through arithmetic coding a language model is a compressor whose code length is its bits per
byte (Delétang et al. 2024, "Language Modeling Is Compression", §2), so the two compare directly, as
that paper's compression-rate table compares models with gzip and LZMA2.  A model above gzip's figure
has learned less about the text than gzip knows.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import re
import weakref
from typing import Any

import numpy as np

from lmlab.errors import LmlabError

__all__ = ["bytes_of", "compression_bits_per_byte", "token_byte_lengths"]

_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# Tables per tokenizer object: (number of ids, table).  The id count catches tokens added later.
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _backend(tokenizer: Any):
    """The Rust ``tokenizers.Tokenizer`` of ``tokenizer`` (a transformers fast tokenizer, or one itself)."""
    if hasattr(tokenizer, "get_vocab_size") and hasattr(tokenizer, "decode_batch"):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LmlabError(
            f"bytes per token need a fast (Rust) tokenizer; {type(tokenizer).__name__} has none "
            "(load it with use_fast=True, or lmlab.data.load_tokenizer)"
        )
    return backend


def _has_decoder(spec: dict | None, name: str) -> bool:
    if not spec:
        return False
    if spec.get("type") == name:
        return True
    return any(_has_decoder(d, name) for d in spec.get("decoders") or [])


def _special_ids(tokenizer: Any, backend) -> list[int]:
    ids = [i for i, t in backend.get_added_tokens_decoder().items() if t.special]
    ids += [int(i) for i in getattr(tokenizer, "all_special_ids", None) or []]
    return ids


def _anchor(backend, vocab: dict[str, int], special: set[int]) -> int:
    """An ordinary id that decodes to a plain letter, to decode every id between two of them."""
    for text in ("a", "e", "t", "x"):
        ids = [i for i in backend.encode(text, add_special_tokens=False).ids if i not in special]
        if ids:
            return ids[-1]
    ordinary = [i for i in vocab.values() if i not in special]
    if not ordinary:
        raise LmlabError("the tokenizer has no ordinary tokens (all of its ids are special)")
    return min(ordinary)


def _compute(tokenizer: Any) -> np.ndarray:
    backend = _backend(tokenizer)
    vocab = backend.get_vocab(with_added_tokens=True)
    V = max(vocab.values(), default=-1) + 1
    special = {i for i in _special_ids(tokenizer, backend) if 0 <= i < V}
    tokens = [""] * V
    for t, i in vocab.items():
        tokens[i] = t
    a = _anchor(backend, vocab, special)
    base = len(backend.decode([a, a], skip_special_tokens=True).encode("utf-8"))
    texts = backend.decode_batch([[a, i, a] for i in range(V)], skip_special_tokens=True)
    table = (
        np.fromiter((len(s.encode("utf-8", "surrogatepass")) for s in texts), dtype=np.int64, count=V) - base
    )

    spec = json.loads(backend.to_str())
    if _has_decoder(spec.get("decoder"), "ByteLevel"):
        # One character per byte (GPT-2's alphabet); a piece may be half a UTF-8 character, which
        # decodes to U+FFFD alone but to its true bytes inside text.
        from tokenizers import pre_tokenizers

        alphabet = set(pre_tokenizers.ByteLevel.alphabet())
        for i, t in enumerate(tokens):
            if t and all(c in alphabet for c in t):
                table[i] = len(t)
    if (spec.get("model") or {}).get("byte_fallback"):
        for i, t in enumerate(tokens):
            if _BYTE_FALLBACK.fullmatch(t):
                table[i] = 1
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        unk = vocab.get((spec.get("model") or {}).get("unk_token") or "")
    if unk is not None and 0 <= unk < V:
        special.add(int(unk))
    table[sorted(special)] = 0
    table = np.maximum(table, 0)  # a decoder's clean-up can swallow a space ("a ' a" → "a'a")
    table.setflags(write=False)
    return table


def token_byte_lengths(tokenizer: Any) -> np.ndarray:
    """``(V,)`` int64, read-only: the UTF-8 bytes each id adds to decoded text (0 for special tokens).

    ``tokenizer``: a transformers fast tokenizer or a ``tokenizers.Tokenizer``; ``V`` is its number of
    ids, added tokens included (a model's embedding may have more rows: such ids are not text).  What
    the sum over a document's ids means against the document's bytes is in the module docstring.
    Computed in one batched decode (about a second for 50k ids) and cached per tokenizer object.
    """
    backend = _backend(tokenizer)
    n = backend.get_vocab_size(with_added_tokens=True)
    try:
        hit = _CACHE.get(tokenizer)
    except TypeError:  # not weak-referenceable: no cache
        return _compute(tokenizer)
    if hit is not None and hit[0] == n:
        return hit[1]
    table = _compute(tokenizer)
    _CACHE[tokenizer] = (n, table)
    return table


def bytes_of(ids: Any, table: np.ndarray) -> int:
    """The UTF-8 bytes of text behind ``ids`` (any shape of int ids: list, numpy array, tensor), by ``table``
    (:func:`token_byte_lengths`).  An id outside the table raises an :class:`LmlabError`."""
    if hasattr(ids, "detach"):
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.size == 0:
        return 0
    if not np.issubdtype(arr.dtype, np.integer):
        raise LmlabError(f"token ids must be integers, got {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= len(table):
        bad = lo if lo < 0 else hi
        raise LmlabError(f"token id {bad} is outside the tokenizer's {len(table)} ids")
    return int(table[arr].sum())


def compression_bits_per_byte(data: bytes) -> dict[str, float]:
    """Bits per byte of ``data`` under gzip (level 9, mtime 0), bz2 (level 9) and xz (LZMA2, preset
    9 | extreme): ``8 · len(compressed) / len(data)``, containers' headers included (they matter only for
    a few kB).  Random bytes give ≥ 8; English prose ~2–3 (gzip) and less for xz."""
    if isinstance(data, str):
        raise LmlabError(
            "compression_bits_per_byte takes bytes; encode the text first (text.encode('utf-8'))"
        )
    data = bytes(data)
    if not data:
        raise LmlabError("no bytes to compress: bits per byte of empty data is undefined")
    sizes = {
        "gzip": len(gzip.compress(data, compresslevel=9, mtime=0)),
        "bz2": len(bz2.compress(data, compresslevel=9)),
        "xz": len(lzma.compress(data, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME)),
    }
    return {k: 8.0 * v / len(data) for k, v in sizes.items()}
