"""Progress bars that suit where stderr goes: tqdm's bar on a terminal, plain lines elsewhere.

In a log file, CI or under ``nohup`` a tqdm bar is hundreds of carriage-return updates on one
line; :func:`progress_bar` gives there a bar that prints a whole line (tqdm's own status text)
every ``interval`` seconds and once at the end (nothing for work done within one interval).  On
a terminal it is ``tqdm.auto.tqdm`` unchanged.  The pre-training loop and ``lmlab prepare`` both
use it::

    bar = progress_bar(total=1000, desc="pretrain", unit="step")

``disable=True`` turns it off; ``disable=None`` (tqdm's "only on a terminal") is taken as "on",
with plain lines off a terminal.  ``LMLAB_PROGRESS_INTERVAL`` sets the interval (seconds).
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

from lmlab.errors import LmlabError

#: Seconds between two plain lines when stderr is not a terminal.
DEFAULT_INTERVAL = 30.0


def _interval() -> float:
    raw = os.environ.get("LMLAB_PROGRESS_INTERVAL")
    if raw is None or raw == "":
        return DEFAULT_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0.0 or value == float("inf"):
        raise LmlabError(f"LMLAB_PROGRESS_INTERVAL must be a number of seconds >= 0, got {raw!r}")
    return value


def _is_tty(file: Any) -> bool:
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(*args: Any, file: Any = None, interval: float | None = None, **kw: Any):
    """A tqdm bar on a terminal, else a :class:`LineProgress` printing a line every ``interval``
    seconds (default :data:`DEFAULT_INTERVAL`, or ``$LMLAB_PROGRESS_INTERVAL``).  Takes tqdm's
    arguments; ``file`` defaults to ``sys.stderr``."""
    file = sys.stderr if file is None else file
    if kw.get("disable") is None:
        kw["disable"] = False
    if _is_tty(file):
        from tqdm.auto import tqdm

        return tqdm(*args, file=file, **kw)
    kw.pop("dynamic_ncols", None)  # no terminal to measure
    cls = _line_class()
    return cls(*args, file=file, interval=_interval() if interval is None else interval, **kw)


@functools.cache
def _line_class() -> type:
    from tqdm.std import tqdm

    class LineProgress(tqdm):
        """tqdm whose every display is one whole line (no ``\\r``, no cursor moves), at most one per
        ``interval`` seconds (tqdm's ``mininterval``) and the final state at the end; nothing at the
        start, and nothing at all from a bar closed within its first interval."""

        def __init__(self, *args: Any, interval: float = DEFAULT_INTERVAL, **kw: Any) -> None:
            kw.setdefault("ncols", 100)
            kw.setdefault("ascii", True)  # "#" for the bar: a log is read with less and grep
            kw.update(mininterval=interval, maxinterval=max(interval, 10.0), miniters=1)
            self._printed, self._printed_n = "", -1
            self._opened = False  # the first display (at construction) is skipped
            self._cleared = False
            super().__init__(*args, **kw)
            self._opened = True

        def display(self, msg: str | None = None, pos: int | None = None) -> bool:
            if msg == "" or not self._opened:  # tqdm clearing a line, or the empty bar at the start
                return True
            if self._cleared:  # tqdm.write's redraw after its message: the next line falls due as usual
                self._cleared = False
                return True
            line = self.__str__() if msg is None else msg
            if line != self._printed:
                self.fp.write(line.rstrip() + "\n")
                self.fp.flush()
                self._printed, self._printed_n = line, self.n
            return True

        def clear(self, nolock: bool = False) -> None:
            # Lines already printed stay; tqdm.write's message simply follows them.
            self._cleared = True

        def close(self) -> None:
            if self.disable:
                return
            # The final state, once, for a bar that printed before: one that ended within its first
            # interval prints nothing at all (a short step, a failure, leaves stderr to the message).
            self._ema_dt = lambda: None  # the overall rate, as tqdm's close shows it
            self._cleared = False
            if self._printed and self.n != self._printed_n:  # not the same count twice
                self.display()
            self.leave = False
            self.last_print_t = self.start_t - 1 - self.delay  # nothing left to clear
            super().close()

    return LineProgress


def __getattr__(name: str) -> Any:
    # Built on first use so that importing lmlab.progress does not import tqdm.
    if name == "LineProgress":
        return _line_class()
    raise AttributeError(f"module 'lmlab.progress' has no attribute {name!r}")
