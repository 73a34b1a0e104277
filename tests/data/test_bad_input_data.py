"""Bad inputs to ``lmlab prepare``, through the real CLI in a subprocess.

Each case runs the command in a prepared world of files (a corpus, a prepared directory, a
training run, a model, a directory of the user's notes, damaged corpora) and asserts exit status
2, one ``error:`` line naming the problem, no traceback, and that nothing in the world changed:
no file touched, no directory or temporary file left (issue 12: never lose a user's work, never a
traceback).
"""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
from pathlib import Path

import pytest
from lmlab_cli_harness import assert_one_line_error, run_lmlab, tmpfs, tree_hashes
from prepare_helpers import (
    english_docs,
    fake_model_dir,
    fake_quantized_dir,
    fake_run_dir,
    tree_entries,
    write_corpus,
)

VOCAB = ["--vocab-size", "300", "--no-progress"]


def _damaged_gzips(w: Path) -> None:
    text = ("\n\n".join(english_docs(400, seed=3)) + "\n").encode()
    good = gzip.compress(text)
    bad_member = bytearray(gzip.compress(text))
    bad_member[10] = 0xFF  # the first deflate block's header: block type 3 does not exist
    # A good member first, so the damage is met in the middle of the file (zlib.error there).
    (w / "corrupt.txt.gz").write_bytes(good + bytes(bad_member))
    (w / "truncated.txt.gz").write_bytes(good[: len(good) // 2])  # EOFError


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    w = tmp_path_factory.mktemp("world")
    write_corpus(w / "corpus.txt", 300)
    r = run_lmlab(["prepare", "--corpus", str(w / "corpus.txt"), "--out", str(w / "prepared"), *VOCAB])
    assert r.returncode == 0, r.stderr
    (w / "corpusdir").mkdir()
    write_corpus(w / "corpusdir" / "a.txt", 50, seed=1)
    fake_run_dir(w / "run")
    fake_model_dir(w / "model")
    fake_quantized_dir(w / "quantized")
    (w / "link").symlink_to(w / "prepared")
    (w / "user").mkdir()
    (w / "user" / "notes.txt").write_text("my notes\n")
    (w / "blank.txt").write_text("\n  \n\t\n")
    (w / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    (w / "notatok.json").write_text("{not json")
    r = random.Random(0)
    han = [chr(0x4E00 + i) for i in range(3000)]
    (w / "cjk.txt").write_text(
        "\n\n".join("".join(r.choice(han) for _ in range(200)) for _ in range(100)) + "\n", encoding="utf-8"
    )
    (w / "binary.bin").write_bytes(r.randbytes(200_000))
    _damaged_gzips(w)
    return w


# (id, argv with {w} for the world directory, words the error line must name, cwd under the world)
CASES = [
    ("missing-corpus", ["--corpus", "{w}/nope.txt", "--out", "{w}/o"], ["nope.txt", "does not exist"], None),
    ("typo-over-prepared", ["--corpus", "{w}/corpus.tx", "--out", "{w}/prepared", "--overwrite"],
     ["corpus.tx", "does not exist"], None),
    ("empty-corpus-over-prepared", ["--corpus", "{w}/blank.txt", "--out", "{w}/prepared", "--overwrite"],
     ["empty", "blank.txt"], None),
    ("bad-tokenizer-over-prepared",
     ["--corpus", "{w}/corpus.txt", "--out", "{w}/prepared", "--overwrite", "--tokenizer", "{w}/notatok.json"],
     ["notatok.json", "not a valid tokenizer.json"], None),
    ("no-tokenizer-there", ["--corpus", "{w}/corpus.txt", "--out", "{w}/o", "--tokenizer", "{w}/user"],
     ["no tokenizer", "user"], None),
    ("prepared-without-overwrite", ["--corpus", "{w}/corpus.txt", "--out", "{w}/prepared"],
     ["prepared", "--overwrite"], None),
    ("training-run", ["--corpus", "{w}/corpus.txt", "--out", "{w}/run", "--overwrite"], ["training run"], None),
    ("model-dir", ["--corpus", "{w}/corpus.txt", "--out", "{w}/model", "--overwrite"], ["saved model"], None),
    ("quantized-dir", ["--corpus", "{w}/corpus.txt", "--out", "{w}/quantized", "--overwrite"],
     ["quantized model"], None),
    ("users-dir", ["--corpus", "{w}/corpus.txt", "--out", "{w}/user", "--overwrite"], ["not empty"], None),
    ("out-is-the-corpus", ["--corpus", "{w}/corpus.txt", "--out", "{w}/corpus.txt"], ["holds the input"], None),
    ("out-holds-the-corpus", ["--corpus", "{w}/corpusdir/a.txt", "--out", "{w}/corpusdir"],
     ["holds the input"], None),
    ("out-inside-corpus-dir", ["--corpus", "{w}/corpusdir", "--out", "{w}/corpusdir/o"],
     ["inside the input"], None),
    ("out-is-a-file", ["--corpus", "{w}/corpus.txt", "--out", "{w}/user/notes.txt"],
     ["not a directory"], None),
    ("out-under-a-file", ["--corpus", "{w}/corpus.txt", "--out", "{w}/user/notes.txt/o"],
     ["under the file"], None),
    ("out-is-a-symlink", ["--corpus", "{w}/corpus.txt", "--out", "{w}/link", "--overwrite"],
     ["symbolic link"], None),
    ("out-is-cwd", ["--corpus", "{w}/corpus.txt", "--out", "."], ["current directory"], "corpusdir"),
    ("cjk-vocab-too-small", ["--corpus", "{w}/cjk.txt", "--out", "{w}/o", "--vocab-size", "1000"],
     ["--vocab-size 1000", "distinct characters", "bpe"], None),
    ("binary-file", ["--corpus", "{w}/binary.bin", "--out", "{w}/o", "--vocab-size", "1000"],
     ["--vocab-size", "distinct characters", "not UTF-8"], None),
    ("unk-with-foreign-tokenizer", ["--corpus", "{w}/cjk.txt", "--out", "{w}/o", "--tokenizer", "{w}/prepared"],
     ["<unk>", "tokenizer"], None),
    ("gzip-corrupt-mid-file", ["--corpus", "{w}/corrupt.txt.gz", "--out", "{w}/o"], ["corrupt.txt.gz", "gzip"],
     None),
    ("gzip-truncated", ["--corpus", "{w}/truncated.txt.gz", "--out", "{w}/o"], ["truncated.txt.gz", "gzip"],
     None),
    ("bad-jsonl", ["--corpus", "{w}/bad.jsonl", "--out", "{w}/o"], ["bad.jsonl:2", "text"], None),
    *[
        (f"train-mb-{v}", ["--corpus", "{w}/corpus.txt", "--out", "{w}/o", "--tokenizer-train-mb", v],
         ["--tokenizer-train-mb", v], None)
        for v in ("nan", "inf", "0", "-1")
    ],
    ("train-mb-tiny", ["--corpus", "{w}/corpus.txt", "--out", "{w}/o", "--tokenizer-train-mb", "1e-9"],
     ["--tokenizer-train-mb", "none of"], None),
    *[
        (f"val-fraction-{v}", ["--corpus", "{w}/corpus.txt", "--out", "{w}/o", "--val-fraction", v],
         ["--val-fraction", v], None)
        for v in ("nan", "-0.1", "1", "1.5", "inf")
    ],
    *[
        (f"vocab-size-{v}", ["--corpus", "{w}/corpus.txt", "--out", "{w}/o", "--vocab-size", v],
         ["--vocab-size", v], None)
        for v in ("0", "-5", "100", str(2**32 + 1), "1000000000")
    ],
    ("vocab-size-not-int", ["--corpus", "{w}/corpus.txt", "--out", "{w}/o", "--vocab-size", "1e4"],
     ["--vocab-size", "invalid int"], None),
    ("doc-sep-bogus", ["--corpus", "{w}/corpus.txt", "--out", "{w}/o", "--doc-sep", "para"],
     ["--doc-sep", "invalid choice"], None),
]  # fmt: skip


@pytest.mark.slow  # each case is a fresh `python -m lmlab` process
@pytest.mark.parametrize(("case", "argv", "words", "cwd"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_touches_nothing(world, case, argv, words, cwd):
    before, entries = tree_hashes(world), tree_entries(world)
    args = [a.replace("{w}", str(world)) for a in argv]
    if "--vocab-size" not in args:
        args += ["--vocab-size", "300"]
    r = run_lmlab(["prepare", *args, "--no-progress"], cwd=world / cwd if cwd else None)
    assert_one_line_error(r, *words)
    assert tree_hashes(world) == before
    assert tree_entries(world) == entries  # no directory, no temporary file left behind


def test_out_on_a_read_only_file_system(world, tmp_path):
    with tmpfs(tmp_path / "ro", "ro,size=1m") as mnt:
        r = run_lmlab(["prepare", "--corpus", str(world / "corpus.txt"), "--out", str(mnt / "o"), *VOCAB])
        assert_one_line_error(r, "read-only", str(mnt))
        assert os.listdir(mnt) == []


def _bigger_corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "bigger.txt", 3000, seed=5)


def test_full_disk_by_file_size_limit_leaves_the_old_directory(world, tmp_path):
    """RLIMIT_FSIZE: writes past the limit fail with EFBIG, as a full disk would."""
    out = tmp_path / "prepared"
    shutil.copytree(world / "prepared", out)
    before = tree_hashes(out)
    limit = 60_000  # the old train.bin is smaller; the new one is not
    assert max((out / n).stat().st_size for n in ("train.bin", "tokenizer.json")) < limit
    r = run_lmlab(
        ["prepare", "--corpus", str(_bigger_corpus(tmp_path)), "--out", str(out), "--overwrite", *VOCAB],
        fsize_limit=limit,
    )
    line = assert_one_line_error(r, "no space left", str(out), "wrote", "nothing was changed")
    assert int(line.split("wrote ")[1].split(" ")[0].replace(",", "")) >= limit
    assert tree_hashes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bigger.txt", "prepared"]  # no temp dir left


def test_full_disk_on_a_small_tmpfs_leaves_the_old_directory(world, tmp_path):
    with tmpfs(tmp_path / "small", "size=160k") as mnt:
        out = mnt / "prepared"
        shutil.copytree(world / "prepared", out)
        before = tree_hashes(out)
        corpus = _bigger_corpus(tmp_path)
        r = run_lmlab(["prepare", "--corpus", str(corpus), "--out", str(out), "--overwrite", *VOCAB])
        assert_one_line_error(r, "no space left", str(mnt), "wrote", "nothing was changed")
        assert tree_hashes(out) == before
        assert os.listdir(mnt) == ["prepared"]


def test_val_fraction_zero_is_a_training_only_dataset(world, tmp_path):
    r = run_lmlab(["prepare", "--corpus", str(world / "corpus.txt"), "--out", str(tmp_path / "o"),
                   "--val-fraction", "0", *VOCAB])  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "no validation split" in r.stdout
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["val"] == {**meta["val"], "tokens": 0, "documents": 0} and meta["val_fraction"] == 0
    assert meta["train"]["documents"] == 300 and (tmp_path / "o" / "val.bin").stat().st_size == 0
