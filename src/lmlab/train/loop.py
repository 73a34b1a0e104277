"""The pre-training loop: ``pretrain(cfg)`` trains, evaluates, checkpoints and resumes.

    lmlab pretrain --data data/ --objective span --model t5-tiny --steps 2000 --out runs/t5
    torchrun --nproc_per_node 8 -m lmlab pretrain --data data/ --objective causal --model gpt ...

One optimizer step: ``grad_accum`` micro-batches (this rank's slice of the global batch, built by
the objective in DataLoader workers), each loss the *sum* of token cross-entropies divided by the
number of scored tokens in the whole global batch, so the gradient is the same however the batch
is split over micro-steps and ranks; bf16 autocast on CUDA; clipping; one optimizer and scheduler
step.  Recipes: T5 (Raffel et al. 2020 §3.1: span corruption, Adafactor, inverse-square-root),
continued pre-training from ``--init`` (Gururangan et al. 2020), mixing of several sources
∝ n^α (Xue et al. 2021 §2).
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import functools
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmlab.data.shards import load_meta
from lmlab.errors import LmlabError
from lmlab.io import (
    LOCK_NAME,
    DirLock,
    atomic_dir,
    atomic_open,
    atomic_write_bytes,
    atomic_write_json,
    check_output_dir,
    disk_error,
    is_disk_full,
    remove_stale_temps,
)
from lmlab.models import (
    DECODER,
    ENCODER_DECODER,
    build_model,
    flops_per_step,
    get_preset,
    load_model,
    max_positions,
    model_family,
    onednn,
    peak_flops,
    quiet_hf_progress,
)
from lmlab.train import checkpoint as ckpt
from lmlab.train import distributed as ddp
from lmlab.train.config import RUN_CONFIG, PretrainConfig, read_run_config
from lmlab.train.data import (
    TRAIN_STREAM,
    BatchPlan,
    ObjectiveBatches,
    Sources,
    StepSampler,
    check_same_tokenizer,
    make_loader,
    mixing_rates,
    val_keys,
)
from lmlab.train.loss import loss_sum
from lmlab.train.optim import build_optimizer, build_scheduler

METRICS = "metrics.csv"
METRIC_FIELDS = ("step", "loss", "val_loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "elapsed_s")
FINAL = "final"
# Settings a resumed run must share with the run it continues (the rest only affect reporting/length).
_IDENTITY = ("data", "objective", "model", "batch_size", "seq_len", "lr", "min_lr_ratio", "optimizer",
             "schedule", "warmup", "weight_decay", "grad_accum", "clip", "precision", "fsdp", "init",
             "mix_alpha", "seed", "objective_args")  # fmt: skip


@dataclass
class PretrainResult:
    run_dir: Path
    final_dir: Path | None  # None when the run stopped early on a signal
    step: int
    train_loss: float | None
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, training loss) as logged
    tokens_per_s: float | None = None  # raw corpus tokens per second over the whole run (all ranks)
    mfu: float | None = None  # on GPUs with a known peak
    stopped_by: str | None = None  # "SIGINT" / "SIGTERM" when a signal ended the run early
    precision: str | None = None  # "bf16" (autocast) or "fp32", as resolved for the device


# ---------------------------------------------------------------------------------------------- objective


def make_objective(name: str, tokenizer, family: str, kwargs: dict[str, Any] | None = None):
    """The objective ``name`` for a model of ``family``; a clear error on a mismatch."""
    from lmlab.objectives import get_objective

    kw = dict(kwargs or {})
    if name == "prefix" and family == DECODER:
        kw.setdefault("decoder_only", True)
    obj = get_objective(name, tokenizer, **kw)
    archs = set(getattr(obj, "architectures", ()))
    if family not in archs:
        suits = {"encoder-decoder": "t5-*", "encoder": "bert-*", "decoder": "gpt-*"}
        want = " or ".join(f"{a} ({suits.get(a, a)})" for a in sorted(archs)) or "no model lmlab has"
        raise LmlabError(
            f"objective {name!r} trains {want} models, but the model is {family} ({suits[family]})"
        )
    return obj


# ---------------------------------------------------------------------------------------------- loss


class LossHead(torch.nn.Module):
    """``model`` plus its loss, as one module: ``head(batch)`` → :func:`loss_sum`.

    ``fused``: lmlab's chunked projection + cross-entropy on the model's body (eager runs).  A
    compiled head takes ``fused=False``: compiling the model and its plain loss together lets
    ``torch.compile`` fuse the fp32 upcast and the log-softmax into the projection's consumer.
    """

    def __init__(self, model: torch.nn.Module, family: str, start_id: int = 0, fused: bool = True):
        super().__init__()
        self.model, self.family, self.start_id, self.fused = model, family, start_id, fused

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return loss_sum(self.model, batch, self.family, self.start_id, fused=self.fused)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    nb = device.type == "cuda"
    return {k: v.to(device, non_blocking=nb) for k, v in batch.items()}


@functools.cache
def _cpu_native_bf16() -> bool:
    """Whether this x86 CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); Linux only.

    There oneDNN's bf16 matrix products run about 4× its fp32 ones (measured: 0.93 vs 0.19
    TFLOP/s on 2 cores of an AVX512-BF16 EPYC); elsewhere bf16 is emulated and slower.
    """
    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", info) is not None


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    A CPU training step frees and re-allocates tens of MB of activations.  By default glibc
    returns the free top of its heap to the kernel (and maps big blocks afresh), so each step
    page-faults that memory back in, zero-filled by the kernel: measured for t5-tiny on 2 cores,
    6-7k faults and 10 ms of system time per fp32 step, 16k and 27 ms per bf16 step; with the
    thresholds raised, the bf16 step took 80 instead of 96 ms.  This is what Intel's PyTorch CPU
    tuning guide gets by preloading jemalloc or tcmalloc.  Blocks up to 32 MiB (glibc's ceiling
    for the setting) come from the heap, and up to 1 GiB of free heap is kept.  Process-wide, like
    the TF32 switch of CUDA runs; True where it was applied (Linux with glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # another C library (musl): leave it as it is
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """``bf16`` or ``fp32`` for a run on ``device``; ``auto`` (and None) picks bf16 where native."""
    if precision in (None, "auto"):
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if device.type == "cpu" and _cpu_native_bf16() else "fp32"
    return precision


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def _eval_pass(
    head: LossHead, loader, device: torch.device, d: ddp.Dist, precision: str
) -> tuple[float, int]:
    was_training = head.training
    head.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    try:
        for batch in loader:
            batch = _to(batch, device)
            n = batch.pop("n_targets")
            batch.pop("n_raw")
            with _autocast(device, precision):
                s = head(batch)
            total += torch.stack([s.double(), n.double()])
    finally:
        head.train(was_training)
    ddp.all_reduce_sum(total, d)
    return float(total[0]), int(total[1])


def evaluate(
    model: torch.nn.Module,
    data_dir: str | os.PathLike | list,
    objective: Any,
    *,
    batch_size: int = 32,
    seq_len: int | None = None,
    max_batches: int = 20,
    seed: int = 0,
    device: str | torch.device | None = None,
    workers: int = 0,
    precision: str | None = None,
) -> dict[str, float]:
    """Validation loss of ``model`` on the ``val`` split under ``objective`` (a name or an object).

    ``precision``: ``bf16`` (autocast) or ``fp32``; by default bf16 on CUDA and fp32 on CPU.

    Returns ``loss`` (mean cross-entropy per scored target token, nats), ``perplexity``
    (``exp(loss)``: the perplexity of the objective's targets, e.g. the spans for span
    corruption), ``tokens`` (scored targets) and ``rows``.  The rows and the noise are fixed by
    ``seed``, so an untrained and a trained model are measured on the very same batches.
    """
    from lmlab.data import load_tokenizer

    dirs = [str(x) for x in data_dir] if isinstance(data_dir, list | tuple) else [str(data_dir)]
    check_same_tokenizer(dirs)
    family = model_family(model)
    if isinstance(objective, str):
        objective = make_objective(objective, load_tokenizer(dirs[0]), family)
    seq_len = seq_len or getattr(model.config, "lmlab_seq_len", None) or min(512, max_positions(model) or 512)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    sources = Sources(dirs, int(objective.raw_length(seq_len)), split="val")
    dataset = ObjectiveBatches(sources, objective, seed, shift_labels=family == DECODER)
    keys = val_keys(sources.n_rows, batch_size, max_batches, 0, 1)
    loader = make_loader(dataset, keys, workers, pin_memory=False)
    model.to(dev)
    start_id = getattr(model.config, "decoder_start_token_id", 0) or 0
    # fp32 on CPU unless asked: quantized and float models are then compared on the same arithmetic.
    prec = resolve_precision(precision or ("auto" if dev.type == "cuda" else "fp32"), dev)
    s, n = _eval_pass(LossHead(model, family, start_id), loader, dev, ddp.Dist(device=dev), prec)
    loss = s / max(n, 1)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "tokens": n,
        "rows": sum(len(k[2]) for k in keys),
    }


# ---------------------------------------------------------------------------------------------- signals


class _Stop:
    """SIGINT/SIGTERM set a flag the loop checks between steps; a second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> _Stop:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


# ---------------------------------------------------------------------------------------------- logging


def read_metrics_rows(path: Path, upto: int | None) -> list[dict[str, str]]:
    """The complete, parseable rows of ``metrics.csv`` with ``step <= upto``, in step order.

    What a crash (or a second writer) can leave is skipped, never a crash: a torn last line, NUL
    padding, a row with the wrong number of fields or a step that is not an increasing integer.
    """
    try:
        text = path.read_bytes().decode("utf-8", "replace")
    except FileNotFoundError:
        return []
    lines = text.split("\n")[:-1]  # what follows the last newline is a torn row
    if not lines:
        return []
    header = next(csv.reader([lines[0].replace("\x00", "")]), [])
    if "step" not in header:
        header = list(METRIC_FIELDS)
        lines = ["", *lines]
    rows, last = [], 0
    for line in lines[1:]:
        if "\x00" in line or not line.strip():
            continue
        try:
            fields = next(csv.reader([line]))
        except csv.Error:
            continue
        if len(fields) != len(header):
            continue
        row = dict(zip(header, fields, strict=True))
        try:
            step = int(row["step"])
        except ValueError:
            continue
        if step <= last or (upto is not None and step > upto):
            continue
        rows.append({k: row.get(k, "") for k in METRIC_FIELDS})
        last = step
    return rows


class _Metrics:
    """``metrics.csv`` (always) and TensorBoard (when installed), rank 0 only.

    The file is rewritten whole through a temporary file and a rename when the run starts (a
    resume keeps the rows up to its checkpoint, repaired: :func:`read_metrics_rows`), then
    appended to, one flushed row per logged step.
    """

    def __init__(self, run_dir: Path, resume_step: int | None, enabled: bool, log: Callable[[str], None]):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        self.path = path = run_dir / METRICS
        # A killed run may have logged steps past its last checkpoint: those are redone.
        rows = read_metrics_rows(path, resume_step) if resume_step is not None else []
        with atomic_open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
            w.writeheader()
            w.writerows(rows)
        self.f = open(path, "a", newline="")  # noqa: SIM115 - closed in close()
        self.w = csv.DictWriter(self.f, fieldnames=METRIC_FIELDS)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)
        except ImportError:
            log(
                "lmlab pretrain: tensorboard is not installed; logging to metrics.csv only "
                "(pip install 'lmlab[logging]' adds TensorBoard logs)"
            )

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            self.w.writerow({k: ("" if row.get(k) is None else row[k]) for k in METRIC_FIELDS})
            self.f.flush()
        except OSError as e:
            if is_disk_full(e):
                raise disk_error(self.path) from None
            raise
        if self.tb is not None:
            for k in ("loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
                if row.get(k) is not None:
                    self.tb.add_scalar(f"train/{k}" if k != "val_loss" else "val/loss", row[k], row["step"])

    def close(self) -> None:
        if self.enabled:
            with contextlib.suppress(OSError):  # a full disk was reported where it happened
                self.f.close()
            if self.tb is not None:
                self.tb.close()


# ---------------------------------------------------------------------------------------------- the run


def _resolve_steps(cfg: PretrainConfig, tokens_per_step: int) -> int:
    if cfg.steps is not None:
        return int(cfg.steps)
    if cfg.tokens is not None:
        return max(1, math.ceil(cfg.tokens / tokens_per_step))
    return 1000


def _cpu_fp32_products(device: torch.device) -> str:
    """Which library multiplies fp32 on this device: "onednn" (lmlab.models.onednn) or "torch"."""
    return "onednn" if device.type == "cpu" and onednn.available() else "torch"


def _saved_resolved(run_dir: Path) -> dict[str, Any]:
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


def _check_same_data(cfg: PretrainConfig, run_dir: Path) -> None:
    saved = _saved_resolved(run_dir).get("data_identity")
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


def _check_resume(cfg: PretrainConfig, run_dir: Path) -> None:
    # A setting a run's config.json predates (written by an older lmlab) had its default then.
    saved = {**PretrainConfig().to_dict(), **read_run_config(run_dir)}
    now = cfg.to_dict()
    diff = [k for k in _IDENTITY if saved.get(k) != now.get(k)]
    if diff:
        raise LmlabError(
            f"--resume {run_dir}: settings differ from the run's own ({', '.join(diff)}); "
            "resume with the saved settings (PretrainConfig.resume_from) or start a new --out"
        )


def pretrain(
    cfg: PretrainConfig, on_step: Callable[[int, float | None], None] | None = None
) -> PretrainResult:
    """Run (or, with ``cfg.resume``, continue) one pre-training run; see :class:`PretrainConfig`.

    ``on_step(step, loss)`` is called on every rank after each optimizer step (loss None on
    steps that are not logged).  Returns a :class:`PretrainResult`; the trained model is in
    ``result.final_dir`` (``AutoModelFor*.from_pretrained`` and ``lmlab.data.load_tokenizer`` load it).
    """
    if not cfg.data:
        raise LmlabError("no --data directory given")
    if not cfg.out:
        raise LmlabError("no --out run directory given")
    d = ddp.setup(cfg.device)
    try:
        # The run seeds torch's global generators (dropout draws from them); the caller's state is restored.
        devices = [d.device] if d.device.type == "cuda" else []
        run = _Run(cfg, d, on_step)
        with run.claim(), torch.random.fork_rng(devices=devices):
            return run.run()
    finally:
        ddp.teardown(d)


class _Run:
    def __init__(self, cfg: PretrainConfig, d: ddp.Dist, on_step):
        self.cfg, self.d, self.on_step = cfg, d, on_step
        self.run_dir = Path(cfg.out)
        self.log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if d.is_main else (lambda msg: None)

    # -- setup ------------------------------------------------------------------------------------
    def _check_out(self) -> None:
        cfg, run_dir = self.cfg, self.run_dir
        if cfg.resume:
            _check_resume(cfg, run_dir)
            _check_same_data(cfg, run_dir)
        elif (run_dir / RUN_CONFIG).exists() or ckpt.list_checkpoints(run_dir):
            raise LmlabError(
                f"{run_dir} already holds a run; continue it with --resume {run_dir} or choose another --out"
            )
        else:
            inputs = [*cfg.data, *([cfg.init] if cfg.init else [])]
            check_output_dir(run_dir, "run", inputs=inputs)

    @contextlib.contextmanager
    def claim(self):
        """Own the run directory for the whole run: checked, locked, and rid of dead writers' temps.

        One writer per run directory (:class:`lmlab.io.DirLock`, rank 0 only: the other ranks never
        write it); a second ``pretrain`` on the same directory gets a one-line error naming the
        holder's PID.  The checks run before the lock is taken in a directory without one (so a
        refused ``--out`` is left exactly as it was) and again under it (another process may have
        started a run meanwhile).  A run that fails before writing anything takes away the
        directory or lock file it created.
        """
        if self.cfg.resume:
            read_run_config(self.run_dir)  # a one-line error for a directory that holds no run
        existed = self.run_dir.exists()
        had_lock = (self.run_dir / LOCK_NAME).exists()
        # A directory with a lock file is (or was) a run's: a live holder is named before anything
        # else is said about it; any other directory is checked before a lock file is put in it.
        if not self.d.is_main:
            # The other ranks never write the directory; rank 0 may already have started filling it.
            if self.cfg.resume:
                self._check_out()
            yield
            return
        if not had_lock:
            self._check_out()
        lock = DirLock(self.run_dir).acquire()
        ok = False
        try:
            self._check_out()
            remove_stale_temps(self.run_dir)
            remove_stale_temps(self.run_dir / ckpt.CHECKPOINTS)
            yield
            ok = True
        finally:
            lock.release()
            if not ok and not had_lock:
                with contextlib.suppress(OSError):
                    left = {p.name for p in self.run_dir.iterdir()}
                    if left == {LOCK_NAME}:
                        (self.run_dir / LOCK_NAME).unlink()
                        if not existed:
                            self.run_dir.rmdir()

    def _build(self) -> None:
        from lmlab.data import load_tokenizer

        cfg, d = self.cfg, self.d
        meta = check_same_tokenizer(cfg.data)
        self.tokenizer = load_tokenizer(cfg.data[0])
        vocab = int(meta["vocab_size"])
        specials = meta.get("special_ids", {})
        if cfg.init:
            model = load_model(cfg.init)
            if model.config.vocab_size != vocab:
                raise LmlabError(
                    f"--init {cfg.init} has a vocabulary of {model.config.vocab_size} ids but the data's "
                    f"tokenizer has {vocab}; continue pre-training on data prepared with the model's tokenizer"
                )
            default_len = getattr(model.config, "lmlab_seq_len", None) or 512
        else:
            preset = get_preset(cfg.model)
            model = build_model(preset, vocab, specials, seed=cfg.seed)
            default_len = preset.seq_len
        self.family = model_family(model)
        self.seq_len = int(cfg.seq_len or default_len)
        limit = max_positions(model)
        if limit is not None and self.seq_len > limit:
            raise LmlabError(f"--seq-len {self.seq_len} exceeds the model's {limit} positions")
        self.objective = make_objective(cfg.objective, self.tokenizer, self.family, cfg.objective_args)
        if self.seq_len < 1:
            raise LmlabError(f"--seq-len must be positive, got {self.seq_len}")
        self.raw_len = int(self.objective.raw_length(self.seq_len))
        if self.raw_len < 1:
            raise LmlabError(
                f"--seq-len {self.seq_len} is too short for --objective {cfg.objective} "
                f"(its rows would hold {self.raw_len} corpus tokens); raise --seq-len"
            )
        model.config.lmlab_seq_len = self.seq_len
        model.config.lmlab_objective = cfg.objective
        self.start_id = getattr(model.config, "decoder_start_token_id", 0) or 0

        if cfg.batch_size % (cfg.grad_accum * d.world):
            raise LmlabError(
                f"--batch-size {cfg.batch_size} must be divisible by --grad-accum {cfg.grad_accum} × "
                f"{d.world} processes"
            )
        self.sources = Sources(cfg.data, self.raw_len)
        sizes = [len(t) for t in self.sources.tokens]
        self.rates = mixing_rates(sizes, cfg.mix_alpha)
        self.plan = BatchPlan(self.sources.n_rows, self.rates, cfg.batch_size, cfg.seed)
        self.tokens_per_step = cfg.batch_size * self.raw_len
        self.total = _resolve_steps(cfg, self.tokens_per_step)
        self.warmup = cfg.warmup if cfg.warmup is not None else min(1000, self.total // 20)

        self.precision = resolve_precision(cfg.precision, d.device)
        self.base = model.to(d.device)
        if d.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        else:
            keep_freed_memory()
        if cfg.fsdp:
            ddp.shard_(self.base, d)
        # What a step calls: the loss head, compiled if asked, under DDP when on several ranks (nanoGPT's
        # order: compile, then DDP).  Evaluation uses the eager head: it runs rarely, and a compiled
        # no-grad graph would cost a second compilation.
        # The loss: the fused chunked projection + cross-entropy (lmlab.train.loss) in eager mode.  Under
        # torch.compile the model's own logits path, which Inductor fuses itself; under FSDP too, whose
        # unsharding hooks sit on the model's own forward.
        self.eval_head = LossHead(self.base, self.family, self.start_id, fused=not cfg.fsdp)
        if cfg.compile:
            head = torch.compile(LossHead(self.base, self.family, self.start_id, fused=False))
        else:
            head = self.eval_head
        self.train_head = head if cfg.fsdp else ddp.wrap_ddp(head, d)
        self.sync_target = self.base if cfg.fsdp else self.train_head
        self.optimizer = build_optimizer(self.base, cfg, d.device)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.total, self.warmup)
        self.dataset = ObjectiveBatches(
            self.sources, self.objective, cfg.seed, shift_labels=self.family == DECODER
        )
        self._check_targets()
        self.val_sources = None
        # Data prepared with --val-fraction 0 has an empty val split: it is trained on, not validated on.
        val_dirs = [x for x in cfg.data if int(load_meta(x)["val"]["tokens"]) > 0]
        if not val_dirs:
            self.log(
                "lmlab pretrain: note: the data has no validation split (prepared with --val-fraction 0); "
                "training without a validation loss"
            )
        else:
            if len(val_dirs) < len(cfg.data):
                missing = ", ".join(x for x in cfg.data if x not in val_dirs)
                self.log(f"lmlab pretrain: note: {missing} has no validation split; validating on the others")
            self.val_sources = Sources(val_dirs, self.raw_len, split="val")
            self.val_dataset = ObjectiveBatches(
                self.val_sources, self.objective, cfg.seed, shift_labels=self.family == DECODER
            )

    def _check_targets(self) -> None:
        """Refuse a configuration that scores no target (causal at ``--seq-len 1``: a loss of 0)."""
        rows = np.array([[0, r] for r in range(min(8, self.sources.n_rows[0]))], dtype=np.int64)
        batch = self.dataset[(TRAIN_STREAM, 0, rows, 0, len(rows))]
        if int(batch["n_targets"]) == 0:
            raise LmlabError(
                f"--objective {self.cfg.objective} with --seq-len {self.seq_len} leaves no target to score "
                f"(0 scored tokens in {len(rows)} rows); raise --seq-len"
            )

    def _restore(self) -> int:
        if not self.cfg.resume:
            return 0
        path = ckpt.latest_checkpoint(self.run_dir, self.log)
        if path is None:
            self.log(f"lmlab pretrain: {self.run_dir} has no checkpoint yet; starting from step 0")
            return 0
        state = ckpt.load_checkpoint(path, map_location=self.d.device)
        ddp.load_full_state(self.base, self.optimizer, state["model"], state["optimizer"], self.cfg.fsdp)
        self.scheduler.load_state_dict(state["state"]["scheduler"])
        # Each rank continues its own dropout stream; a run resumed on another number of processes
        # cannot, and takes rank 0's.
        ranks = state["state"].get("rng_ranks")
        rng = ranks[self.d.rank] if ranks and len(ranks) == self.d.world else state["state"]["rng"]
        torch.set_rng_state(rng["cpu"])
        if self.d.device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], self.d.device)
        step = int(state["trainer"]["step"])
        self.log(f"lmlab pretrain: resuming {self.run_dir} from {path.name}")
        was, now = _saved_resolved(self.run_dir).get("cpu_fp32_products"), _cpu_fp32_products(self.d.device)
        if was is not None and was != now:
            self.log(
                f"lmlab pretrain: note: the run multiplied fp32 with {was}, this process with {now} "
                "(LMLAB_ONEDNN); its losses will match an uninterrupted run's to rounding, not bit for bit"
            )
        return step

    def _write_run_files(self) -> None:
        if not self.d.is_main:
            return
        resolved = {
            "seq_len": self.seq_len,
            "raw_len": self.raw_len,
            "total_steps": self.total,
            "warmup": self.warmup,
            "family": self.family,
            "precision": self.precision,
            # Which library multiplies fp32 on CPU (lmlab.models.onednn): results agree to rounding,
            # not bit for bit, so a resumed run that must reproduce this one needs the same.
            "cpu_fp32_products": _cpu_fp32_products(self.d.device),
            "world_size": self.d.world,
            "mixing_rates": {d: float(p) for d, p in zip(self.cfg.data, self.rates, strict=True)},
            # Checked by --resume (data_identity's docstring says what it covers).
            "data_identity": data_identity(self.cfg.data),
        }
        atomic_write_json(self.run_dir / RUN_CONFIG, {"config": self.cfg.to_dict(), "resolved": resolved})
        tok = self.run_dir / "tokenizer.json"
        if not (self.cfg.resume and tok.is_file()):  # a resume never replaces the run's own tokenizer
            atomic_write_bytes(tok, (Path(self.cfg.data[0]) / "tokenizer.json").read_bytes())

    # -- state ------------------------------------------------------------------------------------
    def _diverged(self, step: int, what: str) -> LmlabError:
        last = ckpt.last_checked(self.run_dir)
        if last is not None:
            where = f"the last good checkpoint is {last.name}"
        elif ckpt.list_checkpoints(self.run_dir):
            where = "no checkpoint of this run was checked finite"
        else:
            where = "no checkpoint was written"
        return LmlabError(
            f"{what} at step {step}; stopping ({where}). Lower --lr, raise --warmup or set --clip"
        )

    def _check_finite(self, step: int) -> None:
        """Refuse to save a diverged state: every loss since the last check, and every weight.

        The losses were summed on the device as the steps ran (no host sync per step); the weights
        take one max-abs pass (``torch._foreach_norm(·, inf)``, which cannot overflow).  On all
        ranks together, so they all stop, or all save.
        """
        params = [p.detach() for p in self.base.parameters() if p.is_floating_point()]
        params = [p.to_local() if hasattr(p, "to_local") else p for p in params]
        params = [p for p in params if p.numel()]
        bad = torch.zeros(2, dtype=torch.float64, device=self.d.device)
        bad[0] = (~torch.isfinite(self.unchecked_loss)).double()
        if params:
            bad[1] = (~torch.isfinite(torch.stack(torch._foreach_norm(params, math.inf)))).any().double()
        ddp.all_reduce_sum(bad, self.d)
        if bad[0] > 0:
            raise self._diverged(step, "the training loss became nan or inf")
        if bad[1] > 0:
            raise self._diverged(step, "the training loss became nan: the model's weights hold nan or inf")
        self.unchecked_loss.zero_()

    def _save(self, step: int, tokens: int, loss: float | None) -> Path | None:
        self._check_finite(step)
        model_state, optim_state = ddp.full_state(self.base, self.optimizer, self.cfg.fsdp)
        path = None
        rng = {"cpu": torch.get_rng_state()}
        if self.d.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.d.device).cpu()
        ranks = [rng]
        if self.d.world > 1:
            ranks = [None] * self.d.world
            torch.distributed.all_gather_object(ranks, rng)
        if self.d.is_main:
            extra = {"scheduler": self.scheduler.state_dict(), "rng": ranks[0], "rng_ranks": ranks}
            trainer = {"tokens": tokens, "loss": loss, "data": {"next_step": step, "seed": self.cfg.seed}}
            path = ckpt.save_checkpoint(
                self.run_dir, step, model_state, optim_state, extra, trainer, self.cfg.keep
            )
        if self.d.world > 1:
            torch.distributed.barrier()
        return path

    def _save_final(self, step: int) -> Path:
        self._check_finite(step)
        final = self.run_dir / FINAL
        model_state, _ = ddp.full_state(self.base, self.optimizer, True) if self.cfg.fsdp else (None, None)
        if self.d.is_main:
            with atomic_dir(final) as tmp, quiet_hf_progress():
                if self.cfg.fsdp and torch.distributed.is_initialized():
                    self.base.save_pretrained(tmp, state_dict=model_state)
                else:
                    self.base.save_pretrained(tmp)
                self.tokenizer.save_pretrained(tmp)
                # The run's own tokenizer.json, byte for byte, so load_tokenizer(final) sees lmlab's layout.
                shutil.copyfile(self.run_dir / "tokenizer.json", tmp / "tokenizer.json")
        if self.d.world > 1:
            torch.distributed.barrier()
        return final

    # -- the loop ---------------------------------------------------------------------------------
    def _evaluate(self) -> float | None:
        if self.val_sources is None:
            return None
        keys = val_keys(self.val_sources.n_rows, self.cfg.batch_size, self.cfg.eval_batches,
                        self.d.rank, self.d.world)  # fmt: skip
        loader = make_loader(self.val_dataset, keys, 0, pin_memory=False)
        s, n = _eval_pass(self.eval_head, loader, self.d.device, self.d, self.precision)
        return s / max(n, 1)

    def run(self) -> PretrainResult:
        cfg, d = self.cfg, self.d
        self._check_out()
        self._build()
        # Dropout's generator: seeded by the run's seed and the rank (so ranks draw different masks),
        # then replaced by the checkpoint's own state on a resume.
        a, b = np.random.SeedSequence([cfg.seed, 0x64726F70, d.rank]).generate_state(2, np.uint32)
        torch.manual_seed(int(a) << 32 | int(b))
        start = self._restore()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._write_run_files()
        if start >= self.total:
            self.log(f"lmlab pretrain: {self.run_dir} already reached step {start} of {self.total}")
        metrics = _Metrics(self.run_dir, start if cfg.resume else None, d.is_main, self.log)
        result = PretrainResult(self.run_dir, None, start, None, precision=self.precision)
        try:
            self._loop(start, metrics, result)
        finally:
            metrics.close()
        return result

    def _loop(self, start: int, metrics: _Metrics, result: PretrainResult) -> None:
        cfg, d, dev = self.cfg, self.d, self.d.device
        sampler = StepSampler(self.plan, start, self.total, d.rank, d.world, cfg.grad_accum)
        # On CPU a worker process would take cycles from the model's threads (measured slower on 2 cores).
        workers = cfg.workers if cfg.workers is not None else (0 if dev.type == "cpu" else 1)
        loader = make_loader(self.dataset, sampler, workers, pin_memory=dev.type == "cuda")
        batches = iter(loader)
        peak = peak_flops(dev)
        flops = None
        bar = None
        if d.is_main and cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total, initial=start, desc="pretrain", unit="step", dynamic_ncols=True)
            self.log = lambda msg: bar.write(msg, file=sys.stderr)  # lines above the bar, not through it
        tokens = start * self.tokens_per_step
        saved_step = start if cfg.resume else -1
        last_loss: float | None = None
        t_mark, tok_mark = time.perf_counter(), tokens
        timed_tokens, timed_s = 0, 0.0
        t_begin = time.perf_counter()
        step = start
        # Every step's loss is added here until a save checks it (_check_finite): a checkpoint is
        # never written from a diverged state, even when the steps before it were not logged.
        self.unchecked_loss = torch.zeros((), dtype=torch.float32, device=dev)
        self.train_head.train()
        with _Stop() as stop:
            while step < self.total:
                micro = None
                if stop.signum is None:
                    try:
                        micro = [next(batches) for _ in range(cfg.grad_accum)]
                    except RuntimeError:
                        # A terminal's Ctrl-C also reaches the DataLoader workers, which then exit.
                        if stop.signum is None:
                            raise
                n_local = sum(int(b["n_targets"]) for b in micro) if micro else 0
                # One small collective per step: the global count of scored tokens, and whether any rank
                # was asked to stop (so all ranks stop after the same step).
                if d.world > 1:
                    agree = torch.tensor([n_local, 1 if stop.signum else 0], dtype=torch.float64, device=dev)
                    ddp.all_reduce_sum(agree, d)
                    n_global, stopping = int(agree[0]), bool(agree[1] > 0)
                else:  # no device round trip: a CUDA step then never waits for the host
                    n_global, stopping = n_local, stop.signum is not None
                if stopping or micro is None:
                    stop.signum = stop.signum or signal.SIGTERM
                    break
                count = max(n_global, 1)
                step_loss = torch.zeros((), dtype=torch.float32, device=dev)
                for i, b in enumerate(micro):
                    b = _to(b, dev)
                    b.pop("n_targets")
                    b.pop("n_raw")
                    if flops is None:
                        tgt = b["labels"].shape[1] if self.family == ENCODER_DECODER else None
                        flops = flops_per_step(self.base, cfg.batch_size, b["input_ids"].shape[1], tgt)
                    with (
                        ddp.no_sync(self.sync_target, cfg.fsdp, i == len(micro) - 1),
                        _autocast(dev, self.precision),
                    ):
                        s = self.train_head(b)
                        (s * (d.world / count)).backward()
                    step_loss += s.detach()
                self.unchecked_loss += step_loss
                grad_norm = None
                if cfg.clip is not None:
                    grad_norm = torch.nn.utils.clip_grad_norm_(self.base.parameters(), cfg.clip)
                lr = self.scheduler.get_last_lr()[0]
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens += self.tokens_per_step

                is_log = step % cfg.log_every == 0 or step == self.total
                is_eval = step % cfg.eval_every == 0 or step == self.total
                is_save = step % cfg.save_every == 0
                loss_value = None
                if is_log or is_save or is_eval:
                    ddp.all_reduce_sum(step_loss, d)
                    loss_value = float(step_loss) / count
                    if not math.isfinite(loss_value):
                        raise self._diverged(step, f"the training loss became {loss_value}")
                    last_loss = loss_value
                    result.losses.append((step, loss_value))
                row: dict[str, Any] | None = None
                if is_log:
                    now = time.perf_counter()
                    tps = (tokens - tok_mark) / max(now - t_mark, 1e-9)
                    if step - start > 1 or step == self.total:  # the first step pays for start-up
                        timed_tokens += tokens - tok_mark
                        timed_s += now - t_mark
                    mfu = flops * (tps / self.tokens_per_step) / (peak * d.world) if peak and flops else None
                    gn = float(grad_norm) if grad_norm is not None else None
                    row = dict(step=step, loss=loss_value, lr=lr, grad_norm=gn, tokens=tokens,
                               tokens_per_s=round(tps, 1), mfu=round(mfu, 4) if mfu else None,
                               elapsed_s=round(now - t_begin, 3))  # fmt: skip
                    if bar is not None:
                        post = {"loss": f"{loss_value:.4f}", "tok/s": f"{tps:,.0f}"}
                        if mfu is not None:
                            post["mfu"] = f"{100 * mfu:.1f}%"
                        bar.set_postfix(post, refresh=False)
                if is_eval and self.val_sources is not None:
                    val = self._evaluate()
                    result.evals.append((step, val))
                    row = row or dict(step=step, loss=loss_value, lr=lr, tokens=tokens)
                    row["val_loss"] = val
                    self.log(f"lmlab pretrain: step {step}: val loss {val:.4f}")
                if row is not None:
                    metrics.write(row)
                if is_save and step < self.total:
                    self._save(step, tokens, loss_value)
                    saved_step = step
                if bar is not None:
                    bar.update(1)
                if is_log or is_eval or is_save:
                    t_mark, tok_mark = time.perf_counter(), tokens
                if self.on_step is not None:
                    self.on_step(step, loss_value)
            del batches
            if bar is not None:
                bar.close()
            result.step = step
            result.train_loss = last_loss
            result.tokens_per_s = timed_tokens / timed_s if timed_s > 0 else None
            if result.tokens_per_s and peak and flops:
                result.mfu = flops * (result.tokens_per_s / self.tokens_per_step) / (peak * d.world)
            if stop.signum is not None:
                name = signal.Signals(stop.signum).name
                if saved_step != step:
                    self._save(step, tokens, last_loss)
                result.stopped_by = name
                self.log(
                    f"lmlab pretrain: stopped by {name} after step {step}; checkpoint written. "
                    f"Continue with: lmlab pretrain --resume {self.run_dir}"
                )
                return
        if saved_step != step:
            self._save(step, tokens, last_loss)
        result.final_dir = self._save_final(step)
        self.log(f"lmlab pretrain: done, {step} steps; model in {result.final_dir}")
