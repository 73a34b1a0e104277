import pytest

from lmlab.cli import env_cache_dir  # the session's cache (tests/conftest.py sets $LMLAB_CACHE)
from lmlab.data.corpus import default_corpus_path, iter_documents
from lmlab.data.tokenizer import (
    BASE_SPECIALS,
    MIN_VOCAB_SIZE,
    SENTINELS,
    load_tokenizer,
    read_tokenizer,
    save_tokenizer,
    special_ids,
    train_tokenizer,
)
from lmlab.errors import LmlabError


@pytest.fixture(scope="module")
def texts():
    docs = iter_documents(default_corpus_path(env_cache_dir()))
    return [d for _, d in zip(range(800), docs, strict=False)]


@pytest.mark.parametrize("kind", [pytest.param("unigram", marks=pytest.mark.slow), "bpe"])
def test_t5_layout(texts, kind, tmp_path):
    tok = train_tokenizer(texts, vocab_size=600, kind=kind)
    v = tok.get_vocab_size()
    assert v == 600
    ids = special_ids(tok)
    assert (ids["pad"], ids["eos"], ids["unk"], ids["mask"]) == (0, 1, 2, 3)
    assert [tok.token_to_id(s) for s in SENTINELS] == list(range(v - 1, v - 101, -1))
    save_tokenizer(tok, tmp_path / "tokenizer.json")

    from transformers import PreTrainedTokenizerFast

    plain = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    hf = load_tokenizer(tmp_path)
    sentence = "Return the number of items in a container.\nRaise ValueError if it is empty."
    assert plain(sentence).input_ids == hf(sentence).input_ids == tok.encode(sentence).ids
    assert (hf.pad_token_id, hf.eos_token_id, hf.unk_token_id, hf.mask_token_id) == (0, 1, 2, 3)
    assert hf.convert_tokens_to_ids("<extra_id_0>") == v - 1
    assert hf.decode(hf(sentence).input_ids) == sentence
    # A sentinel in the text is one token, as in T5.
    assert hf("a <extra_id_3> b").input_ids.count(v - 4) == 1


def test_vocab_too_small(texts):
    with pytest.raises(LmlabError, match="too small"):
        train_tokenizer(texts, vocab_size=MIN_VOCAB_SIZE - 1)
    with pytest.raises(LmlabError, match="unknown tokenizer type"):
        train_tokenizer(texts, vocab_size=600, kind="wordpiece")


def test_foreign_tokenizer_is_rejected(tmp_path, texts):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(LmlabError, match="not a valid tokenizer.json"):
        read_tokenizer(tmp_path)
    from tokenizers import Tokenizer, models

    t = Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a"))
    t.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(LmlabError, match="layout"):
        read_tokenizer(tmp_path)
    with pytest.raises(LmlabError, match="no tokenizer"):
        read_tokenizer(tmp_path / "nowhere")


def _raw_unigram(pieces):
    from tokenizers import Tokenizer, models

    return Tokenizer(
        models.Unigram([(s, 0.0) for s in BASE_SPECIALS] + pieces, unk_id=2, byte_fallback=False)
    )


def test_unigram_ids_do_not_depend_on_the_trainers_hash_order():
    """The trainer's vocabulary varies from run to run in three ways; the ids must not."""
    import itertools
    import json
    import random

    from lmlab.data.tokenizer import _canonical_unigram

    m, chain, penalty = -9.0, [], 0.0
    for _ in range(3):  # the scores the trainer gives the characters it had pruned, in its order
        chain.append(m + penalty)
        penalty += 0.0001
    results = set()
    rng = random.Random(0)
    for order in itertools.permutations("zqx"):
        pieces = [("▁the", -2.0), ("e", -3.0), ("t", -3.0 + 2e-15), ("ab", -5.0), ("y", m + 3e-14)]
        pieces += list(zip(order, chain, strict=True))  # hash order decides who gets which score
        rng.shuffle(pieces)  # ... and which of two tied pieces comes first
        noisy = [(p, s + rng.choice((0.0, 1e-13, -1e-13))) for p, s in pieces]  # summation-order noise
        results.add(_canonical_unigram(_raw_unigram(noisy)).to_str())
    assert len(results) == 1
    vocab = json.loads(results.pop())["model"]["vocab"]
    assert [p for p, _ in vocab] == [*BASE_SPECIALS, "▁the", "e", "t", "ab", "q", "x", "y", "z"]
    # The pruned characters (and "y", tied with the lowest) get the same scores, by code point.
    assert [s for _, s in vocab[-4:]] == [-8.9998, -8.9999, -9.0, -9.0]
    assert all(s < -1000 for _, s in vocab[:4])  # specials demoted below every piece
