import gzip
import hashlib
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prepare_helpers import dead_pid

from lmlab.cli import env_cache_dir  # the session's cache (tests/conftest.py sets $LMLAB_CACHE)
from lmlab.data.corpus import (
    MAX_DOC_CHARS,
    SourceStats,
    default_corpus_path,
    iter_documents,
    resolve_sources,
)
from lmlab.errors import LmlabError


def docs_of(path, **kw):
    return list(iter_documents(path, **kw))


def test_blank_lines_split_documents(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes(b"First line\nsame doc\n\n\n  \t\nSecond doc\r\n\r\nThird")
    assert docs_of(p) == ["First line\nsame doc", "Second doc", "Third"]
    assert docs_of(p, doc_sep="line") == ["First line", "same doc", "Second doc", "Third"]


def test_gzip_and_jsonl_give_the_same_documents(tmp_path):
    text = "one two\n\nthree four\n"
    (tmp_path / "a.txt").write_text(text)
    with gzip.open(tmp_path / "b.txt.gz", "wt") as f:
        f.write(text)
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"text": "one two", "id": 1}) + "\n\n" + json.dumps({"text": "three four"}) + "\n"
    )
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "one two"}) + "\n" + json.dumps({"text": " three four "}) + "\n")
    for name in ("a.txt", "b.txt.gz", "c.jsonl", "d.jsonl.gz"):
        assert docs_of(tmp_path / name) == ["one two", "three four"], name


def test_stats_hash_the_whole_file(tmp_path):
    p = tmp_path / "a.txt"
    data = b"alpha\n\nbeta\n\n\n"
    p.write_bytes(data)
    st = SourceStats(str(p))
    assert docs_of(p, stats=st) == ["alpha", "beta"]
    assert st.bytes == len(data)
    assert st.sha256 == hashlib.sha256(data).hexdigest()
    assert st.documents == 2


def test_undecodable_bytes_are_replaced_and_counted(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_bytes(
        b"caf\xe9 ok\n\n\xff\xfe tail \xe2\x82\xac"
    )  # latin-1 e-acute, two stray bytes, a valid euro
    st = SourceStats(str(p))
    docs = docs_of(p, stats=st)
    assert docs == ["caf\ufffd ok", "\ufffd\ufffd tail \u20ac"]
    assert st.undecodable_bytes == 3


_PIECES = [b"a", b"\n", b"\r", b"\r\n", b" ", b"\xe9", b"\xff", b"\xe2\x82\xac", b"\xe2\x82", b"\xf0\x9f\x98\x80",
           b"\xef\xbf\xbd", b"\xc3", b"\xed\xa0\x80", b"\x00"]  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(pieces=st.lists(st.sampled_from(_PIECES), max_size=200), chunk=st.integers(1, 9))
def test_decoding_is_textiowrapper_with_replace_and_counts_every_bad_byte(tmp_path_factory, pieces, chunk):
    """Same text as io.TextIOWrapper(errors="replace", newline=None) at any chunk boundary; the count
    is what a counting error handler sees (registered here, in the test, not by lmlab)."""
    import codecs
    import io
    from unittest import mock

    from lmlab.data import corpus

    data = b"".join(pieces)
    seen = []

    def count(exc):
        seen.append(exc.end - exc.start)
        return "\ufffd", exc.end

    codecs.register_error("lmlab-test-count", count)
    want = io.TextIOWrapper(
        io.BytesIO(data), encoding="utf-8", errors="lmlab-test-count", newline=None
    ).read()
    stats = SourceStats("x")
    with mock.patch.object(corpus, "_READ_CHUNK", chunk):
        reader = corpus._TextReader(io.BufferedReader(io.BytesIO(data), 1), stats)
        got = "".join(iter(lambda: reader.readline(5), ""))
    assert got == want and stats.undecodable_bytes == sum(seen)


def test_nothing_is_registered_at_import():
    """No codec error handler of lmlab's exists after importing it (``lmlab --help`` imports corpus)."""
    import codecs
    import subprocess
    import sys

    code = "import codecs, lmlab.cli, lmlab.data.corpus; lmlab.cli.build_parser(); codecs.lookup_error('lmlab-count')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode != 0 and "unknown error handler name 'lmlab-count'" in r.stderr
    with pytest.raises(LookupError):
        codecs.lookup_error("lmlab-count")


def test_long_documents_are_cut(tmp_path):
    p = tmp_path / "long.txt"
    line = "word " * 1000 + "\n"  # 5001 chars per line, no blank lines at all
    p.write_text(line * 100)
    docs = docs_of(p)
    assert len(docs) > 1
    assert all(len(d) <= 2 * MAX_DOC_CHARS for d in docs)
    assert " ".join(docs).split() == (line * 100).split()  # cut at line ends: no word is split


def test_bad_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(LmlabError, match=r"x.jsonl:2: .*\"text\""):
        docs_of(p)
    p.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(LmlabError, match=r"x.jsonl:2: not valid JSON"):
        docs_of(p)


def test_resolve_sources(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/b.txt", "d/a.md", "d/sub/c.rst", "d/sub/e.jsonl", "d/sub/f.txt.gz", "d/skip.py"):
        (tmp_path / name).write_text("x")
    got = [p.relative_to(tmp_path).as_posix() for p in resolve_sources([tmp_path / "d"])]
    assert got == ["d/a.md", "d/b.txt", "d/sub/c.rst", "d/sub/e.jsonl", "d/sub/f.txt.gz"]
    with pytest.raises(LmlabError, match="does not exist"):
        resolve_sources([tmp_path / "missing.txt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmlabError, match="holds no"):
        resolve_sources([tmp_path / "empty"])


@pytest.mark.slow
def test_default_corpus_is_english_from_python():
    p = default_corpus_path(env_cache_dir())
    assert p.is_file() and p.stat().st_size > 500_000
    assert default_corpus_path(env_cache_dir()) == p  # cached
    docs = docs_of(p)
    assert len(docs) > 3000
    text = " ".join(docs[:200]).lower()
    for word in (" the ", " and ", " of "):
        assert word in text


def test_a_huge_jsonl_record_is_cut_like_plain_text(tmp_path):
    lines = [f"line {i} of a record with no blank lines, about whales and the sea" for i in range(60_000)]
    text = "\n".join(lines)  # about 4 MB
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"text": text}) + "\n" + json.dumps({"text": "small"}) + "\n"
    )
    docs = docs_of(tmp_path / "a.jsonl")
    assert len(docs) > 30 and all(len(d) <= MAX_DOC_CHARS + 100 for d in docs)
    assert docs[:-1] == docs_of(tmp_path / "a.txt") and docs[-1] == "small"
    assert "\n".join(docs[:-1]) == text  # cut at line ends: nothing lost, nothing split


def test_an_endless_jsonl_line_is_refused(tmp_path, monkeypatch):
    import lmlab.data.corpus as corpus

    monkeypatch.setattr(corpus, "MAX_RECORD_CHARS", 1000)
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"text": "y" * 2000}) + "\n")
    with pytest.raises(LmlabError, match=r"x.jsonl:2: a JSON Lines record longer than 1,000 characters"):
        docs_of(p)


def test_damaged_gzip_names_the_file(tmp_path):
    good = gzip.compress(b"one\n\ntwo\n" * 1000)
    bad = bytearray(good)
    bad[10] = 0xFF  # an invalid deflate block type: zlib.error, not an OSError
    (tmp_path / "c.txt.gz").write_bytes(good + bytes(bad))
    (tmp_path / "t.txt.gz").write_bytes(good[: len(good) // 2])
    for name in ("c.txt.gz", "t.txt.gz"):
        with pytest.raises(LmlabError, match=rf"{name} \(a damaged or truncated gzip file\)"):
            docs_of(tmp_path / name)


@pytest.mark.slow  # prepares the default corpus
def test_default_corpus_lookup_removes_dead_writers_temps():
    cache = default_corpus_path(env_cache_dir()).parent  # extracted once per session
    dead = cache / f".default-corpus-py3.jsonl.{dead_pid()}.abc123.tmp"
    live = cache / f".default-corpus-py3.jsonl.{os.getpid()}.abc123.tmp"
    dead.write_text("half an extraction")
    live.write_text("another process is writing this")
    try:
        assert default_corpus_path(env_cache_dir()).is_file()
        assert not dead.exists() and live.exists()
    finally:
        live.unlink()
