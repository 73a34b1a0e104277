"""``lmlab pretrain`` as a user runs it: flags, Ctrl-C, --resume, and one-line errors."""

from __future__ import annotations

import csv
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from lmlab_train_fixtures import write_prepared  # noqa: E402

ENTRY = str(Path(__file__).parent / "pretrain_entry.py")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_prepared(tmp_path_factory.mktemp("data") / "prepared")


def lmlab_pretrain(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, ENTRY, *args], capture_output=True, text=True, timeout=120, **kw)


def steps_logged(run: Path) -> list[int]:
    p = run / "metrics.csv"
    if not p.is_file():
        return []
    with open(p, newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


@pytest.mark.slow  # over 3 s on 2 cores (subprocesses or several runs)
def test_ctrl_c_checkpoints_and_resume_finishes(data_dir, tmp_path):
    run = tmp_path / "run"
    args = ["--data", str(data_dir), "--model", "t5-tiny", "--objective", "span", "--steps", "400",
            "--batch-size", "4", "--seq-len", "32", "--save-every", "1000", "--eval-every", "1000",
            "--eval-batches", "1", "--no-progress", "--out", str(run)]  # fmt: skip
    proc = subprocess.Popen([sys.executable, ENTRY, *args], stderr=subprocess.PIPE, text=True)
    try:
        while len(steps_logged(run)) < 3 and proc.poll() is None:
            time.sleep(0.05)  # waits for an event (3 steps logged); nothing is timed
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "stopped by SIGINT" in err and "--resume" in err and "Traceback" not in err
    stopped = steps_logged(run)[-1]
    assert (run / "checkpoints" / f"step-{stopped:08d}" / "manifest.json").is_file()

    r = lmlab_pretrain("--resume", str(run), "--steps", str(stopped + 2), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "%|" not in r.stderr, "a progress bar under --no-progress (Hugging Face's save bar?)"
    assert steps_logged(run) == list(range(1, stopped + 3))
    assert (run / "final" / "model.safetensors").is_file()

    r = lmlab_pretrain("--resume", str(run), "--lr", "1.0")
    assert "--resume uses the run's own settings" in error_line(r)


def error_line(r: subprocess.CompletedProcess) -> str:
    # Only the last line is ours: importing transformers may print library notes before it.
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("lmlab pretrain: error: ")
    return last


@pytest.mark.slow  # over 3 s on 2 cores (subprocesses or several runs)
def test_user_mistakes_are_one_line(data_dir, tmp_path):
    r = lmlab_pretrain(
        "--data", str(data_dir), "--model", "gpt-tiny", "--objective", "span", "--out", str(tmp_path)
    )
    assert "trains encoder-decoder" in error_line(r)
    r = lmlab_pretrain("--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert "does not exist" in error_line(r)
    r = lmlab_pretrain("--resume", str(tmp_path / "nothing"))
    assert "not an lmlab run directory" in error_line(r)
    r = lmlab_pretrain(
        "--data", str(data_dir), "--batch-size", "6", "--grad-accum", "4", "--out", str(tmp_path / "x")
    )
    assert "divisible" in error_line(r)


def test_registered_in_the_lmlab_command():
    from lmlab.cli import COMMANDS

    assert COMMANDS["pretrain"][0] == "lmlab.train.cli"
    import argparse

    from lmlab.train import cli

    p = argparse.ArgumentParser()
    cli.configure(p)
    a = p.parse_args(["--data", "d", "--out", "o", "--steps", "5", "--mix-alpha", "0.3", "--compile"])
    assert (a.steps, a.mix_alpha, a.compile) == (5, 0.3, True)


def test_the_command_passes_lmlab_onednn_down_and_tunes_its_process(data_dir, tmp_path, monkeypatch):
    """$LMLAB_ONEDNN reaches the run's config and $LMLAB_PEAK_TFLOPS the progress bar's MFU (the library
    reads no environment); a bad value is one line;
    the command asks pretrain() for the process tuning; a resume takes this process's policy."""
    import json
    from argparse import ArgumentParser
    from types import SimpleNamespace

    from lmlab.errors import LmlabError
    from lmlab.train import cli, loop

    calls = []
    monkeypatch.setattr(
        loop, "pretrain", lambda cfg, **kw: calls.append((cfg, kw)) or SimpleNamespace(stopped_by=None)
    )
    p = ArgumentParser()
    cli.configure(p)
    run = tmp_path / "run"
    monkeypatch.setenv("LMLAB_ONEDNN", "0")
    monkeypatch.setenv("LMLAB_PEAK_TFLOPS", "312")
    assert cli.run(p.parse_args(["--data", str(data_dir), "--out", str(run)])) == 0
    ((cfg, kw),) = calls
    assert kw == {"tune_process": True, "peak_tflops": 312.0} and cfg.onednn == "off"
    monkeypatch.delenv("LMLAB_PEAK_TFLOPS")
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"config": cfg.to_dict(), "resolved": {}}))
    monkeypatch.setenv("LMLAB_ONEDNN", "1")
    assert cli.run(p.parse_args(["--resume", str(run), "--steps", "2"])) == 0
    assert calls[-1][0].onednn == "on" and calls[-1][0].resume and calls[-1][0].steps == 2
    monkeypatch.delenv("LMLAB_ONEDNN")
    assert cli.run(p.parse_args(["--resume", str(run)])) == 0
    assert calls[-1][0].onednn == "auto"  # unset is auto, as it always was
    monkeypatch.setenv("LMLAB_ONEDNN", "sometimes")
    with pytest.raises(LmlabError, match="unknown oneDNN policy 'sometimes'"):
        cli.run(p.parse_args(["--data", str(data_dir), "--out", str(tmp_path / "bad")]))
    monkeypatch.setenv("LMLAB_ONEDNN", "auto")
    for bad in ("fast", "-3", "inf", "nan"):
        monkeypatch.setenv("LMLAB_PEAK_TFLOPS", bad)
        with pytest.raises(
            LmlabError, match=f"LMLAB_PEAK_TFLOPS must be a positive number of TFLOP/s, got '{bad}'"
        ):
            cli.run(p.parse_args(["--data", str(data_dir), "--out", str(tmp_path / "bad")]))


def test_objective_help_lists_the_registered_objectives():
    from argparse import ArgumentParser

    from lmlab.objectives.registry import objective_names
    from lmlab.train import cli

    p = ArgumentParser()
    cli.configure(p)
    text = " ".join(p.format_help().split())
    assert ", ".join(objective_names()) + " (default span)" in text


def losses(run: Path) -> list[tuple[str, str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return [(r["step"], r["loss"], r["val_loss"]) for r in csv.DictReader(f)]


@pytest.mark.slow  # over 3 s on 2 cores (subprocesses or several runs)
def test_sigkill_then_resume_gives_the_uninterrupted_losses(data_dir, tmp_path):
    args = ["--data", str(data_dir), "--model", "gpt-tiny", "--objective", "causal", "--steps", "12",
            "--batch-size", "4", "--seq-len", "32", "--save-every", "3", "--eval-every", "4",
            "--eval-batches", "1", "--no-progress"]  # fmt: skip
    r = lmlab_pretrain(*args, "--out", str(tmp_path / "full"))
    assert r.returncode == 0, r.stderr

    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, ENTRY, *args, "--out", str(run)], stderr=subprocess.DEVNULL)
    try:
        while len(steps_logged(run)) < 5 and proc.poll() is None:
            time.sleep(0.02)  # waits for an event (5 steps logged); nothing is timed
        proc.kill()  # SIGKILL: no handler runs, no checkpoint is written on the way out
        proc.wait(timeout=60)
    finally:
        proc.kill()
    r = lmlab_pretrain("--resume", str(run), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert losses(run) == losses(tmp_path / "full")  # the same strings: bit-identical losses
