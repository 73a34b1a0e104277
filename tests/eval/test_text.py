"""The text evaluation reads: documents framed exactly as ``lmlab prepare`` frames them, the start
token of a causal stream, prepared splits decoded back to documents, and lm-eval-harness's counts."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch

from lmlab.data import load_meta, load_tokens, prepare
from lmlab.errors import LmlabError
from lmlab.eval.text import (
    EvalText,
    TextStats,
    causal_stream,
    decode_documents,
    documents_from_paths,
    encode_documents,
    load_eval_text,
    text_stats,
)

DOCS = [
    "Call me Ishmael. Some years ago, never mind how long precisely.",
    "It is a way I have of driving off the spleen, and regulating the circulation.",
    "Whenever I find myself growing grim about the mouth;\nwhenever it is a damp, drizzly November.",
]
# Text that spells special tokens: prepare encodes it as text (encode_special_tokens).
SPECIAL_DOC = 'The literal text "<|endoftext|>", "</s>" and <extra_id_0> are text.'


def _corpus(tmp_path, docs=DOCS):
    p = tmp_path / "three.txt"
    p.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return p


def _bpe(specials: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    t.train_from_iterator(DOCS * 4, trainer)
    return t


def _save(t, where, **special_tokens):
    """``t`` as a Hugging Face tokenizer directory, and that directory loaded as lmlab loads one."""
    from transformers import PreTrainedTokenizerFast

    from lmlab.data import load_tokenizer

    PreTrainedTokenizerFast(tokenizer_object=t, **special_tokens).save_pretrained(where)
    return where, load_tokenizer(where)


@pytest.fixture(scope="session")
def gpt2_style_tokenizer(tmp_path_factory):
    """A byte-level BPE whose framing adds nothing and whose only special token is GPT-2's
    ``<|endoftext|>`` (bos = eos = unk), saved as a Hugging Face tokenizer directory."""
    eot = "<|endoftext|>"
    d = tmp_path_factory.mktemp("gpt2-style") / "tok"
    return _save(_bpe([eot]), d, bos_token=eot, eos_token=eot, unk_token=eot)


def test_encode_documents_is_what_prepare_writes(tmp_path, eval_data, eval_tokenizer):
    """lmlab's tokenizer: ``</s>`` from its post-processor ends each document."""
    docs = [*DOCS, SPECIAL_DOC]
    out = tmp_path / "prep"
    prepare([str(_corpus(tmp_path, docs))], out, tokenizer=str(eval_data), val_fraction=0, progress=False)
    written = np.asarray(load_tokens(out, "train"), dtype=np.int64)
    ids = encode_documents(eval_tokenizer, docs)
    assert ids.dtype == np.int64
    np.testing.assert_array_equal(ids, written)
    plain = encode_documents(eval_tokenizer, DOCS)
    assert int((plain == eval_tokenizer.eos_token_id).sum()) == len(DOCS) and plain[-1] == 1
    np.testing.assert_array_equal(plain, ids[: plain.size])


def test_encode_documents_gpt2_style_appends_eos(tmp_path, gpt2_style_tokenizer):
    """A tokenizer whose framing adds nothing gets its EOS appended to every document, as in prepare;
    a literal "<|endoftext|>" in a text stays text."""
    d, tok = gpt2_style_tokenizer
    docs = [*DOCS, SPECIAL_DOC]
    out = tmp_path / "prep"
    prepare([str(_corpus(tmp_path, docs))], out, tokenizer=str(d), val_fraction=0, progress=False)
    written = np.asarray(load_tokens(out, "train"), dtype=np.int64)
    ids = encode_documents(tok, docs)
    np.testing.assert_array_equal(ids, written)
    eot = tok.eos_token_id
    assert np.flatnonzero(ids == eot).size == len(docs) and ids[-1] == eot
    assert decode_documents(tok, ids) == docs  # byte-level BPE is lossless


def test_causal_stream_prefixes_the_start_token_once(eval_tokenizer, gpt2_style_tokenizer):
    ids = encode_documents(eval_tokenizer, DOCS[:1])
    s = causal_stream(eval_tokenizer, ids)  # no BOS: lmlab's </s>
    assert s[0] == eval_tokenizer.eos_token_id == 1 and s.size == ids.size + 1
    np.testing.assert_array_equal(s[1:], ids)
    np.testing.assert_array_equal(causal_stream(eval_tokenizer, s), s)  # already started
    _, tok = gpt2_style_tokenizer
    g = causal_stream(tok, torch.tensor([5, 6, 7]))
    assert g.tolist() == [tok.convert_tokens_to_ids("<|endoftext|>"), 5, 6, 7]


def test_decode_documents_of_a_prepared_split(eval_data, eval_tokenizer):
    val = load_tokens(eval_data, "val")
    docs = decode_documents(eval_tokenizer, val)
    assert len(docs) == load_meta(eval_data)["val"]["documents"]
    # Round trip: the decoded documents encode back to the split, less its <unk>s (decoded to nothing).
    val = np.asarray(val, dtype=np.int64)
    assert (val == eval_tokenizer.unk_token_id).any()
    np.testing.assert_array_equal(
        encode_documents(eval_tokenizer, docs), val[val != eval_tokenizer.unk_token_id]
    )
    assert decode_documents(eval_tokenizer, encode_documents(eval_tokenizer, DOCS)) == DOCS


def test_text_stats_counts_like_lm_eval_harness():
    # UTF-8 bytes (é is 2, the curly quotes 3 each); words = len(re.split(r"\s+", doc)).
    s = text_stats(["a b  c", "héllo\nworld “x”"])
    assert s == TextStats(bytes=6 + (6 + 1 + 5 + 1 + 7), words=3 + 3, documents=2)
    assert s.to_dict() == {"bytes": 26, "words": 6, "documents": 2}


def test_documents_from_paths_reads_like_prepare(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.txt").write_text("first doc\nline two\n\n\nsecond doc\n", encoding="utf-8")
    with gzip.open(d / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "  third doc  "}) + "\n\n" + json.dumps({"text": "fourth"}) + "\n")
    (d / "ignored.bin").write_bytes(b"\x00\x01")
    assert documents_from_paths([d]) == ["first doc\nline two", "second doc", "third doc", "fourth"]
    assert documents_from_paths(d / "a.txt", doc_sep="line") == ["first doc", "line two", "second doc"]
    (tmp_path / "empty.txt").write_text("\n \n", encoding="utf-8")
    with pytest.raises(LmlabError, match="holds no text"):
        documents_from_paths([tmp_path / "empty.txt"])
    with pytest.raises(LmlabError, match="does not exist"):
        documents_from_paths([tmp_path / "nope.txt"])


def test_load_eval_text_sources_agree(tmp_path, eval_tokenizer):
    p = _corpus(tmp_path)
    from_paths = load_eval_text(eval_tokenizer, paths=[p])
    from_texts = load_eval_text(eval_tokenizer, texts=DOCS + ["  \n"])  # blank documents dropped
    assert isinstance(from_paths, EvalText) and from_paths.docs == DOCS == from_texts.docs
    np.testing.assert_array_equal(from_paths.ids, from_texts.ids)
    assert from_texts.stats == text_stats(DOCS)
    one = load_eval_text(eval_tokenizer, texts=DOCS[0])
    assert one.stats.documents == 1 and one.docs == DOCS[:1]
    from_ids = load_eval_text(eval_tokenizer, ids=torch.from_numpy(from_texts.ids))
    np.testing.assert_array_equal(from_ids.ids, from_texts.ids)
    assert from_ids.stats.documents == 3


def test_load_eval_text_of_prepared_data(eval_data, eval_tokenizer):
    t = load_eval_text(eval_tokenizer, data_dir=eval_data)
    val = load_tokens(eval_data, "val")
    np.testing.assert_array_equal(t.ids, np.asarray(val, dtype=np.int64))
    assert t.ids.dtype == np.int64
    assert t.stats == text_stats(decode_documents(eval_tokenizer, val))
    assert t.stats.documents == load_meta(eval_data)["val"]["documents"]


def test_load_eval_text_refuses_in_one_line(tmp_path, eval_data, eval_tokenizer, gpt2_style_tokenizer):
    cases = [
        (dict(), "exactly one of"),
        (dict(texts="a", ids=[1, 2]), "exactly one of.*texts, ids"),
        (dict(texts=["", " \n"]), "the text is empty"),
        (dict(ids=[]), "the text is empty"),
        (dict(ids=np.zeros((2, 3), dtype=np.int64)), "one sequence"),
        (dict(ids=[0.5, 1.0]), "integers"),
    ]
    for kw, msg in cases:
        with pytest.raises(LmlabError, match=msg) as e:
            load_eval_text(eval_tokenizer, **kw)
        assert "\n" not in str(e.value)
    _, other = gpt2_style_tokenizer
    with pytest.raises(LmlabError, match="prepared with another tokenizer"):
        load_eval_text(other, data_dir=eval_data)
    out = tmp_path / "noval"
    prepare([str(_corpus(tmp_path))], out, tokenizer=str(eval_data), val_fraction=0, progress=False)
    with pytest.raises(LmlabError, match="val split of .* is empty"):
        load_eval_text(eval_tokenizer, data_dir=out)


@pytest.mark.parametrize(
    "template, roles, start",
    [
        ("[CLS] $A [SEP]", {"cls_token": "[CLS]", "sep_token": "[SEP]"}, None),  # BERT: split after [SEP]
        ("<s> $A", {"bos_token": "<s>", "eos_token": "</s>"}, "<s>"),  # BOS framing, EOS appended
        ("<s> $A", {"bos_token": "<s>"}, "<s>"),  # BOS framing alone: split before <s>
    ],
)
def test_other_framings_round_trip(tmp_path, template, roles, start):
    """Documents framed by a post-processor (BERT's [CLS] ... [SEP], a BOS) are written as prepare
    writes them and split back at their framing."""
    from tokenizers import processors

    specials = ["[CLS]", "[SEP]", "<s>", "</s>"]
    t = _bpe(specials)
    t.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(p, t.token_to_id(p)) for p in specials]
    )
    d, tok = _save(t, tmp_path / "tok", **roles)
    out = tmp_path / "prep"
    prepare([str(_corpus(tmp_path))], out, tokenizer=str(d), val_fraction=0, progress=False)
    written = np.asarray(load_tokens(out, "train"), dtype=np.int64)
    ids = encode_documents(tok, DOCS)
    np.testing.assert_array_equal(ids, written)
    assert decode_documents(tok, ids) == DOCS
    if start is None:
        with pytest.raises(LmlabError, match="neither a beginning- nor an end-of-sequence token"):
            causal_stream(tok, ids)
    else:  # the stream already starts with its BOS
        np.testing.assert_array_equal(causal_stream(tok, ids), ids)
        assert ids[0] == tok.convert_tokens_to_ids(start)
