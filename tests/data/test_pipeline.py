import json
from pathlib import Path

import numpy as np
import pytest
from lmlab_cli_harness import run_lmlab, tree_hashes
from prepare_helpers import english_docs, write_corpus

from lmlab.cli import env_cache_dir  # the session's cache (tests/conftest.py sets $LMLAB_CACHE)
from lmlab.data import load_meta, load_tokenizer, load_tokens, prepare, token_dtype
from lmlab.data import pipeline as prepare_mod
from lmlab.data.corpus import default_corpus_path, iter_documents
from lmlab.data.shards import ShardWriter
from lmlab.errors import LmlabError

PARAS = [
    "The quick brown fox jumps over the lazy dog.",
    "A second paragraph,\nwith two lines.",
    "Numbers like 3.14 and 2718 appear too.",
    "Markup such as </s> and <extra_id_0> or <pad> is only text here.",
]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """About 300 KB of the default corpus plus a few hand-written paragraphs, as a .txt file."""
    d = tmp_path_factory.mktemp("corpus")
    docs = [
        doc for _, doc in zip(range(1500), iter_documents(default_corpus_path(env_cache_dir())), strict=False)
    ]
    text = "\n\n".join(PARAS + docs) + "\n"
    (d / "a.txt").write_text(text, encoding="utf-8")
    return d / "a.txt"


@pytest.fixture(scope="module")
def prepared(small_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    return prepare([small_corpus], out, vocab_size=1000, val_fraction=0.1, progress=False)


def split_docs(ids: np.ndarray, eos: int) -> list[np.ndarray]:
    assert ids.size == 0 or ids[-1] == eos
    ends = np.flatnonzero(ids == eos)
    return np.split(ids, ends + 1)[:-1]


def test_outputs_and_meta(prepared, small_corpus):
    out, meta = prepared.out_dir, prepared.meta
    assert {p.name for p in out.iterdir()} == {"tokenizer.json", "train.bin", "val.bin", "meta.json"}
    assert meta == load_meta(out)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 1000
    assert meta["special_ids"]["sentinel_0"] == 999 and meta["special_ids"]["eos"] == 1
    for split in ("train", "val"):
        ids = load_tokens(out, split)
        assert ids.dtype == np.uint16 and ids.size == meta[split]["tokens"]
        assert (ids < 1000).all()
        assert len(split_docs(np.asarray(ids), 1)) == meta[split]["documents"]
    n = meta["train"]["documents"] + meta["val"]["documents"]
    assert n == meta["sources"][0]["documents"] == len(list(iter_documents(small_corpus))) > 1500
    assert 0.06 < meta["val"]["documents"] / n < 0.14  # hash split near val_fraction = 0.1
    src = meta["sources"][0]
    assert len(src["sha256"]) == 64 and src["bytes"] > 200_000 and meta["undecodable_bytes"] == 0


def test_shards_decode_to_the_documents(prepared, small_corpus):
    tok = load_tokenizer(prepared.out_dir)
    docs = list(iter_documents(small_corpus))
    got = [
        tok.decode(d[:-1].tolist()) for d in split_docs(np.asarray(load_tokens(prepared.out_dir, "train")), 1)
    ]
    got += [
        tok.decode(d[:-1].tolist()) for d in split_docs(np.asarray(load_tokens(prepared.out_dir, "val")), 1)
    ]
    # NFKC and collapsed runs of spaces are the tokenizer's only normalisation.
    import re
    import unicodedata

    norm = [re.sub(r"[ \t]+", " ", unicodedata.normalize("NFKC", d)) for d in docs]
    assert sorted(got) == sorted(norm)
    # Markup in the text stays text: no special ids inside a document.
    for split in ("train", "val"):
        for d in split_docs(np.asarray(load_tokens(prepared.out_dir, split)), 1):
            body = d[:-1]
            assert not ((body < 4) & (body != 2)).any() and not (body >= 900).any()


def test_split_is_stable_when_documents_are_added(prepared, small_corpus, tmp_path):
    bigger = tmp_path / "more.txt"
    bigger.write_text(
        "".join(f"Brand new document number {i}, about ships and the sea.\n\n" for i in range(300))
    )
    res = prepare(
        [small_corpus, bigger], tmp_path / "out", tokenizer=prepared.out_dir, val_fraction=0.1, progress=False
    )
    assert res.meta["tokenizer"]["trained"] is False
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (
        prepared.out_dir / "tokenizer.json"
    ).read_bytes()
    old_val = np.asarray(load_tokens(prepared.out_dir, "val"))
    new_val = np.asarray(load_tokens(tmp_path / "out", "val"))
    # The old validation documents come first and unchanged; new ones only add to the end.
    assert np.array_equal(new_val[: old_val.size], old_val)
    old_train = np.asarray(load_tokens(prepared.out_dir, "train"))
    assert np.array_equal(np.asarray(load_tokens(tmp_path / "out", "train"))[: old_train.size], old_train)


def test_failed_prepare_leaves_the_old_directory_intact(prepared, small_corpus, tmp_path, monkeypatch):
    out = tmp_path / "out"
    prepare([small_corpus], out, tokenizer=prepared.out_dir, progress=False)
    before = tree_hashes(out)
    calls = {"n": 0}
    real = prepare_mod.encode_documents

    def dies_midway(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as if interrupted part-way through the shards
        return real(*a, **k)

    monkeypatch.setattr(prepare_mod, "encode_documents", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        prepare([small_corpus], out, tokenizer=prepared.out_dir, progress=False, overwrite=True)
    assert calls["n"] == 2
    assert tree_hashes(out) == before  # the old directory, byte for byte
    load_tokens(out, "train")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directory left


def test_an_existing_prepared_directory_needs_overwrite(prepared, small_corpus, tmp_path):
    out = tmp_path / "out"
    prepare([small_corpus], out, tokenizer=prepared.out_dir, progress=False)
    before = tree_hashes(out)
    with pytest.raises(LmlabError, match="--overwrite"):
        prepare([small_corpus], out, tokenizer=prepared.out_dir, progress=False)
    assert tree_hashes(out) == before
    # Replaced whole, and the same corpus gives the same files.
    res = prepare([small_corpus], out, tokenizer=prepared.out_dir, progress=False, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]
    assert res.meta["train"]["sha256"] == before["train.bin"] == tree_hashes(out)["train.bin"]
    # --overwrite replaces what prepare wrote, never a file the user put beside it.
    (out / "notes.txt").write_text("mine")
    before = tree_hashes(out)
    with pytest.raises(LmlabError, match="notes.txt"):
        prepare([small_corpus], out, tokenizer=prepared.out_dir, progress=False, overwrite=True)
    assert tree_hashes(out) == before


def test_truncated_shard_is_detected(prepared, tmp_path):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(prepared.out_dir, d)
    with open(d / "train.bin", "r+b") as f:
        f.truncate((d / "train.bin").stat().st_size - 2)
    with pytest.raises(LmlabError, match="incomplete or corrupt"):
        load_tokens(d, "train")


def test_bad_inputs(tmp_path, small_corpus):
    with pytest.raises(LmlabError, match="does not exist"):
        prepare([tmp_path / "nope.txt"], tmp_path / "o")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n\t\n")
    with pytest.raises(LmlabError, match="empty"):
        prepare([blank], tmp_path / "o", vocab_size=300, progress=False)
    with pytest.raises(LmlabError, match="too small"):
        prepare([small_corpus], tmp_path / "o", vocab_size=50)
    with pytest.raises(LmlabError, match="val-fraction"):
        prepare([small_corpus], tmp_path / "o", val_fraction=1.5)
    assert not (tmp_path / "o").exists()


def test_undecodable_bytes_counted_in_meta(tmp_path, prepared):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"caf\xe9 au lait\n\nna\xefve text\n")
    res = prepare([p], tmp_path / "o", tokenizer=prepared.out_dir, val_fraction=0, progress=False)
    assert res.meta["undecodable_bytes"] == 2 and res.meta["sources"][0]["undecodable_bytes"] == 2


def test_token_dtype_and_writer(tmp_path):
    assert token_dtype(65536) == np.dtype("<u2") and token_dtype(65537) == np.dtype("<u4")
    with ShardWriter(tmp_path / "x.bin", np.dtype("<u4")) as w:
        w.write(np.array([1, 70000, 3]))
        w.commit()
    assert np.fromfile(tmp_path / "x.bin", dtype="<u4").tolist() == [1, 70000, 3]


@pytest.mark.slow  # 7 s on 2 cores: a whole novel
def test_real_corpus_moby_dick(tmp_path, corpus_file):
    src = corpus_file("moby_dick.txt")
    res = prepare([src], tmp_path / "md", vocab_size=2000, progress=False)
    m = res.meta
    assert m["sources"][0]["bytes"] == src.stat().st_size
    total = m["train"]["tokens"] + m["val"]["tokens"]
    # A 2k-piece Unigram model spends roughly 3-5 bytes of English per token.
    assert 3.0 < src.stat().st_size / total < 5.0
    assert json.loads((tmp_path / "md" / "meta.json").read_text())["val"]["documents"] > 0


@pytest.mark.slow
def test_prepare_is_reproducible_across_runs_and_threads(tmp_path):
    """Separate processes (the Rust trainer's hash order differs in each), one of them single-threaded."""
    corpus = write_corpus(tmp_path / "c.txt", 3000)
    outs = []
    for i, env in enumerate(({}, {}, {"RAYON_NUM_THREADS": "1"})):
        out = tmp_path / f"o{i}"
        r = run_lmlab(["prepare", "--corpus", str(corpus), "--out", str(out), "--vocab-size", "400",
                       "--no-progress"], env=env)  # fmt: skip
        assert r.returncode == 0, r.stderr
        outs.append(out)
    bpe = []
    for i, env in enumerate(({}, {"RAYON_NUM_THREADS": "1"})):
        out = tmp_path / f"bpe{i}"
        r = run_lmlab(["prepare", "--corpus", str(corpus), "--out", str(out), "--vocab-size", "500",
                       "--tokenizer-type", "bpe", "--no-progress"], env=env)  # fmt: skip
        assert r.returncode == 0, r.stderr
        bpe.append({k: v for k, v in tree_hashes(out).items() if k != "meta.json"})
    assert bpe[0] == bpe[1]
    first = tree_hashes(outs[0])
    meta0 = json.loads((outs[0] / "meta.json").read_text())
    for out in outs[1:]:
        hashes = tree_hashes(out)
        for name in ("tokenizer.json", "train.bin", "val.bin"):
            assert hashes[name] == first[name], name
        meta = json.loads((out / "meta.json").read_text())
        assert {k: v for k, v in meta.items() if k != "created"} == {
            k: v for k, v in meta0.items() if k != "created"
        }
    assert (
        meta0["train"]["sha256"] == first["train.bin"]
        and meta0["tokenizer"]["sha256"] == first["tokenizer.json"]
    )


@pytest.mark.slow
def test_huge_jsonl_record_prepares_like_the_same_text(tmp_path, prepared):
    # A few MB in one record, no blank lines: cut into documents exactly as the plain text is.
    text = "\n".join(english_docs(12_000, seed=2, words=30))
    (tmp_path / "big.txt").write_text(text)
    (tmp_path / "big.jsonl").write_text(json.dumps({"text": text}) + "\n")
    a = prepare([tmp_path / "big.txt"], tmp_path / "a", tokenizer=prepared.out_dir, progress=False)
    b = prepare([tmp_path / "big.jsonl"], tmp_path / "b", tokenizer=prepared.out_dir, progress=False)
    assert b.meta["train"]["documents"] + b.meta["val"]["documents"] > 10
    for split in ("train", "val"):
        assert a.meta[split] == b.meta[split]
    assert tree_hashes(tmp_path / "a")["train.bin"] == tree_hashes(tmp_path / "b")["train.bin"]


def test_ensure_default_data_replaces_only_its_own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(
        "LMLAB_CACHE", str(tmp_path / "not-read")
    )  # the library takes its cache as an argument
    d = prepare_mod.default_data_dir(tmp_path)
    d.mkdir(parents=True)
    (d / "tokenizer.json").write_text("{}")  # what an older lmlab's killed prepare left: no meta.json
    (d / ".train.bin.tmp").write_bytes(b"\0" * 10)
    calls = []
    monkeypatch.setattr(prepare_mod, "prepare", lambda *a, **k: calls.append(k))
    assert prepare_mod.ensure_default_data(progress=False, cache=tmp_path) == d
    assert calls == [{"progress": False, "overwrite": True, "cache": tmp_path}] and not d.exists()
    d.mkdir()
    (d / "mine.txt").write_text("not lmlab's")
    prepare_mod.ensure_default_data(progress=False, cache=tmp_path)
    assert (d / "mine.txt").read_text() == "not lmlab's"  # left for check_output_dir to refuse
    assert not (tmp_path / "not-read").exists()


def test_the_cache_is_an_argument_and_the_cli_reads_the_environment(tmp_path, monkeypatch):
    from lmlab.data.corpus import cache_dir

    assert cache_dir(tmp_path) == tmp_path and cache_dir() == Path.home() / ".cache" / "lmlab"
    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert env_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("LMLAB_CACHE")
    assert env_cache_dir() == tmp_path / "xdg" / "lmlab"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert env_cache_dir() is None


# -- any Hugging Face tokenizer (issue 14) ---------------------------------------------------------


@pytest.mark.slow
def test_an_older_lmlab_tokenizer_without_the_eos_template_gives_the_same_shards(
    prepared, small_corpus, tmp_path
):
    """lmlab's tokenizers now append </s> themselves (like T5's); prepare must not double it, and one
    saved before (no post-processor) must still give byte-identical shards."""
    spec = json.loads((prepared.out_dir / "tokenizer.json").read_text())
    assert spec["post_processor"]["type"] == "TemplateProcessing"
    spec["post_processor"] = None
    old = tmp_path / "old"
    old.mkdir()
    (old / "tokenizer.json").write_text(json.dumps(spec))
    res = prepare([small_corpus], tmp_path / "out", tokenizer=old, val_fraction=0.1, progress=False)
    for split in ("train", "val"):
        assert res.meta[split]["sha256"] == prepared.meta[split]["sha256"]
    assert res.meta["tokenizer"]["vocab_sha256"] == prepared.meta["tokenizer"]["vocab_sha256"]
    assert res.meta["tokenizer"]["document_end"] == "eos appended"


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    from hf_tokenizer_helpers import gpt2_like, t5_like

    root = tmp_path_factory.mktemp("hf")
    return {"t5": t5_like(root / "t5"), "gpt2": gpt2_like(root / "gpt2")}


def _docs(ids: np.ndarray, end: int) -> list[list[int]]:
    return [d.tolist() for d in split_docs(ids, end)]


@pytest.mark.parametrize("kind", ["t5", "gpt2"])
def test_prepare_frames_documents_with_the_tokenizers_own_specials(hf_dirs, tmp_path, kind):
    from tokenizers import Tokenizer

    corpus = write_corpus(tmp_path / "c.txt", 60, seed=1)
    d = hf_dirs[kind]
    res = prepare([corpus], tmp_path / "out", tokenizer=d, val_fraction=0.0, progress=False)
    meta = res.meta
    out = tmp_path / "out"
    assert meta["tokenizer"]["layout"] == "huggingface" and meta["tokenizer"]["trained"] is False
    assert {p.name for p in out.iterdir()} == {"tokenizer.json", "tokenizer_config.json", "train.bin", "val.bin",
                                               "meta.json"}  # fmt: skip
    raw = Tokenizer.from_file(str(d / "tokenizer.json"))
    ids = np.asarray(load_tokens(out))
    docs = list(iter_documents(corpus))
    eos = meta["special_ids"]["eos"]
    if kind == "t5":  # its post-processor ends each document with </s>: nothing appended
        assert meta["tokenizer"]["document_end"] == "the tokenizer's own special tokens" and eos == 1
        want = [raw.encode(t).ids for t in docs]
    else:  # GPT-2's adds nothing: <|endoftext|> is appended, and there is no pad
        assert meta["tokenizer"]["document_end"] == "eos appended" and meta["special_ids"]["pad"] is None
        want = [raw.encode(t).ids + [eos] for t in docs]
    assert _docs(ids, eos) == want
    # The saved files load back as the same tokenizer, which the objectives read.
    back = load_tokenizer(out)
    from lmlab.data.tokenizer import vocab_sha256

    assert vocab_sha256(back) == vocab_sha256(load_tokenizer(d)) == meta["tokenizer"]["vocab_sha256"]


def test_a_tokenizer_without_eos_or_framing_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    corpus = write_corpus(tmp_path / "c.txt", 20, seed=2)
    words = sorted({w for t in iter_documents(corpus) for w in t.split()})
    t = Tokenizer(
        models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="[UNK]")
    )
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    (tmp_path / "tok").mkdir()
    t.save(str(tmp_path / "tok" / "tokenizer.json"))
    with pytest.raises(LmlabError, match="no end-of-sequence token and adds no special tokens") as e:
        prepare([corpus], tmp_path / "out", tokenizer=tmp_path / "tok", progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
