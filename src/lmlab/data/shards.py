"""Token shards: the flat files that ``lmlab prepare`` writes and training reads.

A prepared directory holds

    tokenizer.json   the tokenizer (loads with transformers.PreTrainedTokenizerFast)
    train.bin        flat little-endian token ids, documents separated by </s>
    val.bin          the same for the validation documents
    meta.json        dtype, vocab size, counts, special ids, sources, SHA-256 of each file (written last)

The ids are ``uint16`` when the vocabulary fits in 16 bits, else ``uint32`` (nanoGPT's format,
plus the metadata that makes it self-describing).  ``meta.json`` is written last and records
each file's token count, so a directory whose ``meta.json`` is missing or disagrees with the
files is reported as incomplete instead of being trained on.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.errors import LmlabError
from lmlab.io import read_json_object

META_NAME = "meta.json"
FORMAT = "lmlab-tokens-v1"
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits in 16 bits, else ``uint32`` (both little-endian)."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def load_meta(data_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``meta.json`` of a prepared directory; a one-line error if it is unusable."""
    d = Path(data_dir)
    if not d.is_dir():
        raise LmlabError(f"data directory {data_dir} does not exist (make one with `lmlab prepare`)")
    p = d / META_NAME
    if not p.is_file():
        raise LmlabError(
            f"{data_dir} has no {META_NAME}: not a prepared directory, or `prepare` did not finish"
        )
    meta = read_json_object(p)
    if meta.get("format") != FORMAT:
        raise LmlabError(f"{p} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def load_tokens(data_dir: str | os.PathLike, split: str = "train") -> np.ndarray:
    """The token ids of one split as a read-only memory map, shape ``(N,)``, uint16 or uint32.

    Checks the file against ``meta.json`` so a truncated or foreign file is never read.
    """
    if split not in SPLITS:
        raise LmlabError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    meta = load_meta(data_dir)
    dtype = np.dtype(meta["dtype"])
    p = Path(data_dir) / f"{split}.bin"
    n = int(meta[split]["tokens"])
    if not p.is_file():
        raise LmlabError(f"{p} is missing")
    size = p.stat().st_size
    if size != n * dtype.itemsize:
        raise LmlabError(
            f"{p} holds {size} bytes but meta.json says {n} {dtype.name} tokens ({n * dtype.itemsize} bytes): "
            "the directory is incomplete or corrupt; run `lmlab prepare` again"
        )
    if n == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(p, dtype=dtype, mode="r", shape=(n,))


class ShardWriter:
    """Appends token arrays to ``<path>`` through a temporary file; :meth:`commit` renames it.

    Nothing is visible at ``path`` until :meth:`commit`; :meth:`abort` (or an exception inside a
    ``with`` block) deletes the temporary file, unless ``keep_on_error``: ``prepare`` writes its
    shards inside a temporary directory (:func:`lmlab.io.atomic_dir`) that is removed whole, and
    that first measures what was written for its full-disk error.  :attr:`sha256` is the hash of
    what was written.
    """

    def __init__(self, path: str | os.PathLike, dtype: np.dtype, keep_on_error: bool = False):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.keep_on_error = keep_on_error
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self._f = open(self.tmp, "wb")  # noqa: SIM115 - closed in commit/abort
        self._hash = hashlib.sha256()
        self.tokens = 0

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def write(self, ids: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, dtype=self.dtype)
        self._f.write(ids.data)
        self._hash.update(ids.data)
        self.tokens += ids.size

    def commit(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        # Closing flushes the buffer, which fails again on a full disk; the first error is the one to report.
        with contextlib.suppress(OSError):
            self._f.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            return
        if self.keep_on_error:
            with contextlib.suppress(OSError):
                self._f.close()
        else:
            self.abort()
