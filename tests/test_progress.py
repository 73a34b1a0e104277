"""Progress off a terminal: whole lines now and then, never carriage-return updates; a terminal keeps tqdm.

The pre-training loop's own bar is checked in ``tests/train/test_checkpoint_hf.py`` (a run that is
there anyway, with ``progress=True`` and stderr captured).
"""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from lmlab.errors import LmlabError
from lmlab.progress import LineProgress, progress_bar

SCRIPT = """
import sys, time
from lmlab.progress import progress_bar
bar = progress_bar(total=200, desc="pretrain", unit="step", dynamic_ncols=True)
for i in range(200):
    time.sleep(0.001)
    bar.update(1)
    if i == 100:
        bar.write("halfway", file=sys.stderr)
bar.close()
"""


def _run(interval: str) -> str:
    env = {"LMLAB_PROGRESS_INTERVAL": interval, "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stderr


def test_a_pipe_gets_plain_lines_at_the_interval_and_the_final_state():
    err = _run("1000")  # nothing falls due: the message alone (work within one interval prints no bar)
    assert err.splitlines() == ["halfway"]
    err = _run("0")  # every update falls due: one whole line each, and never "\r"
    lines = err.splitlines()
    assert "\r" not in err and "halfway" in lines
    assert "\x1b" not in err and 50 < len(lines) <= 202
    assert lines[-1].startswith("pretrain: 100%|") and "200/200" in lines[-1]
    assert all(line.startswith("pretrain:") for line in lines if line != "halfway")


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_keeps_tqdm_and_its_carriage_returns():
    from tqdm.auto import tqdm

    tty = _Tty()
    bar = progress_bar(total=3, desc="x", file=tty, mininterval=0)
    assert isinstance(bar, tqdm) and not isinstance(bar, LineProgress)
    for _ in range(3):
        bar.update(1)
    bar.close()
    assert "\r" in tty.getvalue()
    off = progress_bar(total=3, file=io.StringIO(), disable=True)
    off.update(3)
    off.close()


def test_a_bad_interval_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("LMLAB_PROGRESS_INTERVAL", "soon")
    with pytest.raises(LmlabError, match="LMLAB_PROGRESS_INTERVAL must be a number of seconds"):
        progress_bar(total=1, file=io.StringIO())
