"""Fixtures of the evaluation tests: a small real corpus, its prepared directory and tokenizer, and
untrained models of every family on that vocabulary (in memory, and saved as ``final/`` would be).

Everything is session-scoped and small (vocabulary 1024, the tiny presets): building all of it takes
a few seconds on 2 cores.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

CORPORA = Path(__file__).resolve().parents[3] / "shared" / "corpora"
VOCAB = 1024
PRESETS = {"gpt2": "gpt-tiny", "llama": "llama-tiny", "t5": "t5-tiny", "bert": "bert-tiny"}


def _corpus_text() -> str:
    """About 120 KB of English: the shared Moby-Dick when present, else the stdlib docstrings."""
    p = CORPORA / "moby_dick.txt"
    if p.is_file():
        text = p.read_text(encoding="utf-8", errors="replace")
        return text[20_000:140_000]
    from lmlab.data.corpus import _stdlib_docstrings

    docs, size = [], 0
    for d in itertools.islice(_stdlib_docstrings(), 5000):
        docs.append(d)
        size += len(d)
        if size > 120_000:
            break
    return "\n\n".join(docs)


@pytest.fixture(scope="session")
def eval_corpus(tmp_path_factory) -> Path:
    """A plain-text file of about 120 KB (documents separated by blank lines)."""
    path = tmp_path_factory.mktemp("eval-corpus") / "corpus.txt"
    path.write_text(_corpus_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def eval_data(tmp_path_factory, eval_corpus) -> Path:
    """``eval_corpus`` prepared with a 1024-id Unigram tokenizer and a 10% validation split."""
    from lmlab.data import prepare

    out = tmp_path_factory.mktemp("eval-data") / "data"
    prepare([str(eval_corpus)], out, vocab_size=VOCAB, val_fraction=0.1, progress=False)
    return out


@pytest.fixture(scope="session")
def eval_tokenizer(eval_data):
    """The prepared directory's tokenizer (a ``PreTrainedTokenizerFast``)."""
    from lmlab.data import load_tokenizer

    return load_tokenizer(eval_data)


@pytest.fixture(scope="session")
def tiny_model(eval_data):
    """``tiny_model(family)``: an untrained model of the family's tiny preset (``"gpt2"``, ``"llama"``,
    ``"t5"``, ``"bert"``) on the prepared vocabulary, seeded, in eval mode.  Cached: do not modify it."""
    from lmlab.data import load_meta
    from lmlab.models.presets import build_model

    meta = load_meta(eval_data)
    cache: dict[str, object] = {}

    def get(family: str):
        if family not in cache:
            m = build_model(PRESETS[family], meta["vocab_size"], meta["special_ids"], seed=0)
            cache[family] = m.eval()
        return cache[family]

    return get


@pytest.fixture(scope="session")
def saved_model(tmp_path_factory, tiny_model, eval_tokenizer):
    """``saved_model(family)``: :func:`tiny_model` saved with its tokenizer, as a run's final/ holds them."""
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            d = tmp_path_factory.mktemp(f"saved-{family}") / "model"
            tiny_model(family).save_pretrained(d)
            eval_tokenizer.save_pretrained(d)
            cache[family] = d
        return cache[family]

    return get
