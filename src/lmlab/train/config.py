"""The settings of one pre-training run, as a dataclass that mirrors ``lmlab pretrain``'s flags.

Validated in ``__post_init__`` so a bad value fails before any data or model is touched.  The
run directory keeps these settings in ``config.json``; ``--resume`` reads them back.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError
from lmlab.runtime import check_onednn_policy

OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("cosine", "inverse-sqrt", "constant")
# auto: bf16 autocast where the device multiplies bf16 natively (CUDA; x86 CPUs with AVX512-BF16 or
# AMX), else fp32.  Weights and optimizer state stay fp32 either way (mixed precision).
PRECISIONS = ("auto", "bf16", "fp32")
# Peak learning rates when --lr is not given: AdamW's usual small-model value, and T5's Adafactor 1e-2.
DEFAULT_LR = {"adamw": 1e-3, "adafactor": 1e-2}


@dataclass
class PretrainConfig:
    """One run.  ``batch_size`` is the *global* batch in rows per optimizer step: it is split over
    ``grad_accum`` micro-steps and the data-parallel ranks, so a run means the same whatever
    the number of processes.  ``seq_len`` is the model's input length; the objective decides
    how many raw corpus tokens a row needs for it (span corruption: 512 -> 568)."""

    data: list[str] = field(default_factory=list)
    out: str = ""
    objective: str = "span"
    model: str = "t5-tiny"
    steps: int | None = None
    tokens: int | None = None
    batch_size: int = 32
    seq_len: int | None = None  # None: the preset's default
    lr: float | None = None  # None: DEFAULT_LR[optimizer]
    min_lr_ratio: float = 0.1
    optimizer: str = "adamw"
    schedule: str = "cosine"
    warmup: int | None = None  # None: 5% of the steps, at most 1000
    weight_decay: float = 0.01
    grad_accum: int = 1
    clip: float | None = 1.0
    eval_every: int = 100
    eval_batches: int = 20
    save_every: int = 500
    keep: int = 3
    log_every: int = 1
    compile: bool = False
    precision: str = "auto"
    fsdp: bool = False
    init: str | None = None
    mix_alpha: float = 1.0
    seed: int = 0
    workers: int | None = None  # None: 0 on CPU (the cores are the model's), 1 on GPUs
    device: str | None = None  # None: cuda when available, else cpu
    objective_args: dict[str, Any] = field(default_factory=dict)
    progress: bool = True
    # fp32 CPU products: auto, on or off (lmlab.runtime.onednn_policy); the CLI passes $LMLAB_ONEDNN.
    onednn: str = "auto"
    resume: bool = False  # continue the run in ``out`` from its newest good checkpoint

    def __post_init__(self) -> None:
        if isinstance(self.data, str | Path):
            self.data = [self.data]
        check_types(self)
        self.data = [str(d) for d in self.data]
        self.out = str(self.out)
        if self.init is not None:
            self.init = str(self.init)
        self.onednn = check_onednn_policy(self.onednn)
        self._check_choices()
        self._check_numbers()

    def _check_choices(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise LmlabError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise LmlabError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.precision not in PRECISIONS:
            raise LmlabError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")

    def _check_numbers(self) -> None:
        if self.steps is not None and self.tokens is not None:
            raise LmlabError("give --steps or --tokens, not both")
        positive = {
            "steps": self.steps,
            "tokens": self.tokens,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "grad_accum": self.grad_accum,
            "eval_every": self.eval_every,
            "save_every": self.save_every,
            "keep": self.keep,
            "log_every": self.log_every,
            "eval_batches": self.eval_batches,
        }
        for k, v in positive.items():
            if v is not None and int(v) <= 0:
                raise LmlabError(f"--{k.replace('_', '-')} must be positive, got {v}")
        finite = {"lr": self.lr, "clip": self.clip, "weight_decay": self.weight_decay, "mix_alpha": self.mix_alpha,
                  "min_lr_ratio": self.min_lr_ratio}  # fmt: skip
        for k, v in finite.items():
            if v is not None and not math.isfinite(v):
                off = " (omit it, or 0, for no clipping)" if k == "clip" else ""
                raise LmlabError(f"--{k.replace('_', '-')} must be a finite number, got {v}{off}")
        if self.lr is not None and not self.lr > 0:
            raise LmlabError(f"--lr must be positive, got {self.lr}")
        if not self.weight_decay >= 0:
            raise LmlabError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.warmup is not None and self.warmup < 0:
            raise LmlabError(f"--warmup must be >= 0, got {self.warmup}")
        if self.clip is not None and not self.clip > 0:
            raise LmlabError(f"--clip must be positive (or omitted), got {self.clip}")
        if self.workers is not None and self.workers < 0:
            raise LmlabError(f"--workers must be >= 0, got {self.workers}")
        if not self.mix_alpha >= 0:
            raise LmlabError(f"--mix-alpha must be >= 0, got {self.mix_alpha}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise LmlabError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.batch_size % self.grad_accum:
            raise LmlabError(
                f"--batch-size {self.batch_size} is not divisible by --grad-accum {self.grad_accum}"
            )

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def resume_from(cls, run_dir: str | Path, **overrides: Any) -> PretrainConfig:
        """The saved settings of the run in ``run_dir``, with ``overrides`` (only those in
        :data:`RESUME_OVERRIDABLE`, e.g. a larger ``steps``) applied, ready to resume."""
        saved = read_run_config(run_dir)
        bad = sorted(k for k, v in overrides.items() if k not in RESUME_OVERRIDABLE and v != saved.get(k))
        if bad:
            raise LmlabError(
                f"--resume continues {run_dir} with its own settings; {', '.join(bad)} cannot change "
                f"(only {', '.join(sorted(RESUME_OVERRIDABLE))} can)"
            )
        if overrides.get("steps") is not None:
            saved["tokens"] = None
        if overrides.get("tokens") is not None:
            saved["steps"] = None
        try:
            return cls.from_dict({**saved, **overrides, "out": str(run_dir), "resume": True})
        except LmlabError as e:
            raise LmlabError(f"{Path(run_dir) / RUN_CONFIG}: {e}") from None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PretrainConfig:
        if not isinstance(d, dict):
            raise LmlabError(f"run config must be a JSON object of settings, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise LmlabError(f"run config has unknown settings {sorted(unknown)} (written by another lmlab?)")
        return cls(**d)


# The JSON types each setting may have (None where the field allows it); checked so that a
# hand-edited config.json ("steps": "ten") is a one-line error, not a TypeError deep in the loop.
_INT = ("steps", "tokens", "batch_size", "seq_len", "warmup", "grad_accum", "eval_every", "eval_batches",
        "save_every", "keep", "log_every", "seed", "workers")  # fmt: skip
_FLOAT = ("lr", "min_lr_ratio", "weight_decay", "clip", "mix_alpha")
_STR = ("out", "objective", "model", "optimizer", "schedule", "precision", "init", "device", "onednn")
_BOOL = ("compile", "fsdp", "progress", "resume")
_OPTIONAL = ("steps", "tokens", "seq_len", "lr", "warmup", "clip", "init", "workers", "device")


def _kind(name: str, value: Any) -> str | None:
    """What ``value`` should have been for setting ``name``, or None when it is fine."""
    if value is None:
        return None if name in _OPTIONAL else "given"
    if name in _INT:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if name in _FLOAT:
        return None if isinstance(value, int | float) and not isinstance(value, bool) else "a number"
    if name in _STR:
        return None if isinstance(value, str | Path) else "a string"
    if name in _BOOL:
        return None if isinstance(value, bool) else "true or false"
    if name == "data":
        ok = isinstance(value, list | tuple) and all(isinstance(x, str | Path) for x in value)
        return None if ok else "a list of directories"
    if name == "objective_args":
        return None if isinstance(value, dict) and all(isinstance(k, str) for k in value) else "an object"
    return None


def check_types(cfg: PretrainConfig) -> None:
    """A one-line error naming the first setting whose value has the wrong type."""
    for f in dataclasses.fields(cfg):
        want = _kind(f.name, getattr(cfg, f.name))
        if want is not None:
            raise LmlabError(f"setting {f.name} must be {want}, got {getattr(cfg, f.name)!r}")


RUN_CONFIG = "config.json"
# Settings a resumed run may change: how long it runs and how it reports, never what it computes.
RESUME_OVERRIDABLE = frozenset(
    {
        "steps",
        "tokens",
        "eval_every",
        "eval_batches",
        "save_every",
        "keep",
        "log_every",
        "workers",
        "device",
        "onednn",
        "progress",
        "compile",
        "out",
        "resume",
    }
)


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """The ``PretrainConfig`` fields saved in ``RUN_DIR/config.json``."""
    import json

    p = Path(run_dir) / RUN_CONFIG
    if not p.is_file():
        raise LmlabError(f"{run_dir} is not an lmlab run directory (no {RUN_CONFIG}); nothing to resume")
    try:
        saved = json.loads(p.read_text(encoding="utf-8"))["config"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise LmlabError(f"{p} is unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(saved, dict):
        raise LmlabError(
            f"{p} is unreadable: its config is {type(saved).__name__}, not an object of settings"
        )
    return saved
