"""``lmlab prepare``: corpus → tokenizer → token shards, streamed with bounded memory.

Pipeline (two passes over the corpus when a tokenizer is trained, one otherwise):

1. Documents are streamed from the sources (:mod:`lmlab.data.corpus`).  Each goes to the
   validation split when a 64-bit BLAKE2b hash of its text falls below ``val_fraction``: the
   split is a property of the document alone, so adding documents never moves the others.
2. The tokenizer (:mod:`lmlab.data.tokenizer`) is trained on the training documents, or on a
   deterministic hash-sampled subset of them of about ``tokenizer_train_bytes`` when the corpus
   is larger (SentencePiece trains on a sample of C4 the same way).
3. Documents are tokenized in batches (the Rust tokenizer runs them in parallel), each framed by
   the tokenizer's own special tokens (its post-processor, ``add_special_tokens=True``), and the
   ids are appended to ``train.bin`` / ``val.bin``.

Any Hugging Face tokenizer can be reused (``--tokenizer <model or tokenizer dir>``,
:func:`lmlab.data.tokenizer.load_tokenizer`).  Documents are framed and packed the way
``run_mlm.py`` / ``run_clm.py`` do (``group_texts``: each text tokenized with its special tokens,
all concatenated, training rows cut from the stream wherever they fall): lmlab's and T5's
tokenizers end a document with ``</s>``, BERT's frames it as ``[CLS] … [SEP]``; a tokenizer whose
framing ends in nothing (GPT-2's) gets its end-of-sequence token appended (``<|endoftext|>``, the
separator GPT-2 was trained with), and one with neither is refused.  Its own files are saved
beside the shards (``save_pretrained``) and ``meta.json`` records which tokenizer it was
(``tokenizer.vocab_sha256``, :func:`lmlab.data.tokenizer.vocab_sha256`), which ``pretrain --init``
checks against the model's.

Peak memory is the tokenizer plus one batch (about :data:`BATCH_CHARS` characters of text and its
ids) plus, while a tokenizer is trained, the trainer's table of distinct pre-tokens, which grows
with the vocabulary of the corpus rather than its size, and is capped by the sampling budget.

Guarantees.  The whole output — ``tokenizer.json``, ``train.bin``, ``val.bin`` and ``meta.json``
(written last) — is built in a temporary directory beside ``--out`` and swapped in only once it is
complete (:func:`lmlab.io.atomic_dir`): an empty corpus, a typo, a bad tokenizer, Ctrl-C, SIGKILL
or a full disk leave an existing prepared directory exactly as it was, and a full disk is a
one-line error.  ``--out`` must be new or empty; an existing prepared directory is replaced only
with ``--overwrite``, and nothing else (a training run, a model, a directory of the user's files,
the corpus itself) ever is (:func:`lmlab.io.check_output_dir`).  What a killed run left beside
its output is removed by the next one (:func:`lmlab.io.remove_stale_temps`).

The same corpus and settings give byte-identical ``tokenizer.json``, ``train.bin`` and
``val.bin`` on every run and any number of threads (see :func:`lmlab.data.tokenizer.train_tokenizer`);
``meta.json`` differs only in its ``created`` time, and records each file's SHA-256.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
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
from lmlab.io import (
    DirLock,
    atomic_dir,
    check_output_dir,
    check_writable,
    is_lmlab_temp,
    recover_interrupted_swap,
    remove_stale_temps,
)

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
        if m["val_fraction"] == 0:
            lines.append(
                "  note        no validation split (--val-fraction 0): every document is for training"
            )
        elif m["val"]["documents"] == 0:
            lines.append("  note        the validation split is empty: the corpus has too few documents")
        unk = m["train"].get("unk_tokens", 0) + m["val"].get("unk_tokens", 0)
        text_tokens = (
            m["train"]["tokens"] + m["val"]["tokens"] - m["train"]["documents"] - m["val"]["documents"]
        )
        if unk > 0.01 * text_tokens:
            lines.append(
                f"  note        {unk / max(text_tokens, 1):.0%} of the tokens are <unk>: characters the "
                "tokenizer never saw (a larger --tokenizer-train-mb helps)"
            )
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


def encode_documents(tok, docs: list[str], eos_id: int | None, dtype: np.dtype) -> np.ndarray:
    """Token ids of ``docs``, each with the tokenizer's own special tokens and then ``eos_id`` (unless
    ``None``: a tokenizer whose framing ends a document already), as one flat array ``(N,)``."""
    encs = tok.encode_batch_fast(docs, add_special_tokens=True)
    if eos_id is None:
        parts = [np.asarray(e.ids, dtype=dtype) for e in encs]
    else:
        eos = np.array([eos_id], dtype=dtype)
        parts = [a for e in encs for a in (np.asarray(e.ids, dtype=dtype), eos)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


@dataclass
class ReusedTokenizer:
    """A ``--tokenizer``: lmlab's own (``hf`` None, ``tok`` exactly as read) or any Hugging Face one
    (``hf`` the ``transformers`` tokenizer, ``tok`` its Rust backend without truncation or padding)."""

    tok: Any
    hf: Any = None


def read_reused_tokenizer(path: str | os.PathLike) -> ReusedTokenizer:
    """The tokenizer of ``--tokenizer path``: one-line errors for what cannot be loaded."""
    hf = tokenizer_.load_tokenizer(path)
    raw = tokenizer_.backend_copy(hf)
    if tokenizer_.is_lmlab_layout(raw):
        return ReusedTokenizer(tokenizer_.read_tokenizer(path))
    return ReusedTokenizer(raw, hf)


def document_eos(tok, ids: dict[str, Any], source) -> int | None:
    """The id ``prepare`` appends to each document: ``None`` when the tokenizer's framing ends it
    (``</s>``, ``[SEP]``) or starts it (a BOS), else its EOS; refused without either."""
    lead, trail = tokenizer_.framing(tok)
    if trail or (lead and ids.get("eos") is None):
        return None
    if ids.get("eos") is None:
        raise LmlabError(
            f"the tokenizer {source} has no end-of-sequence token and adds no special tokens around a "
            "text: prepare could not tell where one document ends and the next begins"
        )
    return int(ids["eos"])


def _check_settings(val_fraction: float, tokenizer_train_bytes: int, doc_sep: str) -> None:
    if not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise LmlabError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if not isinstance(tokenizer_train_bytes, int) or tokenizer_train_bytes <= 0:
        raise LmlabError(f"--tokenizer-train-mb must be a positive size, got {tokenizer_train_bytes} bytes")
    if doc_sep not in corpus_.DOC_SEPARATORS:
        raise LmlabError(f"--doc-sep must be one of {', '.join(corpus_.DOC_SEPARATORS)}, got {doc_sep!r}")


def _check_swappable(out: Path) -> None:
    """The output is swapped in by renaming directories: never the one the user stands in, and
    never a symbolic link (the link, not what it points to, would be replaced)."""
    here = Path.cwd().resolve()
    if out.resolve() == here or out.resolve() in here.parents:
        raise LmlabError(f"--out {out} is the current directory or holds it; name a directory to create")
    if out.is_symlink():
        raise LmlabError(f"--out {out} is a symbolic link; give the directory it points to, {out.resolve()}")


def _check_no_foreign_files(out: Path) -> None:
    """``--overwrite`` replaces what ``prepare`` wrote, never a file the user put beside it."""
    if not out.is_dir():
        return
    foreign = sorted(
        p.name for p in out.iterdir() if p.name not in _PREPARED_NAMES and not is_lmlab_temp(p.name)
    )
    if foreign:
        raise LmlabError(
            f"--out {out} also holds {foreign[0]!r}"
            + (f" and {len(foreign) - 1} more file(s)" if len(foreign) > 1 else "")
            + " that prepare did not write; move them away, or choose another directory"
        )


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _count_alphabet(docs: Iterator[str]) -> int:
    """How many distinct characters the Unigram trainer must keep: NFKC, runs of blanks made one
    space, and every space shown as the metaspace (approximately the trainer's own count)."""
    import re
    import unicodedata

    chars: set[str] = set()
    for d in docs:
        chars.update(re.sub(r"[ \t]+", " ", unicodedata.normalize("NFKC", d)))
    chars.discard(" ")
    return len(chars) + 1  # "▁"


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
    overwrite: bool = False,
    cache: str | os.PathLike | None = None,
) -> PrepareResult:
    """Turn ``sources`` (files / directories; ``None`` = the embedded default corpus) into a
    prepared directory ``out_dir``.  See the module docstring for the pipeline and guarantees.

    ``out_dir`` must be new or empty, or (with ``overwrite``, the CLI's ``--overwrite``) a
    prepared directory, which is replaced only once the new one is complete.
    ``progress=None`` shows progress bars on a terminal and a plain line every 30 s elsewhere.
    ``cache``: where the default corpus is extracted (:func:`lmlab.data.corpus.cache_dir`; the CLI passes ``$LMLAB_CACHE``).
    """
    t0 = time.perf_counter()
    _check_settings(val_fraction, tokenizer_train_bytes, doc_sep)
    if tokenizer is None:
        # Fail on bad settings before reading a byte of the corpus.
        tokenizer_.check_settings(vocab_size, tokenizer_type)
    default = sources is None
    if not default and not sources:
        raise LmlabError("no corpus given")
    paths = None if default else corpus_.resolve_sources(list(sources))
    out = Path(out_dir)
    _check_swappable(out)
    check_writable(out)
    made = [a for a in Path(os.path.abspath(out)).parents if not a.exists()]  # nearest first
    try:
        # One prepare at a time per --out, from the checks to the swap.
        with DirLock(out, "prepared directory", beside=True):
            return _prepare_locked(
                out, sources, paths, default, vocab_size, tokenizer, tokenizer_type, val_fraction,
                doc_sep, tokenizer_train_bytes, progress, overwrite, t0, cache,
            )  # fmt: skip
    except BaseException:
        for a in made:  # the parents made for an output that never came
            with contextlib.suppress(OSError):
                a.rmdir()
        raise


def _prepare_locked(
    out: Path,
    sources,
    paths: list[Path] | None,
    default: bool,
    vocab_size: int,
    tokenizer,
    tokenizer_type: str,
    val_fraction: float,
    doc_sep: str,
    tokenizer_train_bytes: int,
    progress: bool | None,
    overwrite: bool,
    t0: float,
    cache: str | os.PathLike | None,
) -> PrepareResult:
    recover_interrupted_swap(out)  # a swap killed between its two renames: put the old one back
    check_output_dir(out, "prepared", overwrite=overwrite, inputs=[] if default else list(sources))
    _check_no_foreign_files(out)
    if paths is None:
        paths = [corpus_.default_corpus_path(cache)]
    tok = read_reused_tokenizer(tokenizer) if tokenizer is not None else None
    remove_stale_temps(out.parent)  # what killed runs of prepare left beside their outputs
    with atomic_dir(out) as tmp:
        meta = _prepare_into(
            tmp, paths, tok, tokenizer, vocab_size, tokenizer_type, val_fraction, doc_sep,
            tokenizer_train_bytes, progress, default,
        )  # fmt: skip
    return PrepareResult(out, meta, time.perf_counter() - t0, _peak_rss())


def _prepare_into(
    tmp: Path,
    paths: list[Path],
    reused: ReusedTokenizer | None,
    tok_source: str | os.PathLike | None,
    vocab_size: int,
    tokenizer_type: str,
    val_fraction: float,
    doc_sep: str,
    tokenizer_train_bytes: int,
    progress: bool | None,
    default: bool,
) -> dict[str, Any]:
    """Both passes, writing everything into the temporary directory ``tmp``; returns meta.json."""
    from lmlab.progress import progress_bar as tqdm

    disable = None if progress is None else not progress
    trained = reused is None
    tok = None if reused is None else reused.tok
    sample = {"documents": 0, "chars": 0}

    # Pass 1: the tokenizer.
    if trained:
        total_bytes = sum(p.stat().st_size * (4 if p.name.endswith(".gz") else 1) for p in paths)
        rate = min(1.0, tokenizer_train_bytes / max(total_bytes, 1))

        def training_docs(stats: list[corpus_.SourceStats], bar=None) -> Iterator[str]:
            read_before = 0  # bytes of the sources already finished
            for p, st in zip(paths, stats, strict=True):
                for d in corpus_.iter_documents(p, st, doc_sep):
                    if bar is not None:
                        bar.update(read_before + st.bytes - bar.n)
                    if not is_validation(d, val_fraction) and (
                        rate >= 1.0 or _unit_hash(d, _SAMPLE_SALT) < rate
                    ):
                        sample["documents"] += 1
                        sample["chars"] += len(d)
                        yield d
                read_before += st.bytes

        stats1 = [corpus_.SourceStats(str(p)) for p in paths]
        bar = tqdm(desc="training tokenizer", unit="B", unit_scale=True, disable=disable, total=total_bytes)
        try:
            tok = tokenizer_.train_tokenizer(training_docs(stats1, bar), vocab_size, tokenizer_type)
        except tokenizer_.AlphabetTooLarge:
            bar.close()
            # Counted only now, in a second read: counting on every run would slow the usual case.
            recount = [corpus_.SourceStats(str(p)) for p in paths]
            n = _count_alphabet(training_docs(recount))
            bad = sum(s.undecodable_bytes for s in recount)
            raise LmlabError(
                f"--vocab-size {vocab_size} is too small for this corpus: its text has about {n:,} distinct "
                f"characters and a Unigram vocabulary must hold every one of them plus "
                f"{len(tokenizer_.BASE_SPECIALS) + tokenizer_.NUM_SENTINELS} special tokens; use "
                f"--vocab-size {n + len(tokenizer_.BASE_SPECIALS) + tokenizer_.NUM_SENTINELS} or more, or "
                "--tokenizer-type bpe (bytes, any alphabet)"
                + (f" ({bad:,} bytes of it are not UTF-8: is it text?)" if bad else "")
            ) from None
        bar.close()
        n_docs = sum(s.documents for s in stats1)
        if n_docs == 0:
            raise LmlabError(f"the corpus is empty: no non-blank text in {', '.join(map(str, paths))}")
        if sample["documents"] == 0:
            raise LmlabError(
                f"--tokenizer-train-mb {tokenizer_train_bytes / 2**20:g} samples none of the corpus's "
                f"{n_docs:,} training documents: there is nothing to train the tokenizer on; raise it"
            )
    hf = None if reused is None else reused.hf
    tokenizer_json, ids, v = _write_tokenizer(tmp, tok, hf)
    eos_id = document_eos(tok, ids, tok_source)
    per_doc = sum(tokenizer_.framing(tok)) + (eos_id is not None)  # special ids around each document

    # Text is text: a literal "</s>" or "<extra_id_0>" in a document must not become a special id.
    tok.encode_special_tokens = True
    dtype = shards.token_dtype(v)

    # Pass 2: the shards.
    stats = [corpus_.SourceStats(str(p)) for p in paths]
    counts = {"train": 0, "val": 0}
    unk = {"train": 0, "val": 0}
    with (
        shards.ShardWriter(tmp / "train.bin", dtype, keep_on_error=True) as train_w,
        shards.ShardWriter(tmp / "val.bin", dtype, keep_on_error=True) as val_w,
        tqdm(desc="tokenizing", unit="tok", unit_scale=True, disable=disable) as bar,
    ):
        for batch in _batches(_documents(paths, stats, doc_sep)):
            is_val = [is_validation(d, val_fraction) for d in batch]
            for split, w in (("train", train_w), ("val", val_w)):
                docs = [d for d, x in zip(batch, is_val, strict=True) if x == (split == "val")]
                if docs:
                    arr = encode_documents(tok, docs, eos_id, dtype)
                    w.write(arr)
                    counts[split] += len(docs)
                    if ids.get("unk") is not None:
                        unk[split] += int(np.count_nonzero(arr == ids["unk"]))
                    bar.update(arr.size)
        if counts["train"] + counts["val"] == 0:
            raise LmlabError(f"the corpus is empty: no non-blank text in {', '.join(map(str, paths))}")
        _check_unknown_share(unk, train_w.tokens + val_w.tokens - per_doc * sum(counts.values()), tok_source,
                             sample, tokenizer_train_bytes)  # fmt: skip
        train_w.commit()
        val_w.commit()

    meta = {
        "format": shards.FORMAT,
        "lmlab_version": __version__,
        # The only field that differs between two runs on the same corpus and settings.
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "dtype": dtype.name,
        "vocab_size": v,
        "special_ids": ids,
        "tokenizer": {
            "type": _tokenizer_type(tok),
            "trained": trained,
            "source": None if trained else str(tok_source),
            "requested_vocab_size": vocab_size if trained else None,
            "sha256": hashlib.sha256(tokenizer_json).hexdigest(),
            # Which tokenizer it was, whatever its files: what --init compares with the model's.
            "layout": "lmlab" if hf is None else "huggingface",
            "class": None if hf is None else type(hf).__name__,
            "vocab_sha256": tokenizer_.vocab_sha256(tok if hf is None else hf),
            "document_end": "eos appended" if eos_id is not None else "the tokenizer's own special tokens",
        },
        "train": {
            "tokens": train_w.tokens,
            "documents": counts["train"],
            "unk_tokens": unk["train"],
            "sha256": train_w.sha256,
        },
        "val": {
            "tokens": val_w.tokens,
            "documents": counts["val"],
            "unk_tokens": unk["val"],
            "sha256": val_w.sha256,
        },
        "val_fraction": val_fraction,
        "split": "blake2b-64 of the document text < val_fraction",
        "doc_sep": doc_sep,
        "default_corpus": default,
        "sources": [s.as_dict() for s in stats],
        "undecodable_bytes": sum(s.undecodable_bytes for s in stats),
    }
    _write_file(tmp / shards.META_NAME, (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
    return meta


# Above this share of <unk> among the tokens of the documents the dataset is refused: a model
# trained on it would mostly learn to predict <unk>.  A quarter, not a half, because the Unigram
# model fuses each run of unknown characters into one <unk>: a Chinese text under an English
# tokenizer is "▁" + <unk> per document, 50% of the tokens but all of the text.  Shares above 1%
# are reported in the summary.
MAX_UNK_SHARE = 0.25


def _check_unknown_share(
    unk: dict[str, int], text_tokens: int, tok_source, sample: dict[str, int], train_bytes: int
) -> None:
    share = sum(unk.values()) / max(text_tokens, 1)
    if share <= MAX_UNK_SHARE:
        return
    if tok_source is not None:
        why = f"the tokenizer {tok_source} does not know most of this corpus's characters"
        fix = "train one on this corpus instead"
    else:
        why = (
            f"the tokenizer was trained on only {sample['chars']:,} characters "
            f"(--tokenizer-train-mb {train_bytes / 2**20:g})"
        )
        fix = "raise --tokenizer-train-mb"
    raise LmlabError(f"{share:.0%} of the tokens would be <unk>: {why}; {fix}")


def _write_tokenizer(tmp: Path, tok, hf) -> tuple[bytes, dict[str, Any], int]:
    """Write the tokenizer into ``tmp``: ``(tokenizer.json's bytes, special ids by role, vocab size)``."""
    if hf is None:  # lmlab's own: its tokenizer.json, byte for byte as it encodes
        tokenizer_json = tok.to_str(pretty=False).encode("utf-8")
        _write_file(tmp / "tokenizer.json", tokenizer_json)
        return tokenizer_json, tokenizer_.special_ids(tok), tok.get_vocab_size(with_added_tokens=True)
    # Any other: its own files, as transformers saves them, for AutoTokenizer to load.
    _save_hf_tokenizer(hf, tmp)
    roles: dict[str, Any] = tokenizer_.role_ids(hf)
    v = int(roles.pop("vocab_size"))
    return (tmp / "tokenizer.json").read_bytes(), roles, v


def _save_hf_tokenizer(hf, out: Path) -> None:
    """``hf.save_pretrained(out)``, quietly; only files ``prepare`` may write (``_PREPARED_NAMES``)."""
    from lmlab.models.presets import quiet_hf_progress

    with quiet_hf_progress():
        hf.save_pretrained(out)
    odd = sorted(p.name for p in out.iterdir() if p.name not in _PREPARED_NAMES)
    if odd:
        raise LmlabError(f"saving the tokenizer wrote {odd[0]!r}, a file prepare does not know")
    if not (out / "tokenizer.json").is_file():
        (out / "tokenizer.json").write_text(hf.backend_tokenizer.to_str(), encoding="utf-8")


def _tokenizer_type(tok) -> str:
    import json

    return json.loads(tok.to_str())["model"]["type"].lower()


def default_data_dir(cache: str | os.PathLike | None = None) -> Path:
    """Where the embedded default corpus is prepared: ``<cache>/data/default`` (see :func:`~lmlab.data.corpus.cache_dir`)."""
    return corpus_.cache_dir(cache) / "data" / "default"


# What ``prepare`` has ever written into a prepared directory (older versions left the
# ``.*.bin.tmp`` files and no ``meta.json`` when killed).
_PREPARED_NAMES = frozenset(
    {*tokenizer_.HF_TOKENIZER_FILES, "train.bin", "val.bin", "meta.json", ".train.bin.tmp", ".val.bin.tmp"}
)


def ensure_default_data(progress: bool | None = None, cache: str | os.PathLike | None = None) -> Path:
    """The prepared default-corpus directory in ``cache`` (default ``~/.cache/lmlab``), preparing it
    first if it is missing or incomplete."""
    import shutil

    from lmlab.io import output_kind

    d = default_data_dir(cache)
    try:
        meta = shards.load_meta(d)
        shards.load_tokens(d, "train")
        shards.load_tokens(d, "val")
        v = sys.version_info
        if Path(meta["sources"][0]["path"]).name == f"default-corpus-py{v.major}.{v.minor}.{v.micro}.jsonl":
            return d
    except (LmlabError, KeyError, IndexError, TypeError):
        pass
    # The cache is lmlab's own: an incomplete directory an older lmlab left there may go.
    if d.is_dir() and output_kind(d) is None and all(p.name in _PREPARED_NAMES for p in d.iterdir()):
        shutil.rmtree(d)
    prepare(None, d, progress=progress, overwrite=True, cache=cache)
    return d
