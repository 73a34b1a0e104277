"""Running the real ``lmlab`` command in a subprocess, as a user would, and checking what it left.

Shared by the bad-input tables (``tests/*/test_bad_input_*.py``) and the fault tests:

    r = run_lmlab(["quantize", str(model), "--method", "nf4", "--out", str(out)])
    assert_one_line_error(r, "holds")                 # exit 2, one stderr line, no traceback
    r = run_lmlab_here([...])                         # the same through lmlab.cli.main, in this process
    before = tree_hashes(tmp_path); ...; assert tree_hashes(tmp_path) == before
    with tmpfs(tmp_path / "small", "size=400k") as mnt: ...   # a real full disk
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Lines third-party libraries may print on stderr on their own (not lmlab's); never an lmlab error line.
_NOISE = ("warnings.warn(", "Warning:", "warn(")


def run_lmlab(
    args: list[str],
    *,
    cwd: str | os.PathLike | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    fsize_limit: int | None = None,
) -> subprocess.CompletedProcess:
    """``python -m lmlab ARGS`` with captured text output.  ``fsize_limit``: RLIMIT_FSIZE in bytes
    (a full disk simulated by a file-size limit; SIGXFSZ is ignored so writes fail with EFBIG)."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))

    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "lmlab", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=full_env,
        timeout=timeout,
        check=False,
        preexec_fn=limit if fsize_limit is not None else None,
    )


def run_lmlab_here(
    args: list[str], *, cwd: str | os.PathLike | None = None, **_: object
) -> subprocess.CompletedProcess:
    """``lmlab ARGS`` in this process (``lmlab.cli.main``, the entry point the installed command calls),
    with its output captured: the bad-input tables' many cases without paying torch's and transformers'
    import for each one (each table keeps some cases on :func:`run_lmlab`).  An exception that escapes
    ``main`` is written to the captured stderr as the command would print it (a traceback, exit 1)."""
    import io
    import traceback
    import warnings

    from lmlab.cli import main

    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                code = int(main(list(args)) or 0)
            except SystemExit as e:  # argparse's usage errors
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                traceback.print_exc(file=err)
                code = 1
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(["lmlab", *args], code, out.getvalue(), err.getvalue())


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.strip() and not any(n in ln for n in _NOISE)]


def assert_one_line_error(r: subprocess.CompletedProcess, *words: str, status: int = 2) -> str:
    """Exit ``status``, no traceback, and the last stderr line is lmlab's one error line naming
    ``words`` (case-insensitive).  Returns that line."""
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == status, (r.returncode, r.stderr[-3000:])
    lines = error_lines(r.stderr)
    assert lines, "no error message at all"
    err = [ln for ln in lines if ": error: " in ln]
    assert len(err) == 1, f"expected one error line, got:\n{r.stderr}"
    assert lines[-1] == err[0], f"the error line must be the last line:\n{r.stderr}"
    low = err[0].lower()
    for w in words:
        assert w.lower() in low, f"{w!r} not in {err[0]!r}"
    return err[0]


def tree_hashes(root: str | os.PathLike) -> dict[str, str]:
    """SHA-256 of every file under ``root`` (relative path -> hex), to show nothing was touched."""
    root = Path(root)
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@contextlib.contextmanager
def tmpfs(path: str | os.PathLike, options: str) -> Iterator[Path]:
    """A real small file system at ``path`` (``options`` as for mount: ``size=400k``, ``ro,size=1m``),
    unmounted afterwards; the test is skipped where mounting is refused (not root)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
        )
    except OSError:
        done = None
    if done is None or done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)
