"""Safe outputs: atomic writes, one writer per directory, outputs that never clobber a user's files.

The guarantees every lmlab writer rests on (the README's "Guarantees" section):

* **Atomic files and directories.**  A writer writes to a temporary path in the destination's own
  directory (so the final ``os.replace`` is a rename on one file system) and renames it into place
  only once the data is flushed and fsync'ed (:func:`atomic_open`, :func:`atomic_dir`).  A killed
  process leaves the old output or the complete new one, never a mix.  Temporary names carry the
  writer's PID (``.NAME.PID.RANDOM.tmp``), so a later run removes those of dead writers
  (:func:`remove_stale_temps`) and never those of a live one.
* **Outputs never clobber.**  :func:`check_output_dir` accepts a new or empty directory, or an
  lmlab output of the same kind when the caller passes ``overwrite=True`` (the CLI's
  ``--overwrite``); never a directory that holds anything else, never one that holds an input.
* **One writer per directory.**  :class:`DirLock` takes an exclusive ``fcntl.flock`` on
  ``DIR/.lmlab.lock``; the OS drops it when the holder dies, so there is no stale lock to clean.
  A second writer gets a one-line error naming the holder's PID.
* **A full disk is a one-line error.**  :func:`disk_error` turns ``ENOSPC`` / ``EDQUOT`` /
  ``EFBIG`` (and the same failure reported by safetensors or ``torch.save``, which wrap it) into
  :class:`LmlabError` naming the file system and how much was written.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from lmlab.errors import LmlabError

LOCK_NAME = ".lmlab.lock"
# .NAME.PID.RANDOM.tmp, as made by _tmp_prefix(); the PID tells a dead writer's leftovers from a live one's.
_TMP_RE = re.compile(r"^\..+\.(\d+)\.[A-Za-z0-9_]+\.tmp$")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# How libraries that wrap the OS error spell it (safetensors' Rust IoError, torch's PytorchStreamWriter).
_DISK_FULL_TEXT = ("No space left", "StorageFull", "Disk quota", "QuotaExceeded", "File too large",
                   "FileTooLarge", "file write failed")  # fmt: skip


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 4 MiB blocks (the manifests of checkpoints and quantized models)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in ``path``; a damaged or hand-edited file (not UTF-8, not JSON, not an
    object) is a one-line :class:`LmlabError` naming it.  A missing file raises FileNotFoundError."""
    p = Path(path)
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise LmlabError(
            f"{p}: not valid JSON ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    if not isinstance(obj, dict):
        raise LmlabError(f"{p}: must hold a JSON object, got {type(obj).__name__}")
    return obj


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    # Make the rename itself durable; not every platform lets a directory be opened.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _tmp_prefix(name: str) -> str:
    return f".{name}.{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files and directories that dead lmlab writers left in ``directory``.

    Only names of lmlab's own pattern (``.NAME.PID.RANDOM.tmp``) whose PID is no live process are
    touched.  Returns what was removed.
    """
    d = Path(directory)
    removed: list[Path] = []
    try:
        entries = list(d.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _TMP_RE.match(p.name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        with contextlib.suppress(OSError):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
    return removed


def _tree_bytes(path: Path) -> int:
    try:
        if path.is_file():
            return path.stat().st_size
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    except OSError:
        return 0


def _mount_point(path: Path) -> str:
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    with contextlib.suppress(OSError):
        while p != p.parent and not os.path.ismount(p):
            p = p.parent
    return str(p)


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) is the file system running out of space or size limit."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            return True
        if not isinstance(exc, OSError) and any(t in str(exc) for t in _DISK_FULL_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def disk_error(path: str | os.PathLike, written: int | None = None, total: int | None = None) -> LmlabError:
    """The one-line error for a full disk while writing ``path``."""
    where = _mount_point(Path(path))
    if written is not None and total is not None:
        amount = f": wrote {written:,} of {total:,} bytes"
    elif written is not None:
        amount = f": wrote {written:,} bytes"
    else:
        amount = ""
    return LmlabError(f"no space left on {where} while writing {path}{amount}; nothing was changed")


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike, mode: str = "wb", *, expected_bytes: int | None = None, **kwargs: Any
) -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; rename it to ``path`` on success.

    On an exception the temporary file is removed and ``path`` is left as it was; a full disk
    becomes a one-line :class:`LmlabError` (saying how much of ``expected_bytes`` was written).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path.name), suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes owner-only files; the result gets the mode any new file would.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        written = _tree_bytes(Path(tmp))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if is_disk_full(e):
            raise disk_error(path, written, expected_bytes) from None
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb", expected_bytes=len(data)) as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def _old_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def recover_interrupted_swap(path: str | os.PathLike) -> None:
    """Finish or undo a directory swap that a kill interrupted (see :func:`atomic_dir`).

    If ``path`` is missing but its ``.NAME.old`` is there, the process died between the two
    renames: the old directory is put back.  If both are there, the new one is in place and the
    old one is removed.
    """
    path = Path(path)
    old = _old_name(path)
    if not old.is_dir():
        return
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(old, path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, expected_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` whole.

    Used for checkpoints, prepared data and saved models: readers either see the old directory
    or the complete new one, never a half-written mix.  A full disk becomes a one-line error
    naming how much was written (of ``expected_bytes``, when the caller knows it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_swap(path)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path.name), suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        # mkdtemp makes an owner-only directory, and some writers (safetensors among them) make
        # owner-only files: give everything inside the read access the umask allows, as any new
        # file would have, without taking away bits a writer set on purpose.
        mask = _umask()
        os.chmod(tmp, 0o777 & ~mask)
        for p in tmp.rglob("*"):
            if not p.is_symlink():
                p.chmod(p.stat().st_mode | ((0o555 if p.is_dir() else 0o444) & ~mask))
        if path.exists():
            old = _old_name(path)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        written = _tree_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            raise disk_error(path, written, expected_bytes) from None
        raise


# ---------------------------------------------------------------------------------------------- outputs

OUTPUT_KINDS = ("run", "prepared", "quantized", "model")
_KIND_WORDS = {
    "run": "a training run (lmlab pretrain)",
    "prepared": "a prepared data directory (lmlab prepare)",
    "quantized": "a quantized model (lmlab quantize)",
    "model": "a saved model",
}


def output_kind(path: str | os.PathLike) -> str | None:
    """What lmlab output ``path`` is: "run", "prepared", "quantized", "model", or None.

    Read from each kind's marker file: a run's ``config.json`` with a ``config`` section (or
    its ``checkpoints/``), a prepared directory's ``meta.json``, a quantized model's
    ``lmlab_quant.json``, a Hugging Face ``config.json``.
    """
    p = Path(path)
    if not p.is_dir():
        return None
    if (p / "lmlab_quant.json").is_file():
        return "quantized"
    if (p / "meta.json").is_file():
        with contextlib.suppress(OSError, ValueError, AttributeError):
            if (
                json.loads((p / "meta.json").read_text(encoding="utf-8"))
                .get("format", "")
                .startswith("lmlab-tokens")
            ):
                return "prepared"
    if (p / "config.json").is_file():
        with contextlib.suppress(OSError, ValueError):
            cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
            if isinstance(cfg, dict) and isinstance(cfg.get("config"), dict) and "resolved" in cfg:
                return "run"
        return "model"
    if (p / "checkpoints").is_dir() or (p / LOCK_NAME).exists():
        return "run"
    return None


def _is_within(inner: Path, outer: Path) -> bool:
    try:
        inner.relative_to(outer)
    except ValueError:
        return False
    return True


def check_output_dir(
    path: str | os.PathLike,
    kind: str,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
    flag: str = "--out",
) -> Path:
    """Refuse an output directory that would destroy something; returns ``path`` as a Path.

    Accepted: a path that does not exist (its parent must be a directory or creatable), an empty
    directory, or, with ``overwrite``, an lmlab output of the same ``kind``.  Refused with a
    one-line :class:`LmlabError`: an existing file, a non-empty directory of any other kind, a
    directory that is or contains one of ``inputs`` (or lies inside one of them, for inputs that
    are directories a command reads whole), and a path under a file.
    """
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    p = Path(path)
    if str(path) == "":
        raise LmlabError(f"{flag} is empty")
    resolved = p.resolve()
    for raw in inputs:
        inp = Path(raw).resolve()
        if resolved == inp or _is_within(inp, resolved):
            raise LmlabError(f"{flag} {path} holds the input {raw}; choose another output directory")
        if Path(raw).is_dir() and _is_within(resolved, inp):
            raise LmlabError(f"{flag} {path} lies inside the input {raw}; choose a directory outside it")
    for parent in [resolved, *resolved.parents]:
        if parent.exists():
            if not parent.is_dir():
                what = (
                    "exists and is not a directory" if parent == resolved else f"is under the file {parent}"
                )
                raise LmlabError(f"{flag} {path} {what}")
            break
    if not p.exists():
        return p
    if not any(e for e in p.iterdir() if not is_lmlab_temp(e.name)):
        return p
    found = output_kind(p)
    if found == kind:
        if overwrite:
            return p
        raise LmlabError(
            f"{flag} {path} already holds {_KIND_WORDS[kind]}; pass --overwrite to replace it, "
            "or choose a new directory"
        )
    what = f"holds {_KIND_WORDS[found]}" if found else "is not empty"
    raise LmlabError(
        f"{flag} {path} {what}; refusing to write {_KIND_WORDS[kind].split(' (')[0]} over it "
        "(choose a new or empty directory)"
    )


# ---------------------------------------------------------------------------------------------- locking


class DirLock:
    """An exclusive lock on a directory: ``with DirLock(run_dir): ...`` -- one writer at a time.

    ``fcntl.flock`` on ``DIR/.lmlab.lock``, which holds the holder's PID for the error message.
    The OS releases the lock when the process dies, however it dies, so a stale lock file is
    harmless.  ``beside=True`` locks ``PARENT/.DIR.lmlab.lock`` instead, for outputs that are
    swapped in whole (:func:`atomic_dir`), whose own files would vanish with the old directory;
    that file is removed on release.  Where ``fcntl`` is missing (Windows) the lock is a no-op.
    """

    def __init__(self, directory: str | os.PathLike, what: str = "run directory", beside: bool = False):
        self.directory = Path(directory)
        self.what = what
        self.beside = beside
        if beside:
            self.path = self.directory.parent / f".{self.directory.name}.lmlab.lock"
        else:
            self.path = self.directory / LOCK_NAME
        self._fd: int | None = None

    def _busy(self, fd: int) -> LmlabError:
        try:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
        except OSError:
            holder = "unknown"
        return LmlabError(
            f"{self.directory} is in use by another lmlab process (PID {holder}); "
            f"a {self.what} has one writer at a time"
        )

    def acquire(self) -> DirLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                err = self._busy(fd)
                os.close(fd)
                raise err from None
            except BaseException:
                os.close(fd)
                raise
            # A holder that removed the file on release may have done so after we opened it: then we
            # locked an orphan, and must lock the file that is there now.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            if self.beside:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def is_lmlab_temp(name: str) -> bool:
    """Whether a file name is one of lmlab's temporaries (``.NAME.PID.RANDOM.tmp``) or its run lock."""
    return name == LOCK_NAME or _TMP_RE.match(name) is not None


def check_writable(path: str | os.PathLike, flag: str = "--out") -> None:
    """A one-line error, before any work, when ``path`` cannot be made: its nearest existing
    ancestor (the directory where the temporary sibling will be made) is on a read-only file
    system or not writable -- rather than an OSError naming a temporary path later."""
    anc = Path(os.path.abspath(path)).parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise LmlabError(f"{flag} {path} is under the file {anc}")
    if os.access(anc, os.W_OK | os.X_OK):
        return
    try:
        ro = bool(os.statvfs(anc).f_flag & os.ST_RDONLY)
    except OSError:
        ro = False
    why = "a read-only file system" if ro else "no permission to write there"
    raise LmlabError(f"{flag} {path}: cannot create it in {anc} ({why})")
