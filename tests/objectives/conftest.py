"""Shared fixtures for the objectives' tests: a tiny tokenizer trained once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

CORPORA = Path(__file__).resolve().parents[3] / "shared" / "corpora"  # ../shared beside the checkout
TABLE3 = "Thank you for inviting me to your party last week ."

# Enough English for a small Unigram vocabulary when the shared corpora are absent.
FALLBACK_TEXT = (
    f"{TABLE3}\n"
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of "
    "Light, it was the season of Darkness, it was the spring of hope, it was the winter of despair.\n"
) * 20


def _texts() -> list[str]:
    path = CORPORA / "moby_dick.txt"
    if path.is_file():
        text = path.read_text(encoding="utf-8")[:200_000]
        return [TABLE3, *text.split("\n\n")]
    return FALLBACK_TEXT.split("\n")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lmlab.data.tokenizer import save_tokenizer, train_tokenizer

    tok = train_tokenizer(_texts(), vocab_size=1000, kind="unigram")
    out = tmp_path_factory.mktemp("tok")
    save_tokenizer(tok, out / "tokenizer.json")
    return out


@pytest.fixture(scope="session")
def hf_tokenizer(tokenizer_dir: Path):
    from lmlab.data import load_tokenizer

    return load_tokenizer(tokenizer_dir)
