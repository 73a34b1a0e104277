"""A run directory's state: its settings and data identity, the checks of an existing run, the lock.

``config.json`` holds the run's :class:`PretrainConfig` and what was resolved from it (lengths,
precision, the fp32 product library, mixing rates, :func:`data_identity`); ``--resume`` checks a
run's settings and data against it (:func:`check_out`).  :func:`claim` owns the directory for
the whole run.  A final model directory carries the run settings that evaluation and ``--init``
read (:data:`TRAINING_FILE`) beside the Hugging Face files, whose ``config.json`` stays pure.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from lmlab.data.shards import load_meta
from lmlab.errors import LmlabError
from lmlab.io import (
    LOCK_NAME,
    DirLock,
    atomic_write_bytes,
    atomic_write_json,
    check_output_dir,
    read_json_object,
    remove_stale_temps,
)
from lmlab.models import onednn
from lmlab.train import checkpoint as ckpt
from lmlab.train import distributed as ddp
from lmlab.train.config import RUN_CONFIG, PretrainConfig, read_run_config

FINAL = "final"
# Settings a resumed run must share with the run it continues (the rest only affect reporting/length).
_IDENTITY = ("data", "objective", "model", "batch_size", "seq_len", "lr", "min_lr_ratio", "optimizer",
             "schedule", "warmup", "weight_decay", "grad_accum", "clip", "precision", "fsdp", "init",
             "mix_alpha", "seed", "objective_args")  # fmt: skip


def cpu_fp32_products(device: torch.device) -> str:
    """Which library multiplies fp32 on this device: "onednn" (lmlab.models.onednn) or "torch"."""
    return "onednn" if device.type == "cpu" and onednn.available() else "torch"


def saved_resolved(run_dir: Path) -> dict[str, Any]:
    """The ``resolved`` section of a run's config.json ({} if unreadable: it only informs a note)."""
    try:
        return dict(json.loads((run_dir / RUN_CONFIG).read_text(encoding="utf-8")).get("resolved") or {})
    except (OSError, ValueError, AttributeError):
        return {}


_EDGE = 1 << 20  # bytes hashed at each end of a token file for the data's identity


def _edges_sha256(path: Path) -> str | None:
    """sha256 of a file's first and last MiB (and its size): cheap, unlike hashing GBs of tokens."""
    import hashlib

    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            h = hashlib.sha256(str(size).encode())
            h.update(f.read(_EDGE))
            if size > _EDGE:
                f.seek(max(_EDGE, size - _EDGE))
                h.update(f.read(_EDGE))
    except FileNotFoundError:
        return None
    return h.hexdigest()


def data_identity(dirs: list[str]) -> dict[str, dict[str, Any]]:
    """What a resumed run checks its ``--data`` against, per directory.

    The sha256 of ``tokenizer.json`` (the id mapping), ``meta.json``'s vocabulary size, token
    counts and source hashes, and a sha256 of each token file's size and first and last MiB --
    not of the whole file, which would cost a pass over gigabytes on every resume.  A re-prepared
    corpus with a new tokenizer or new text changes at least one of these.
    """
    import hashlib

    out = {}
    for d in dirs:
        meta = load_meta(d)
        tok = Path(d) / "tokenizer.json"
        sources = meta.get("sources")
        out[d] = {
            "tokenizer_sha256": hashlib.sha256(tok.read_bytes()).hexdigest() if tok.is_file() else None,
            "vocab_size": meta.get("vocab_size"),
            "tokens": {split: (meta.get(split) or {}).get("tokens") for split in ("train", "val")},
            "sources_sha256": [x.get("sha256") for x in sources if isinstance(x, dict)]
            if isinstance(sources, list)
            else None,
            "edges_sha256": {split: _edges_sha256(Path(d) / f"{split}.bin") for split in ("train", "val")},
        }
    return out


def check_same_data(cfg: PretrainConfig, run_dir: Path) -> None:
    saved = saved_resolved(run_dir).get("data_identity")
    if not isinstance(saved, dict):
        return  # a run from an lmlab that did not record it
    now = data_identity(cfg.data)
    for d in cfg.data:
        was, is_ = saved.get(d), now[d]
        if not isinstance(was, dict):
            continue
        diff = [k for k in is_ if k in was and was[k] != is_[k]]
        if diff:
            what = {"tokenizer_sha256": "tokenizer.json", "vocab_size": "the vocabulary size",
                    "tokens": "the token counts", "sources_sha256": "the source files",
                    "edges_sha256": "the token files"}  # fmt: skip
            raise LmlabError(
                f"--resume {run_dir}: the data in {d} changed since the run started "
                f"({', '.join(what[k] for k in diff)} differ); resume on the data it was trained on, "
                "or start a new --out"
            )


def check_resume(cfg: PretrainConfig, run_dir: Path) -> None:
    # A setting a run's config.json predates (written by an older lmlab) had its default then.
    saved = {**PretrainConfig().to_dict(), **read_run_config(run_dir)}
    now = cfg.to_dict()
    diff = [k for k in _IDENTITY if saved.get(k) != now.get(k)]
    if diff:
        raise LmlabError(
            f"--resume {run_dir}: settings differ from the run's own ({', '.join(diff)}); "
            "resume with the saved settings (PretrainConfig.resume_from) or start a new --out"
        )


def check_out(cfg: PretrainConfig, run_dir: Path) -> None:
    """Refuse a ``--resume`` that changed settings or data, and a new run onto an existing one."""
    if cfg.resume:
        check_resume(cfg, run_dir)
        check_same_data(cfg, run_dir)
    elif (run_dir / RUN_CONFIG).exists() or ckpt.list_checkpoints(run_dir):
        raise LmlabError(
            f"{run_dir} already holds a run; continue it with --resume {run_dir} or choose another --out"
        )
    else:
        inputs = [*cfg.data, *([cfg.init] if cfg.init else [])]
        check_output_dir(run_dir, "run", inputs=inputs)


@contextlib.contextmanager
def claim(cfg: PretrainConfig, run_dir: Path, is_main: bool) -> Iterator[None]:
    """Own the run directory for the whole run: checked, locked, and rid of dead writers' temps.

    One writer per run directory (:class:`lmlab.io.DirLock`, rank 0 only: the other ranks never
    write it); a second ``pretrain`` on the same directory gets a one-line error naming the
    holder's PID.  The checks run before the lock is taken in a directory without one (so a
    refused ``--out`` is left exactly as it was) and again under it (another process may have
    started a run meanwhile).  A run that fails before writing anything takes away the
    directory or lock file it created.
    """
    if cfg.resume:
        read_run_config(run_dir)  # a one-line error for a directory that holds no run
    existed = run_dir.exists()
    had_lock = (run_dir / LOCK_NAME).exists()
    # A directory with a lock file is (or was) a run's: a live holder is named before anything
    # else is said about it; any other directory is checked before a lock file is put in it.
    if not is_main:
        # The other ranks never write the directory; rank 0 may already have started filling it.
        if cfg.resume:
            check_out(cfg, run_dir)
        yield
        return
    if not had_lock:
        check_out(cfg, run_dir)
    lock = DirLock(run_dir).acquire()
    ok = False
    try:
        check_out(cfg, run_dir)
        remove_stale_temps(run_dir)
        remove_stale_temps(run_dir / ckpt.CHECKPOINTS)
        yield
        ok = True
    finally:
        lock.release()
        if not ok and not had_lock:
            with contextlib.suppress(OSError):
                left = {p.name for p in run_dir.iterdir()}
                if left == {LOCK_NAME}:
                    (run_dir / LOCK_NAME).unlink()
                    if not existed:
                        run_dir.rmdir()


def write_run_files(cfg: PretrainConfig, run_dir: Path, s: Any, d: ddp.Dist) -> None:
    """``config.json`` (the settings and what was resolved from them, ``s`` the run's Setup) and
    the run's ``tokenizer.json``; rank 0 only."""
    if not d.is_main:
        return
    resolved = {
        "seq_len": s.seq_len,
        "raw_len": s.raw_len,
        "total_steps": s.total,
        "warmup": s.warmup,
        "family": s.family,
        "precision": s.precision,
        # Which library multiplies fp32 on CPU (lmlab.models.onednn): results agree to rounding,
        # not bit for bit, so a resumed run that must reproduce this one needs the same.
        "cpu_fp32_products": cpu_fp32_products(d.device),
        "world_size": d.world,
        "mixing_rates": {d: float(p) for d, p in zip(cfg.data, s.rates, strict=True)},
        # Checked by --resume (data_identity's docstring says what it covers).
        "data_identity": data_identity(cfg.data),
    }
    atomic_write_json(run_dir / RUN_CONFIG, {"config": cfg.to_dict(), "resolved": resolved})
    tok = run_dir / "tokenizer.json"
    if not (cfg.resume and tok.is_file()):  # a resume never replaces the run's own tokenizer
        atomic_write_bytes(tok, (Path(cfg.data[0]) / "tokenizer.json").read_bytes())


def restore(cfg: PretrainConfig, run_dir: Path, s: Any, d: ddp.Dist, log: Callable[[str], None]) -> int:
    """Load the newest good checkpoint of a ``--resume`` into the Setup ``s``: the step to go on from."""
    if not cfg.resume:
        return 0
    path = ckpt.latest_checkpoint(run_dir, log)
    if path is None:
        log(f"lmlab pretrain: {run_dir} has no checkpoint yet; starting from step 0")
        return 0
    state = ckpt.load_checkpoint(path, map_location=d.device)
    ddp.load_full_state(s.base, s.optimizer, state["model"], state["optimizer"], cfg.fsdp)
    s.scheduler.load_state_dict(state["state"]["scheduler"])
    # Each rank continues its own dropout stream; a run resumed on another number of processes
    # cannot, and takes rank 0's.
    ranks = state["state"].get("rng_ranks")
    rng = ranks[d.rank] if ranks and len(ranks) == d.world else state["state"]["rng"]
    torch.set_rng_state(rng["cpu"])
    if d.device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], d.device)
    step = int(state["trainer"]["step"])
    log(f"lmlab pretrain: resuming {run_dir} from {path.name}")
    was, now = saved_resolved(run_dir).get("cpu_fp32_products"), cpu_fp32_products(d.device)
    if was is not None and was != now:
        log(
            f"lmlab pretrain: note: the run multiplied fp32 with {was}, this process with {now} "
            "(PretrainConfig.onednn, LMLAB_ONEDNN); its losses will match an uninterrupted run's to rounding, not bit for bit"
        )
    return step


# ---------------------------------------------------------------------------------------------- final/

TRAINING_FILE = "lmlab_training.json"  # beside a final/ model's Hugging Face files
_TRAINING_KEYS = ("seq_len", "objective")


def model_settings(model_dir: str | os.PathLike | None, config: Any = None) -> dict[str, Any]:
    """The run settings a saved model was trained with (``seq_len``, ``objective``), or {}.

    Read from ``model_dir/lmlab_training.json``; a ``final/`` written by an lmlab that kept them in
    the Hugging Face config (``lmlab_seq_len``, ``lmlab_objective``) is read from ``config``.
    """
    if model_dir:
        with contextlib.suppress(OSError, LmlabError):
            saved = read_json_object(Path(model_dir) / TRAINING_FILE)
            return {k: saved[k] for k in _TRAINING_KEYS if saved.get(k) is not None}
    legacy = {k: getattr(config, f"lmlab_{k}", None) for k in _TRAINING_KEYS}
    return {k: v for k, v in legacy.items() if v is not None}


def write_model_settings(model_dir: str | os.PathLike, settings: dict[str, Any]) -> None:
    """``model_dir/lmlab_training.json``, atomically (a final/ is itself built in a temporary dir)."""
    atomic_write_json(Path(model_dir) / TRAINING_FILE, {k: settings[k] for k in _TRAINING_KEYS})
