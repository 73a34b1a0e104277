"""``lmlab prepare``: the command-line face of :func:`lmlab.data.pipeline.prepare`."""

from __future__ import annotations

import argparse


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--corpus",
        nargs="+",
        metavar="PATH",
        help="text / .jsonl files (optionally .gz) or directories (searched for .txt .md .rst .jsonl); "
        "default: the English text that ships with Python (pydoc topics and stdlib docstrings)",
    )
    p.add_argument(
        "--out", metavar="DIR", help="output directory (default: lmlab's cache, for the default corpus)"
    )
    p.add_argument("--vocab-size", type=int, default=8192, help="tokenizer vocabulary incl. specials (8192)")
    p.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="reuse a tokenizer: lmlab's tokenizer.json, a prepared or model directory, or any Hugging Face "
        "tokenizer directory (BERT, T5, GPT-2 ...: its own special tokens, e.g. to continue pre-training that model)",
    )
    p.add_argument(
        "--tokenizer-type", choices=["unigram", "bpe"], default="unigram", help="unigram (T5) or bpe"
    )
    p.add_argument(
        "--val-fraction", type=float, default=0.02, help="share of documents for validation (0.02)"
    )
    p.add_argument(
        "--doc-sep",
        choices=["blank", "line"],
        default="blank",
        help="plain text: documents end at blank lines (default) or at every line",
    )
    p.add_argument(
        "--tokenizer-train-mb",
        type=float,
        default=256,
        help="train the tokenizer on a hash-sampled ~N MB of the corpus (256)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out if it is already a prepared directory (only once the new one is complete)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    import math

    from lmlab.cli import env_cache_dir
    from lmlab.data.pipeline import default_data_dir, prepare
    from lmlab.errors import LmlabError

    cache = env_cache_dir()  # $LMLAB_CACHE, else $XDG_CACHE_HOME/lmlab, else the library's ~/.cache/lmlab

    overwrite = args.overwrite
    if args.out is None:
        if args.corpus is not None:
            raise LmlabError("--out is required with --corpus")
        args.out = default_data_dir(cache)
        overwrite = True  # lmlab's own cache
    mb = args.tokenizer_train_mb
    if not math.isfinite(mb) or mb <= 0:
        raise LmlabError(f"--tokenizer-train-mb must be a positive number of megabytes, got {mb:g}")
    res = prepare(
        args.corpus,
        args.out,
        vocab_size=args.vocab_size,
        tokenizer=args.tokenizer,
        tokenizer_type=args.tokenizer_type,
        val_fraction=args.val_fraction,
        doc_sep=args.doc_sep,
        tokenizer_train_bytes=max(1, int(mb * 2**20)),
        progress=False if args.no_progress else None,
        overwrite=overwrite,
        cache=cache,
    )
    print(res.summary())
    return 0
