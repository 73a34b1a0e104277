"""The command line as a user meets it: help for every command, one-line errors, exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lmlab.cli import COMMANDS


def lmlab(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lmlab", *args], capture_output=True, text=True, cwd=cwd, check=False
    )


def test_top_level_help_lists_every_command():
    r = lmlab("--help")
    assert r.returncode == 0
    for name in COMMANDS:
        assert name in r.stdout


@pytest.mark.slow  # one fresh interpreter per command
@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_has_help(name):
    r = lmlab(name, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: lmlab " + name)


def test_no_command_prints_usage_and_fails():
    r = lmlab()
    assert r.returncode == 2 and "usage:" in r.stdout


def assert_one_line_error(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("lmlab ")
    for w in words:
        assert w in lines[0], lines[0]


def test_prepare_bad_inputs_are_one_line_errors(tmp_path):
    assert_one_line_error(
        lmlab("prepare", "--corpus", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")),
        "missing.txt",
        "does not exist",
    )
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n   \n")
    assert_one_line_error(
        lmlab(
            "prepare",
            "--corpus",
            str(blank),
            "--out",
            str(tmp_path / "o"),
            "--vocab-size",
            "300",
            "--no-progress",
        ),
        "empty",
    )
    real = tmp_path / "real.txt"
    real.write_text("Some words here.\n\nAnd more words there.\n")
    assert_one_line_error(
        lmlab("prepare", "--corpus", str(real), "--out", str(tmp_path / "o"), "--vocab-size", "100"),
        "--vocab-size 100",
        "too small",
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    assert_one_line_error(lmlab("prepare", "--corpus", str(bad), "--out", str(tmp_path / "o")), "bad.jsonl:2")
    assert not (tmp_path / "o" / "meta.json").exists()


def test_prepare_then_reuse_tokenizer(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(
        "".join(f"Paragraph {i} says something about ships, whales and the sea.\n\n" for i in range(400))
    )
    r = lmlab(
        "prepare", "--corpus", str(text), "--out", str(tmp_path / "a"), "--vocab-size", "300", "--no-progress"
    )
    assert r.returncode == 0, r.stderr
    assert "train" in r.stdout and "tokens" in r.stdout
    r = lmlab(
        "prepare", "--corpus", str(text), "--out", str(tmp_path / "b"), "--tokenizer", str(tmp_path / "a")
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "a" / "train.bin").read_bytes() == (tmp_path / "b" / "train.bin").read_bytes()


def test_a_cache_variable_that_points_at_a_file_is_named_in_one_line(tmp_path, monkeypatch):
    from lmlab.cli import env_cache_dir
    from lmlab.errors import LmlabError

    (tmp_path / "f").write_text("mine")
    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path / "f"))
    with pytest.raises(
        LmlabError, match=r"^\$LMLAB_CACHE points at .*/f, but .*/f is a file, not a directory$"
    ):
        env_cache_dir()
    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path / "f" / "sub"))
    with pytest.raises(LmlabError, match=r"^\$LMLAB_CACHE points at .*/f/sub, but .*/f is a file"):
        env_cache_dir()
    monkeypatch.delenv("LMLAB_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "f"))
    with pytest.raises(LmlabError, match=r"^\$XDG_CACHE_HOME points at .*/f/lmlab, but .*/f is a file"):
        env_cache_dir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "new"))
    assert env_cache_dir() == tmp_path / "new" / "lmlab"
    assert (tmp_path / "f").read_text() == "mine"
