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
    # </s> ends every sequence, as T5's tokenizer does, and only when special tokens are asked for.
    body = hf(sentence, add_special_tokens=False).input_ids
    assert hf(sentence).input_ids == [*body, 1] and 1 not in body
    assert hf([sentence, "a"], add_special_tokens=True).input_ids[1][-1] == 1
    assert hf.decode(body) == sentence == hf.decode(hf(sentence).input_ids, skip_special_tokens=True)
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
        read_tokenizer(tmp_path)  # lmlab's own only; load_tokenizer takes any
    assert load_tokenizer(tmp_path)("b").input_ids == [1]
    for f in (read_tokenizer, load_tokenizer):
        with pytest.raises(LmlabError, match="no tokenizer"):
            f(tmp_path / "nowhere")


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


# -- transformers' conventions for lmlab's saved tokenizers ----------------------------------------

# Tokenizer classes that transformers 4.x (4.40 ... 4.57) resolves by name from tokenizer_config.json,
# for a tokenizer.json-only directory; 5.x's TokenizersBackend is not one of them.
TRANSFORMERS_4_CLASSES = {"PreTrainedTokenizerFast"}


def test_saved_tokenizer_config_loads_under_transformers_4_and_5(texts, tmp_path):
    import json

    from transformers import AutoTokenizer

    from lmlab.data.tokenizer import set_padding_side

    save_tokenizer(train_tokenizer(texts[:300], vocab_size=400, kind="bpe"), tmp_path / "tokenizer.json")
    tok = load_tokenizer(tmp_path)
    set_padding_side(tok, "left")  # what pretrain does for a causal model
    out = tmp_path / "saved"
    tok.save_pretrained(out)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] in TRANSFORMERS_4_CLASSES and cfg["padding_side"] == "left"
    # 4.x reads extra_special_tokens as a dict of named tokens: the sentinels go in the list both read.
    assert "extra_special_tokens" not in cfg and cfg["additional_special_tokens"] == list(SENTINELS)
    assert cfg["model_input_names"] == ["input_ids", "attention_mask"]  # 4.x adds token_type_ids otherwise
    back = AutoTokenizer.from_pretrained(out)
    assert back.padding_side == "left" and back("a b").input_ids == tok("a b").input_ids
    assert set(back("a b")) == {"input_ids", "attention_mask"}
    assert (back.pad_token_id, back.eos_token_id, back.mask_token_id) == (0, 1, 3)
    assert back.convert_tokens_to_ids("<extra_id_0>") == len(tok) - 1


# -- any Hugging Face tokenizer --------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    from hf_tokenizer_helpers import gpt2_like, t5_like

    root = tmp_path_factory.mktemp("hf")
    return {"t5": t5_like(root / "t5"), "gpt2": gpt2_like(root / "gpt2")}


def test_bert_tokenizer_roles_framing_and_no_truncation(tmp_path):
    from hf_tokenizer_helpers import minilm_dir

    from lmlab.data.tokenizer import backend_copy, framing, is_lmlab_layout, role_ids, vocab_sha256

    d = minilm_dir()
    tok = load_tokenizer(d)
    r = role_ids(tok)
    assert (r["pad"], r["unk"], r["cls"], r["sep"], r["mask"], r["eos"], r["vocab_size"]) == (
        0, 100, 101, 102, 103, None, 30522,
    )  # fmt: skip
    raw = backend_copy(tok)
    assert not is_lmlab_layout(raw) and framing(raw) == (1, 1)  # [CLS] ... [SEP]
    # Its tokenizer.json truncates to 128 and pads to 128: the copy prepare encodes with does neither.
    long = " ".join(["whale"] * 300)
    assert len(raw.encode(long).ids) == 302 and raw.encode("whale").ids == [101, 13156, 102]
    # A slow tokenizer's files alone (vocab.txt and its config) load too, converted to the same vocabulary.
    slow = tmp_path / "slow"
    slow.mkdir()
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (slow / name).write_bytes((d / name).read_bytes())
    converted = load_tokenizer(slow)
    assert converted.is_fast and vocab_sha256(converted) == vocab_sha256(tok)
    assert converted("The Whale").input_ids == tok("The Whale").input_ids == [101, 1996, 13156, 102]


def test_t5_and_gpt2_layouts_are_read_not_assumed(hf_dirs):
    from lmlab.data.tokenizer import backend_copy, framing, role_ids

    t5 = load_tokenizer(hf_dirs["t5"])
    r = role_ids(t5)
    V = r["vocab_size"]
    assert (r["pad"], r["eos"], r["unk"], r["mask"]) == (0, 1, 2, None)
    assert (r["sentinel_0"], r["num_sentinels"]) == (V - 1, 100)  # <extra_id_0> the highest id
    assert t5.convert_tokens_to_ids("<extra_id_99>") == V - 100 and framing(backend_copy(t5)) == (0, 1)
    gpt2 = load_tokenizer(hf_dirs["gpt2"], padding_side="left")
    g = role_ids(gpt2)
    assert g["pad"] is None and g["mask"] is None and g["sentinel_0"] is None
    assert g["eos"] == g["bos"] == g["vocab_size"] - 1 and framing(backend_copy(gpt2)) == (0, 0)
    assert gpt2.padding_side == "left"
    with pytest.raises(LmlabError, match="padding_side"):
        load_tokenizer(hf_dirs["gpt2"], padding_side="middle")


def test_objectives_take_their_ids_from_any_tokenizer(hf_dirs):
    from hf_tokenizer_helpers import minilm_dir

    from lmlab.objectives import get_objective
    from lmlab.objectives.base import special_ids_of

    bert = load_tokenizer(minilm_dir())
    mlm = get_objective("bert", bert)
    assert (mlm.mask_id, mlm.pad_id, mlm.vocab_size) == (103, 0, 30522)
    assert {0, 100, 101, 102, 103} <= set(mlm.special_ids) and 1996 not in mlm.special_ids
    with pytest.raises(LmlabError, match="sentinel"):
        get_objective("span", bert)
    with pytest.raises(LmlabError, match="end-of-sequence"):
        get_objective("drop", bert)

    t5 = load_tokenizer(hf_dirs["t5"])
    V = len(t5)
    span = get_objective("span", t5)
    assert (span.sentinel_id, span.num_sentinels, span.eos_id, span.pad_id) == (V - 1, 100, 1, 0)
    with pytest.raises(LmlabError, match="mask token.*mask_id="):
        get_objective("bert-style", t5)
    assert get_objective("bert-style", t5, mask_id=V - 1).mask_id == V - 1  # T5's choice: a sentinel

    gpt2 = load_tokenizer(hf_dirs["gpt2"])
    ids = special_ids_of(gpt2)
    assert ids.pad_id == ids.eos_id == len(gpt2) - 1  # no pad: padding is masked, eos stands in
    assert get_objective("causal", gpt2).pad_id == ids.eos_id
    with pytest.raises(LmlabError, match=r"no mask token \(<mask>, BERT's \[MASK\]\)"):
        get_objective("bert", gpt2)
