"""``lmlab prepare``: corpus → tokenizer → token shards, streamed with bounded memory.

Pipeline (two passes over the corpus when a tokenizer is trained, one otherwise):

1. Documents are streamed from the sources (:mod:`lmlab.data.corpus`).  Each goes to the
   validation split when a 64-bit BLAKE2b hash of its text falls below ``val_fraction``: the
   split is a property of the document alone, so adding documents never moves the others.
2. The tokenizer (:mod:`lmlab.data.tokenizer`) is trained on the training documents, or on a
   deterministic hash-sampled subset of them of about ``tokenizer_train_bytes`` when the corpus
   is larger (SentencePiece trains on a sample of C4 the same way).
3. Documents are tokenized in batches (the Rust tokenizer runs them in parallel), an ``</s>``
   is appended to each, and the ids are appended to ``train.bin`` / ``val.bin``.

Peak memory is the tokenizer plus one batch (about :data:`BATCH_CHARS` characters of text and its
ids) plus, while a tokenizer is trained, the trainer's table of distinct pre-tokens, which grows
with the vocabulary of the corpus rather than its size, and is capped by the sampling budget.

Outputs go through temporary files renamed into place, and ``meta.json`` — the marker that a
directory is complete — is removed first and written last.
"""

from __future__ import annotations

import hashlib
import os
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmlab import __version__
from lmlab.data import corpus as corpus_
from lmlab.data import shards
from lmlab.data import tokenizer as tokenizer_
from lmlab.errors import LmlabError
from lmlab.io import atomic_write_json

BATCH_CHARS = 1 << 22  # text per tokenization batch
BATCH_DOCS = 4096
DEFAULT_VAL_FRACTION = 0.02
DEFAULT_TOKENIZER_TRAIN_BYTES = 256 << 20


def _unit_hash(text: str, salt: bytes) -> float:
    """A deterministic number in [0, 1) for a document: its split and sampling draw."""
    h = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, key=salt).digest()
    return int.from_bytes(h, "little") / 2.0**64


_SPLIT_SALT = b"lmlab-split"
_SAMPLE_SALT = b"lmlab-tokenizer-sample"


def is_validation(text: str, val_fraction: float) -> bool:
    return val_fraction > 0 and _unit_hash(text, _SPLIT_SALT) < val_fraction


@dataclass
class PrepareResult:
    out_dir: Path
    meta: dict[str, Any]
    seconds: float
    peak_rss_bytes: int

    def summary(self) -> str:
        m = self.meta
        lines = [
            f"prepared {self.out_dir}",
            f"  tokenizer   {m['tokenizer']['type']}, vocabulary {m['vocab_size']:,} ({m['dtype']} ids)"
            + ("" if m["tokenizer"]["trained"] else f", reused from {m['tokenizer']['source']}"),
            f"  train       {m['train']['tokens']:,} tokens in {m['train']['documents']:,} documents",
            f"  val         {m['val']['tokens']:,} tokens in {m['val']['documents']:,} documents",
            f"  sources     {len(m['sources'])} file(s), {sum(s['bytes'] for s in m['sources']):,} bytes"
            + (f", {m['undecodable_bytes']:,} undecodable bytes replaced" if m["undecodable_bytes"] else ""),
            f"  speed       {m['train']['tokens'] + m['val']['tokens']:,} tokens in {self.seconds:.1f} s "
            f"({(m['train']['tokens'] + m['val']['tokens']) / max(self.seconds, 1e-9) / 1e6:.2f} M tokens/s), "
            f"peak memory {self.peak_rss_bytes / 2**20:.0f} MiB",
        ]
        if m["val"]["documents"] == 0 and m["val_fraction"] > 0:
            lines.append("  note        the validation split is empty: the corpus has too few documents")
        return "\n".join(lines)


def _peak_rss() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def _documents(paths: list[Path], stats: list[corpus_.SourceStats], doc_sep: str) -> Iterator[str]:
    for p, st in zip(paths, stats, strict=True):
        yield from corpus_.iter_documents(p, st, doc_sep)


def _batches(docs: Iterator[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for d in docs:
        batch.append(d)
        size += len(d)
        if size >= BATCH_CHARS or len(batch) >= BATCH_DOCS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def encode_documents(tok, docs: list[str], eos_id: int, dtype: np.dtype) -> np.ndarray:
    """Token ids of ``docs``, each followed by ``eos_id``, as one flat array ``(N,)``."""
    eos = np.array([eos_id], dtype=dtype)
    encs = tok.encode_batch_fast(docs, add_special_tokens=False)
    parts = [a for e in encs for a in (np.asarray(e.ids, dtype=dtype), eos)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def prepare(
    sources: list[str | os.PathLike] | None,
    out_dir: str | os.PathLike,
    vocab_size: int = tokenizer_.DEFAULT_VOCAB_SIZE,
    tokenizer: str | os.PathLike | None = None,
    tokenizer_type: str = "unigram",
    val_fraction: float = DEFAULT_VAL_FRACTION,
    doc_sep: str = "blank",
    tokenizer_train_bytes: int = DEFAULT_TOKENIZER_TRAIN_BYTES,
    progress: bool | None = None,
) -> PrepareResult:
    """Turn ``sources`` (files / directories; ``None`` = the embedded default corpus) into a
    prepared directory ``out_dir``.  See the module docstring for the pipeline and guarantees.

    ``progress=None`` shows progress bars only on a terminal.
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    if not 0 <= val_fraction < 1:
        raise LmlabError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if tokenizer is None:
        # Fail on bad settings before reading a byte of the corpus.
        tokenizer_.check_settings(vocab_size, tokenizer_type)
    default = sources is None
    paths = [corpus_.default_corpus_path()] if default else corpus_.resolve_sources(list(sources))
    if not paths:
        raise LmlabError("no corpus given")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LmlabError(f"--out {out_dir} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    # From here until meta.json is written again the directory is marked incomplete.
    (out / shards.META_NAME).unlink(missing_ok=True)
    disable = None if progress is None else not progress

    # Pass 1: the tokenizer.
    if tokenizer is not None:
        tok = tokenizer_.read_tokenizer(tokenizer)
        tok_source = str(tokenizer)
    else:
        total_bytes = sum(p.stat().st_size * (4 if p.name.endswith(".gz") else 1) for p in paths)
        rate = min(1.0, tokenizer_train_bytes / max(total_bytes, 1))
        stats1 = [corpus_.SourceStats(str(p)) for p in paths]
        bar = tqdm(desc="training tokenizer", unit="B", unit_scale=True, disable=disable, total=total_bytes)

        def training_docs() -> Iterator[str]:
            read_before = 0  # bytes of the sources already finished
            for p, st in zip(paths, stats1, strict=True):
                for d in corpus_.iter_documents(p, st, doc_sep):
                    bar.update(read_before + st.bytes - bar.n)
                    if not is_validation(d, val_fraction) and (
                        rate >= 1.0 or _unit_hash(d, _SAMPLE_SALT) < rate
                    ):
                        yield d
                read_before += st.bytes

        tok = tokenizer_.train_tokenizer(training_docs(), vocab_size, tokenizer_type)
        bar.close()
        if sum(s.documents for s in stats1) == 0:
            raise LmlabError(f"the corpus is empty: no non-blank text in {', '.join(map(str, paths))}")
        tok_source = None
        tokenizer_.save_tokenizer(tok, out / "tokenizer.json")

    # Text is text: a literal "</s>" or "<extra_id_0>" in a document must not become a special id.
    tok.encode_special_tokens = True
    ids = tokenizer_.special_ids(tok)
    v = tok.get_vocab_size(with_added_tokens=True)
    dtype = shards.token_dtype(v)

    # Pass 2: the shards.
    stats = [corpus_.SourceStats(str(p)) for p in paths]
    counts = {"train": 0, "val": 0}
    with (
        shards.ShardWriter(out / "train.bin", dtype) as train_w,
        shards.ShardWriter(out / "val.bin", dtype) as val_w,
        tqdm(desc="tokenizing", unit="tok", unit_scale=True, disable=disable) as bar,
    ):
        for batch in _batches(_documents(paths, stats, doc_sep)):
            is_val = [is_validation(d, val_fraction) for d in batch]
            for split, w in (("train", train_w), ("val", val_w)):
                docs = [d for d, x in zip(batch, is_val, strict=True) if x == (split == "val")]
                if docs:
                    arr = encode_documents(tok, docs, ids["eos"], dtype)
                    w.write(arr)
                    counts[split] += len(docs)
                    bar.update(arr.size)
        if counts["train"] + counts["val"] == 0:
            raise LmlabError(f"the corpus is empty: no non-blank text in {', '.join(map(str, paths))}")
        if tokenizer is not None:
            tokenizer_.save_tokenizer(tok, out / "tokenizer.json")
        train_w.commit()
        val_w.commit()

    meta = {
        "format": shards.FORMAT,
        "lmlab_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "dtype": dtype.name,
        "vocab_size": v,
        "special_ids": ids,
        "tokenizer": {
            "type": _tokenizer_type(tok),
            "trained": tokenizer is None,
            "source": tok_source,
            "requested_vocab_size": vocab_size if tokenizer is None else None,
        },
        "train": {"tokens": train_w.tokens, "documents": counts["train"]},
        "val": {"tokens": val_w.tokens, "documents": counts["val"]},
        "val_fraction": val_fraction,
        "split": "blake2b-64 of the document text < val_fraction",
        "doc_sep": doc_sep,
        "default_corpus": default,
        "sources": [s.as_dict() for s in stats],
        "undecodable_bytes": sum(s.undecodable_bytes for s in stats),
    }
    atomic_write_json(out / shards.META_NAME, meta)
    return PrepareResult(out, meta, time.perf_counter() - t0, _peak_rss())


def _tokenizer_type(tok) -> str:
    import json

    return json.loads(tok.to_str())["model"]["type"].lower()


def default_data_dir() -> Path:
    """Where the embedded default corpus is prepared: ``<cache>/data/default``."""
    return corpus_.cache_dir() / "data" / "default"


def ensure_default_data(progress: bool | None = None) -> Path:
    """The prepared default-corpus directory, preparing it first if it is missing or incomplete."""
    d = default_data_dir()
    try:
        meta = shards.load_meta(d)
        shards.load_tokens(d, "train")
        shards.load_tokens(d, "val")
        v = sys.version_info
        if Path(meta["sources"][0]["path"]).name == f"default-corpus-py{v.major}.{v.minor}.{v.micro}.jsonl":
            return d
    except (LmlabError, KeyError, IndexError):
        pass
    prepare(None, d, progress=progress)
    return d
