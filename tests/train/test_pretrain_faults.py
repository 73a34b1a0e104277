"""``lmlab pretrain`` under faults: SIGKILL at several points, a second writer, a full disk, NaN.

The kill points are events (rows in ``metrics.csv``, a checkpoint directory appearing), never
times; every resumed run must end with the uninterrupted run's losses and weights, bit for bit.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from lmlab_cli_harness import assert_one_line_error, run_lmlab, tmpfs, tree_hashes  # noqa: E402
from lmlab_train_fixtures import write_prepared  # noqa: E402

from lmlab.errors import LmlabError  # noqa: E402
from lmlab.train import PretrainConfig, pretrain  # noqa: E402
from lmlab.train.checkpoint import list_checkpoints, verify_checkpoint  # noqa: E402

ARGS = ["--model", "gpt-tiny", "--objective", "causal", "--steps", "10", "--batch-size", "4", "--seq-len", "32",
        "--save-every", "3", "--eval-every", "4", "--eval-batches", "1", "--no-progress", "--precision", "fp32",
        "--workers", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_prepared(tmp_path_factory.mktemp("data") / "prepared", train_docs=300, val_docs=40)


@pytest.fixture(scope="module")
def full_run(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "run"
    r = run_lmlab(["pretrain", "--data", str(data_dir), *ARGS, "--out", str(out)])
    assert r.returncode == 0, r.stderr
    return out


def rows(run: Path) -> list[tuple[str, str, str]]:
    p = run / "metrics.csv"
    if not p.is_file():
        return []
    with open(p, newline="") as f:
        return [(r["step"], r["loss"], r["val_loss"]) for r in csv.DictReader(f)]


def start(data_dir: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [
        sys.executable,
        "-m",
        "lmlab",
        "pretrain",
        "--data",
        str(data_dir),
        *ARGS,
        *extra,
        "--out",
        str(out),
    ]
    return subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)


def wait_for(proc: subprocess.Popen, event) -> None:
    while not event() and proc.poll() is None:
        time.sleep(0.01)  # waits for an event; nothing is timed


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "final" / "model.safetensors"))


# One run killed at each point in turn, every kill followed by a --resume that is itself killed at
# the next point: before any checkpoint, as the first checkpoint lands, between two checkpoints.
KILL_POINTS = {
    "after-1-row": lambda run: len(rows(run)) >= 1,
    "at-the-step-3-checkpoint": lambda run: 3 in [s for s, _ in list_checkpoints(run)],
    "after-8-rows": lambda run: len(rows(run)) >= 8,
}


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_is_bit_identical(data_dir, full_run, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    first = [sys.executable, "-m", "lmlab", "pretrain", "--data", str(data_dir), *ARGS, "--out", str(run)]
    cmd = first
    for name, event in KILL_POINTS.items():
        proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, env=env)
        try:
            wait_for(proc, lambda event=event: event(run))
            assert proc.poll() is None, f"the run ended before the kill point {name}"
            proc.kill()  # SIGKILL: no handler runs
            proc.wait(timeout=60)
        finally:
            proc.kill()
        cmd = [sys.executable, "-m", "lmlab", "pretrain", "--resume", str(run), "--no-progress"]
    r = run_lmlab(cmd[3:])
    assert r.returncode == 0, r.stderr
    assert rows(run) == rows(full_run)  # the same strings: bit-identical losses
    got, want = final_weights(run), final_weights(full_run)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    leftovers = [p.name for d in (run, run / "checkpoints") for p in d.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.slow  # over 3 s on 2 cores (subprocesses or several runs)
def test_stale_temps_of_dead_writers_are_removed_on_resume(data_dir, tmp_path):
    run = tmp_path / "run"
    cfg = dict(data=[str(data_dir)], out=str(run), objective="causal", model="gpt-tiny", steps=2, batch_size=4,
               seq_len=16, eval_every=2, eval_batches=1, save_every=1, progress=False, workers=0)  # fmt: skip
    pretrain(PretrainConfig(**cfg))
    pid = dead_pid()
    stale = run / "checkpoints" / f".step-00000003.{pid}.abc123.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    stale_metrics = run / f".metrics.csv.{pid}.xyz.tmp"
    stale_metrics.write_text("step\n")
    live = run / f".notes.{os.getpid()}.keep.tmp"  # a live writer's: never touched
    live.write_text("mine")
    pretrain(PretrainConfig.resume_from(run, steps=3, progress=False))
    assert not stale.exists() and not stale_metrics.exists() and live.exists()


@pytest.mark.slow  # over 3 s on 2 cores (subprocesses or several runs)
def test_a_second_writer_is_refused_and_the_first_goes_on(data_dir, tmp_path):
    run = tmp_path / "run"
    proc = start(data_dir, run, "--steps", "400", "--save-every", "1000", "--eval-every", "1000")
    try:
        wait_for(proc, lambda: len(rows(run)) >= 2)
        assert proc.poll() is None
        before = {
            k: v for k, v in tree_hashes(run).items() if k.startswith("checkpoints") or k == "config.json"
        }
        for argv in (["--data", str(data_dir), *ARGS, "--out", str(run)], ["--resume", str(run)]):
            r = run_lmlab(["pretrain", *argv])
            assert_one_line_error(r, "in use by another lmlab process", f"PID {proc.pid}")
        after = {
            k: v for k, v in tree_hashes(run).items() if k.startswith("checkpoints") or k == "config.json"
        }
        assert after == before
        n = len(rows(run))
        wait_for(proc, lambda: len(rows(run)) >= n + 2)  # it still trains
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    stopped = int(rows(run)[-1][0])
    assert verify_checkpoint(run / "checkpoints" / f"step-{stopped:08d}") is None


@pytest.mark.slow  # over 3 s on 2 cores (subprocesses or several runs)
def test_a_torn_metrics_csv_is_repaired_on_resume(data_dir, full_run, tmp_path):
    run = tmp_path / "run"
    proc = start(data_dir, run)
    try:
        wait_for(proc, lambda: len(list_checkpoints(run)) >= 2)  # step 6's checkpoint
        proc.kill()
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    # What a crash (or a second writer) leaves: a torn last row and NUL padding.
    with open(run / "metrics.csv", "ab") as f:
        f.write(b"9,3.14\r\n" + b"\x00" * 530 + b"10,2.7")
    r = run_lmlab(["pretrain", "--resume", str(run), "--no-progress"])
    assert r.returncode == 0, r.stderr
    assert rows(run) == rows(full_run)
    assert b"\x00" not in (run / "metrics.csv").read_bytes()


@pytest.mark.slow  # over 3 s on 2 cores (subprocesses or several runs)
def test_a_diverged_run_never_writes_a_checkpoint(data_dir, tmp_path):
    """--lr 1e6 goes NaN at step 2; with --log-every 100 no logged loss shows it before the save."""
    run = tmp_path / "run"
    r = run_lmlab(["pretrain", "--data", str(data_dir), *ARGS, "--lr", "1e6", "--log-every", "100",
                   "--out", str(run)])  # fmt: skip
    assert_one_line_error(r, "loss became nan", "at step 3", "no checkpoint was written")
    assert list_checkpoints(run) == [] and not (run / "final").exists()


def test_a_signal_after_divergence_writes_no_nan_checkpoint(data_dir, tmp_path):
    """Ctrl-C after the weights went NaN: refused in one line; --resume goes on from a finite step."""

    def poison(step: int, loss) -> None:
        if step == 4:  # after the step-3 checkpoint, break the weights as a diverging run would
            for p in poison.model.parameters():
                p.data.fill_(float("nan"))
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    import lmlab.train.loop as loop

    real = loop._Run._build

    def build(self):
        real(self)
        poison.model = self.s.base

    run = tmp_path / "run"
    cfg = PretrainConfig(data=[str(data_dir)], out=str(run), objective="causal", model="gpt-tiny", steps=8,
                         batch_size=4, seq_len=16, eval_every=100, eval_batches=1, save_every=3, log_every=100,
                         progress=False, workers=0)  # fmt: skip
    loop._Run._build = build
    try:
        with pytest.raises(
            LmlabError, match=r"loss became nan.*at step 5.*last good checkpoint is step-00000003"
        ):
            pretrain(cfg, on_step=poison)
    finally:
        loop._Run._build = real
    assert [s for s, _ in list_checkpoints(run)] == [3]
    resumed = pretrain(PretrainConfig.resume_from(run, progress=False))
    assert resumed.step == 8 and all(torch.isfinite(torch.tensor(loss)) for _, loss in resumed.losses)


def test_resume_refuses_changed_data_and_keeps_its_tokenizer(data_dir, tmp_path):
    import shutil

    from lmlab.data import read_tokenizer

    data = shutil.copytree(data_dir, tmp_path / "data")
    run = tmp_path / "run"
    cfg = PretrainConfig(data=[str(data)], out=str(run), objective="causal", model="gpt-tiny", steps=2,
                         batch_size=4, seq_len=16, eval_every=2, eval_batches=1, progress=False, workers=0)  # fmt: skip
    pretrain(cfg)
    identity = json.loads((run / "config.json").read_text())["resolved"]["data_identity"][str(data)]
    assert set(identity) >= {"tokenizer_sha256", "tokens", "edges_sha256"}
    tokenizer = (run / "tokenizer.json").read_bytes()
    # The same preparation again (same tokenizer, same text): the same data, so the resume goes on.
    write_prepared(data, train_docs=300, val_docs=40, tok=read_tokenizer(data_dir))
    assert pretrain(PretrainConfig.resume_from(run, steps=3, progress=False)).step == 3
    # Another tokenizer (re-prepared from other text): refused, and the run's tokenizer.json is kept.
    write_prepared(data, train_docs=300, val_docs=40, seed=5)
    with pytest.raises(LmlabError, match="changed since the run started.*tokenizer.json"):
        pretrain(PretrainConfig.resume_from(run, steps=4, progress=False))
    assert (run / "tokenizer.json").read_bytes() == tokenizer


@pytest.mark.slow  # over 3 s on 2 cores (subprocesses or several runs)
def test_no_validation_split_trains_without_a_validation_loss(data_dir, tmp_path, capsys):
    import shutil

    data = shutil.copytree(data_dir, tmp_path / "data")
    (data / "val.bin").write_bytes(b"")
    meta = json.loads((data / "meta.json").read_text())
    meta["val"] = {"tokens": 0, "documents": 0}
    (data / "meta.json").write_text(json.dumps(meta))
    run = tmp_path / "run"
    r = pretrain(PretrainConfig(data=[str(data)], out=str(run), objective="causal", model="gpt-tiny", steps=3,
                                batch_size=4, seq_len=16, eval_every=1, progress=False, workers=0))  # fmt: skip
    assert r.final_dir is not None and r.evals == []
    assert capsys.readouterr().err.count("no validation split") == 1
    with open(run / "metrics.csv", newline="") as f:
        assert [x["val_loss"] for x in csv.DictReader(f)] == ["", "", ""]
    # Mixed with a source that has one, validation runs on that source alone.
    mixed = pretrain(PretrainConfig(data=[str(data), str(data_dir)], out=str(tmp_path / "mixed"),
                                    objective="causal", model="gpt-tiny", steps=2, batch_size=4, seq_len=16,
                                    eval_every=2, eval_batches=1, progress=False, workers=0))  # fmt: skip
    assert [s for s, _ in mixed.evals] == [2]
    assert "has no validation split; validating on the others" in capsys.readouterr().err


def assert_full_disk_refused(r: subprocess.CompletedProcess, run: Path) -> None:
    assert_one_line_error(r, "no space left", "checkpoints")
    assert list_checkpoints(run) == []
    assert [p.name for p in (run / "checkpoints").iterdir()] == []  # no temporary left either
    assert not (run / "final").exists()
    assert [p.name for p in run.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.slow  # over 3 s on 2 cores (subprocesses or several runs)
def test_a_full_disk_by_file_size_limit_is_one_line(data_dir, tmp_path):
    """The checkpoint (gpt-tiny's weights and AdamW state) is the first file over the limit."""
    run = tmp_path / "run"
    r = run_lmlab(["pretrain", "--data", str(data_dir), *ARGS, "--out", str(run)], fsize_limit=200_000)
    assert_full_disk_refused(r, run)


@pytest.mark.slow  # over 3 s on 2 cores (subprocesses or several runs)
def test_a_full_tmpfs_is_one_line(data_dir, tmp_path):
    with tmpfs(tmp_path / "tmpfs", "size=400k") as mnt:
        r = run_lmlab(["pretrain", "--data", str(data_dir), *ARGS, "--out", str(mnt / "run")])
        assert_full_disk_refused(r, mnt / "run")


def test_metrics_on_a_full_disk_is_one_line(tmp_path):
    from lmlab.train.metrics import Metrics as _Metrics

    m = _Metrics(tmp_path, None, True, lambda msg: None)

    class Full:
        def write(self, s):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

        def close(self):
            pass

    import csv as csv_

    m.f.close()
    m.f = Full()
    m.w = csv_.DictWriter(m.f, fieldnames=("step",), extrasaction="ignore")
    with pytest.raises(LmlabError, match=r"no space left on .*metrics\.csv"):
        m.write({"step": 1})
    m.close()
