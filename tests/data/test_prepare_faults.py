"""``lmlab prepare`` killed at several points (SIGKILL: no cleanup code runs), then run again.

After each kill the prepared directory it was replacing is intact (or, if the kill came after
the swap, the complete new one); the re-run with ``--overwrite`` removes what the killed run left
and gives exactly the output of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lmlab_cli_harness import assert_one_line_error, run_lmlab, tree_hashes
from prepare_helpers import dead_pid, write_corpus

ARGS = ["--vocab-size", "400", "--no-progress"]
POLL_S = 0.002
MAX_POLLS = 100_000  # a bound, not a timing: the process normally reaches each point long before


def _content(d: Path) -> tuple[dict[str, str], dict]:
    """A prepared directory's files and meta.json, without meta.json's "created" time."""
    hashes = {k: v for k, v in tree_hashes(d).items() if k != "meta.json"}
    meta = json.loads((d / "meta.json").read_text())
    meta.pop("created")
    return hashes, meta


def _temps(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(f".{name}.") and p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    old_corpus = write_corpus(d / "old.txt", 400, seed=7)
    corpus = write_corpus(d / "new.txt", 9000, seed=8)  # 3 tokenizing batches
    r = run_lmlab(["prepare", "--corpus", str(old_corpus), "--out", str(d / "old"), *ARGS])
    assert r.returncode == 0, r.stderr
    r = run_lmlab(["prepare", "--corpus", str(corpus), "--out", str(d / "reference"), *ARGS])
    assert r.returncode == 0, r.stderr
    return d, corpus


def _kill_when(proc: subprocess.Popen, reached) -> bool:
    """SIGKILL ``proc`` once ``reached()`` is true; False if it finished first."""
    for _ in range(MAX_POLLS):
        if proc.poll() is not None:
            return False
        if reached():
            proc.kill()
            proc.wait()
            return True
        time.sleep(POLL_S)
    proc.kill()
    proc.wait()
    raise AssertionError("the kill point was never reached")


def _temp_has(parent: Path, name: str, file: str, min_bytes: int = 0):
    def reached() -> bool:
        for t in _temps(parent, name):
            f = t / file
            try:
                if f.stat().st_size >= min_bytes:
                    return True
            except OSError:
                continue
        return False

    return reached


@pytest.mark.slow
def test_sigkill_at_any_point_leaves_the_old_directory_and_a_rerun_matches(setup, tmp_path):
    d, corpus = setup
    old = _content(d / "old")
    reference = _content(d / "reference")
    out = tmp_path / "data"
    points = {
        "right-after-start": lambda: True,
        "temp-dir-made": lambda: bool(_temps(tmp_path, "data")),
        "tokenizer-written": _temp_has(tmp_path, "data", "tokenizer.json"),
        "shard-growing": _temp_has(tmp_path, "data", ".train.bin.tmp", min_bytes=1),
        "meta-written": _temp_has(tmp_path, "data", "meta.json"),
    }
    killed = []
    for point, reached in points.items():
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(d / "old", out)
        proc = subprocess.Popen(
            [sys.executable, "-m", "lmlab", "prepare", "--corpus", str(corpus), "--out", str(out),
             "--overwrite", *ARGS],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )  # fmt: skip
        if _kill_when(proc, reached):
            killed.append(point)
        # The old directory, byte for byte, unless the kill came after the swap.
        assert _content(out) in (old, reference), point
        r = run_lmlab(["prepare", "--corpus", str(corpus), "--out", str(out), "--overwrite", *ARGS])
        assert r.returncode == 0, (point, r.stderr)
        assert _content(out) == reference, point
        assert sorted(p.name for p in tmp_path.iterdir()) == ["data"], point  # nothing left beside it
    # The points inside the work were hit (the last one can be missed by a fast finish).
    assert {"right-after-start", "temp-dir-made", "tokenizer-written", "shard-growing"} <= set(killed)


def test_stale_temp_dirs_of_dead_writers_are_removed_and_live_ones_kept(setup, tmp_path):
    d, _ = setup
    small = write_corpus(tmp_path / "small.txt", 200, seed=9)
    dead = tmp_path / f".data.{dead_pid()}.k3j4h5.tmp"
    live = tmp_path / f".data.{os.getpid()}.x9y8z7.tmp"  # this test process: alive
    old_style = tmp_path / f".other.{dead_pid()}.a1b2c3.tmp"  # a dead atomic_open's file
    for t in (dead, live):
        t.mkdir()
        (t / "train.bin").write_bytes(b"\0" * 100)
    old_style.write_bytes(b"x")
    r = run_lmlab(["prepare", "--corpus", str(small), "--out", str(tmp_path / "data"), *ARGS])
    assert r.returncode == 0, r.stderr
    assert not dead.exists() and not old_style.exists() and live.exists()


def test_a_swap_killed_between_its_renames_is_undone_before_anything_else(setup, tmp_path):
    """Killed after ``out`` became ``.out.old`` and before the new one was renamed in."""
    d, corpus = setup
    shutil.copytree(d / "old", tmp_path / ".data.old")
    before = tree_hashes(tmp_path / ".data.old")
    r = run_lmlab(["prepare", "--corpus", str(corpus), "--out", str(tmp_path / "data"), *ARGS])
    # The old directory is back in place, so without --overwrite it is not replaced.
    assert_one_line_error(r, "--overwrite")
    assert tree_hashes(tmp_path / "data") == before and not (tmp_path / ".data.old").exists()


@pytest.mark.slow
@pytest.mark.parametrize("point", ["training", "tokenizing"])
def test_ctrl_c_leaves_the_old_directory_and_no_temp(setup, tmp_path, point):
    d, corpus = setup
    out = tmp_path / "data"
    shutil.copytree(d / "old", out)
    before = tree_hashes(out)
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmlab", "prepare", "--corpus", str(corpus), "--out", str(out), "--overwrite", *ARGS],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    reached = (
        (lambda: bool(_temps(tmp_path, "data")))
        if point == "training"
        else _temp_has(tmp_path, "data", ".train.bin.tmp", min_bytes=1)
    )
    for _ in range(MAX_POLLS):
        if proc.poll() is not None or reached():
            break
        time.sleep(POLL_S)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate()
    if proc.returncode == 0:
        pytest.skip("prepare finished before the signal arrived")
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "lmlab prepare: interrupted"
    assert tree_hashes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
