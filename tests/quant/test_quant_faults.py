"""``lmlab quantize`` under faults: SIGKILL at several points, a full disk, a read-only file system.

A killed run leaves either nothing or the earlier complete output, never a directory that
``load_quantized`` accepts but that is incomplete; the re-run gives exactly the uninterrupted
run's files. A full disk is one line and leaves no partial output or temporary directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lmlab_cli_harness import assert_one_line_error, run_lmlab, tmpfs, tree_hashes
from quant_helpers import tiny_gpt2

from lmlab.errors import LmlabError
from lmlab.quant import load_quantized

POLL_S = 0.002
POLL_LIMIT = 60_000  # polls, about two minutes: a hung child, not a slow one


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("model") / "gpt2"
    tiny_gpt2().save_pretrained(d)
    (d / "tokenizer.json").write_text('{"stub": true}\n')
    return d


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory) -> Path:
    """An uninterrupted run's output."""
    out = tmp_path_factory.mktemp("ref") / "q"
    r = run_lmlab(["quantize", str(model_dir), "--method", "nf4", "--double-quant", "--out", str(out)])
    assert r.returncode == 0, r.stderr
    return out


def _argv(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lmlab", "quantize", str(model_dir), "--method", "nf4", "--double-quant",
            "--out", str(out), *extra]  # fmt: skip


def _temps(parent: Path, out: Path) -> list[Path]:
    return sorted(parent.glob(f".{out.name}.*.tmp"))


def _wait_for(proc: subprocess.Popen, ready) -> bool:
    """Poll until ``ready()`` or the process ends; True if ready while it still ran."""
    for _ in range(POLL_LIMIT):
        if ready():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(POLL_S)
    raise AssertionError("the quantize process neither finished nor reached the kill point")


def _kill_at(model_dir: Path, out: Path, point: str, *extra: str) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(_argv(model_dir, out, *extra), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        if point.startswith("sleep-"):
            time.sleep(float(point.removeprefix("sleep-")))
        elif point == "temp-dir":
            _wait_for(proc, lambda: _temps(out.parent, out))
        elif point == "weights-in-temp":
            _wait_for(proc, lambda: any((t / "model.safetensors").exists() for t in _temps(out.parent, out)))
        elif point == "manifest-in-temp":
            _wait_for(proc, lambda: any((t / "manifest.json").exists() for t in _temps(out.parent, out)))
        else:  # pragma: no cover
            raise ValueError(point)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        proc.wait()


def _assert_old_or_nothing(out: Path, reference: dict[str, str], existed: bool) -> None:
    """After a kill: the earlier complete output, or no output at all, never a partial one."""
    if not out.exists():
        assert not existed, "a killed --overwrite run lost the earlier output"
        return
    assert tree_hashes(out) == reference, "a killed run left an incomplete output in place"
    load_quantized(out)


@pytest.mark.slow
@pytest.mark.parametrize(
    "point,existing",
    [
        ("sleep-0.5", False),  # still importing
        ("temp-dir", False),  # the temporary directory has just appeared
        ("weights-in-temp", False),  # safetensors is being written
        ("manifest-in-temp", True),  # late in the write, with an earlier output to keep
    ],
)
def test_sigkill_then_rerun_gives_the_uninterrupted_output(model_dir, reference, tmp_path, point, existing):
    out = tmp_path / "q"
    want = tree_hashes(reference)
    if existing:
        shutil.copytree(reference, out)
    _kill_at(model_dir, out, point, *(["--overwrite"] if existing else []))
    _assert_old_or_nothing(out, want, existed=existing)
    # The killed writer's temporary (dead PID) is refused as incomplete, unless it is complete.
    for t in _temps(tmp_path, out):
        try:
            load_quantized(t)
        except LmlabError:
            continue
        assert tree_hashes(t) == want
    r = run_lmlab(_argv(model_dir, out, *(["--overwrite"] if out.exists() else []))[3:])
    assert r.returncode == 0, r.stderr
    assert tree_hashes(out) == want
    assert _temps(tmp_path, out) == [], "the re-run did not remove the dead writer's temporary"


def _assert_disk_full(r, out: Path, parent: Path) -> None:
    assert_one_line_error(r, "no space left", str(out))
    assert not out.exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(".")], list(parent.iterdir())


@pytest.mark.slow
def test_full_disk_is_one_line_and_leaves_nothing(model_dir, tmp_path):
    """A 32 KiB tmpfs (the output needs about 50 KiB); where mounting is refused, a file-size limit."""
    try:
        with tmpfs(tmp_path / "mnt", "size=32k") as mnt:
            out = mnt / "q"
            _assert_disk_full(run_lmlab(_argv(model_dir, out)[3:]), out, mnt)
            return
    except pytest.skip.Exception:
        pass
    out = tmp_path / "q"
    _assert_disk_full(run_lmlab(_argv(model_dir, out)[3:], fsize_limit=20_000), out, tmp_path)


def test_read_only_file_system_is_one_line_before_loading(model_dir, tmp_path):
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        r = run_lmlab(_argv(model_dir, ro / "q")[3:])
        assert_one_line_error(r, "--out", "read-only")
        assert list(ro.iterdir()) == []
