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

This module is the loop itself (:func:`pretrain`, :func:`train_step`, signals, saves); the run's
set-up is :mod:`lmlab.train.setup`, its directory and resume checks :mod:`lmlab.train.state`, its
metrics :mod:`lmlab.train.metrics`, its precision :mod:`lmlab.train.precision`, and validation
:mod:`lmlab.eval`.

Validation reports the loss per scored target (``val_loss``, nats) and bits per byte (``val_bpb``):
the loss summed over the targets / the UTF-8 bytes of the validation rows' corpus tokens / ln 2
(:func:`lmlab.eval.bytes.token_byte_lengths`; lm-evaluation-harness's ``bits_per_byte``), so runs
with different tokenizers compare.  The rows are fixed, so their bytes are counted once.  For the
causal objective it is the text's bits per byte (the first token of each row, which nothing
predicts, is in the bytes); for the denoising objectives (span, bert, ...) it is the bits of the
corrupted targets per byte of the whole text, comparable between runs of the same objective and
noise density.  Process tuning (TF32, glibc's malloc) is :mod:`lmlab.runtime`'s, applied only
when asked (``tune_process=True``, as ``lmlab pretrain`` does).
"""

from __future__ import annotations

import math
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

from lmlab import runtime
from lmlab.errors import LmlabError
from lmlab.eval.bytes import bytes_of, token_byte_lengths
from lmlab.eval.loss import eval_pass
from lmlab.io import atomic_dir
from lmlab.models import ENCODER_DECODER, flops_per_step, peak_flops, quiet_hf_progress
from lmlab.train import checkpoint as ckpt
from lmlab.train import distributed as ddp
from lmlab.train import state
from lmlab.train.config import PretrainConfig
from lmlab.train.data import StepSampler, make_loader, to_device, val_keys
from lmlab.train.metrics import Metrics
from lmlab.train.precision import autocast
from lmlab.train.setup import Setup, build

__all__ = ["PretrainResult", "pretrain", "train_step"]


@dataclass
class PretrainResult:
    run_dir: Path
    final_dir: Path | None  # None when the run stopped early on a signal
    step: int
    train_loss: float | None
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)
    val_bpb: list[tuple[int, float]] = field(default_factory=list)  # (step, validation bits per byte)
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, training loss) as logged
    tokens_per_s: float | None = None  # raw corpus tokens per second over the whole run (all ranks)
    mfu: float | None = None  # on GPUs with a known peak
    stopped_by: str | None = None  # "SIGINT" / "SIGTERM" when a signal ended the run early
    precision: str | None = None  # "bf16" (autocast) or "fp32", as resolved for the device


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


def pretrain(
    cfg: PretrainConfig,
    on_step: Callable[[int, float | None], None] | None = None,
    *,
    tune_process: bool = False,
    peak_tflops: float | None = None,
) -> PretrainResult:
    """Run (or, with ``cfg.resume``, continue) one pre-training run; see :class:`PretrainConfig`.

    ``on_step(step, loss)`` is called on every rank after each optimizer step (loss None on
    steps that are not logged).  Returns a :class:`PretrainResult`; the trained model is in
    ``result.final_dir`` (``AutoModelFor*.from_pretrained`` and ``lmlab.data.load_tokenizer`` load it).

    The caller's process is left as it was: torch's global generators are restored, and fp32 CPU
    products follow ``cfg.onednn`` only for the run.  ``tune_process=True`` also applies
    :func:`lmlab.runtime.tune_process` (TF32 on CUDA, glibc keeping freed memory on CPU: faster
    steps), which stays on for the whole process afterwards; ``lmlab pretrain`` asks for it.
    ``peak_tflops`` replaces the device's dense bf16 peak in the progress bar's MFU
    (:func:`lmlab.models.peak_flops`; ``lmlab pretrain`` reads ``$LMLAB_PEAK_TFLOPS``).
    """
    if not cfg.data:
        raise LmlabError("no --data directory given")
    if not cfg.out:
        raise LmlabError("no --out run directory given")
    d = ddp.setup(cfg.device)
    try:
        if tune_process:
            runtime.tune_process(d.device)
        # The run seeds torch's global generators (dropout draws from them); the caller's state is restored.
        devices = [d.device] if d.device.type == "cuda" else []
        run = _Run(cfg, d, on_step, peak_tflops)
        with (
            state.claim(cfg, run.run_dir, d.is_main),
            torch.random.fork_rng(devices=devices),
            runtime.onednn_policy(cfg.onednn),
        ):
            return run.run()
    finally:
        ddp.teardown(d)


def train_step(s: Setup, micro: list[dict[str, torch.Tensor]], count: int, d: ddp.Dist, fsdp: bool,
               clip: float | None) -> tuple[torch.Tensor, torch.Tensor | None, float]:  # fmt: skip
    """One optimizer step over this rank's micro-batches; ``count`` the scored tokens of the global batch.

    Each micro-batch's loss is its *sum* of token cross-entropies scaled by ``world / count`` (DDP
    averages over ranks), so the gradient is the global batch's mean however it is split; the
    gradient sync waits for the last micro-batch.  Returns this rank's summed loss (a device scalar,
    not synced), the gradient norm before clipping (None without ``clip``) and the learning rate
    the step used.
    """
    dev = d.device
    step_loss = torch.zeros((), dtype=torch.float32, device=dev)
    for i, b in enumerate(micro):
        b = to_device(b, dev)
        b.pop("n_targets")
        b.pop("n_raw")
        with ddp.no_sync(s.sync_target, fsdp, i == len(micro) - 1), autocast(dev, s.precision):
            loss = s.train_head(b)
            (loss * (d.world / count)).backward()
        step_loss += loss.detach()
    grad_norm = None
    if clip is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(s.base.parameters(), clip)
    lr = s.scheduler.get_last_lr()[0]
    s.optimizer.step()
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    return step_loss, grad_norm, lr


@dataclass
class _Progress:
    """Where the loop is: the step, the tokens, the last save and loss, and its clocks."""

    start: int
    step: int
    tokens: int
    saved_step: int
    peak: float | None
    flops: float | None = None
    last_loss: float | None = None
    t_begin: float = field(default_factory=time.perf_counter)
    t_mark: float = field(default_factory=time.perf_counter)
    tok_mark: int = 0
    timed_tokens: int = 0
    timed_s: float = 0.0


class _Run:
    def __init__(self, cfg: PretrainConfig, d: ddp.Dist, on_step, peak_tflops: float | None = None):
        self.cfg, self.d, self.on_step, self.peak_tflops = cfg, d, on_step, peak_tflops
        self.run_dir = Path(cfg.out)
        self.log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if d.is_main else (lambda msg: None)

    def _build(self) -> None:
        self.s = build(self.cfg, self.d, self.log)

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
        params = [p.detach() for p in self.s.base.parameters() if p.is_floating_point()]
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
        model_state, optim_state = ddp.full_state(self.s.base, self.s.optimizer, self.cfg.fsdp)
        path = None
        rng = {"cpu": torch.get_rng_state()}
        if self.d.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.d.device).cpu()
        ranks = [rng]
        if self.d.world > 1:
            ranks = [None] * self.d.world
            torch.distributed.all_gather_object(ranks, rng)
        if self.d.is_main:
            extra = {"scheduler": self.s.scheduler.state_dict(), "rng": ranks[0], "rng_ranks": ranks}
            trainer = {"tokens": tokens, "loss": loss, "data": {"next_step": step, "seed": self.cfg.seed}}
            path = ckpt.save_checkpoint(
                self.run_dir, step, model_state, optim_state, extra, trainer, self.cfg.keep,
                hf_files=ckpt.hf_config_files(self.s.base),
            )  # fmt: skip
        if self.d.world > 1:
            torch.distributed.barrier()
        return path

    def _save_final(self, step: int) -> Path:
        self._check_finite(step)
        final = self.run_dir / state.FINAL
        model_state, _ = (
            ddp.full_state(self.s.base, self.s.optimizer, True) if self.cfg.fsdp else (None, None)
        )
        if self.d.is_main:
            with atomic_dir(final) as tmp, quiet_hf_progress():
                if self.cfg.fsdp and torch.distributed.is_initialized():
                    self.s.base.save_pretrained(tmp, state_dict=model_state)
                else:
                    self.s.base.save_pretrained(tmp)
                self.s.tokenizer.save_pretrained(tmp)
                # The run's own tokenizer.json (lmlab's or a Hugging Face model's), byte for byte.
                shutil.copyfile(self.run_dir / "tokenizer.json", tmp / "tokenizer.json")
                # The run's settings that --init and evaluate() default to; the HF config.json stays pure.
                state.write_model_settings(tmp, {"seq_len": self.s.seq_len, "objective": self.cfg.objective})
        if self.d.world > 1:
            torch.distributed.barrier()
        return final

    # -- the loop ---------------------------------------------------------------------------------
    def _val_keys(self) -> list:
        return val_keys(self.s.val_sources.n_rows, self.cfg.batch_size, self.cfg.eval_batches,
                        self.d.rank, self.d.world)  # fmt: skip

    def _val_bytes(self) -> int | None:
        """UTF-8 bytes of the text of every rank's validation rows (their corpus tokens, before the
        objective); None without a validation split or when the tokenizer cannot say (logged)."""
        src = self.s.val_sources
        if src is None:
            return None
        n, why = 0, None
        try:
            table = token_byte_lengths(self.s.tokenizer)
            for key in self._val_keys():
                n += sum(bytes_of(src.read(source, row), table) for source, row, _ in key[2].tolist())
        except LmlabError as e:
            why = str(e)
        # Every rank takes part, so the collective lines up even where one rank failed.
        total = torch.tensor([float(n), 1.0 if why else 0.0], dtype=torch.float64, device=self.d.device)
        ddp.all_reduce_sum(total, self.d)
        if why is not None or total[1] > 0:
            self.log(f"lmlab pretrain: no val_bpb for this run: {why or 'a rank could not count its bytes'}")
            return None
        return int(total[0]) or None

    def _evaluate(self) -> tuple[float, float | None] | None:
        """``(val_loss, val_bpb)`` over all ranks' validation rows; None without a validation split."""
        if self.s.val_sources is None:
            return None
        loader = make_loader(self.s.val_dataset, self._val_keys(), 0, pin_memory=False)
        s, n = eval_pass(self.s.eval_head, loader, self.d.device, self.d, self.s.precision)
        bpb = s / self.val_bytes / math.log(2) if self.val_bytes else None
        return s / max(n, 1), bpb

    def run(self) -> PretrainResult:
        cfg, d = self.cfg, self.d
        state.check_out(cfg, self.run_dir)
        self._build()
        self.val_bytes = self._val_bytes()
        # Dropout's generator: seeded by the run's seed and the rank (so ranks draw different masks),
        # then replaced by the checkpoint's own state on a resume.
        a, b = np.random.SeedSequence([cfg.seed, 0x64726F70, d.rank]).generate_state(2, np.uint32)
        torch.manual_seed(int(a) << 32 | int(b))
        start = state.restore(cfg, self.run_dir, self.s, d, self.log)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        state.write_run_files(cfg, self.run_dir, self.s, d)
        if start >= self.s.total:
            self.log(f"lmlab pretrain: {self.run_dir} already reached step {start} of {self.s.total}")
        metrics = Metrics(self.run_dir, start if cfg.resume else None, d.is_main, self.log)
        result = PretrainResult(self.run_dir, None, start, None, precision=self.s.precision)
        try:
            self._loop(start, metrics, result)
        finally:
            metrics.close()
        return result

    def _next_micro(self, batches, stop: _Stop) -> tuple[list[dict[str, torch.Tensor]] | None, int]:
        """The step's micro-batches and the global count of scored tokens; None when the run stops."""
        cfg, d = self.cfg, self.d
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
            agree = torch.tensor([n_local, 1 if stop.signum else 0], dtype=torch.float64, device=d.device)
            ddp.all_reduce_sum(agree, d)
            n_global, stopping = int(agree[0]), bool(agree[1] > 0)
        else:  # no device round trip: a CUDA step then never waits for the host
            n_global, stopping = n_local, stop.signum is not None
        if stopping or micro is None:
            stop.signum = stop.signum or signal.SIGTERM
            return None, 0
        return micro, n_global

    def _log_row(self, p: _Progress, loss_value: float | None, grad_norm, lr: float, bar) -> dict[str, Any]:
        s, d = self.s, self.d
        now = time.perf_counter()
        tps = (p.tokens - p.tok_mark) / max(now - p.t_mark, 1e-9)
        if p.step - p.start > 1 or p.step == s.total:  # the first step pays for start-up
            p.timed_tokens += p.tokens - p.tok_mark
            p.timed_s += now - p.t_mark
        mfu = p.flops * (tps / s.tokens_per_step) / (p.peak * d.world) if p.peak and p.flops else None
        gn = float(grad_norm) if grad_norm is not None else None
        row = dict(step=p.step, loss=loss_value, lr=lr, grad_norm=gn, tokens=p.tokens,
                   tokens_per_s=round(tps, 1), mfu=round(mfu, 4) if mfu else None,
                   elapsed_s=round(now - p.t_begin, 3))  # fmt: skip
        if bar is not None:
            post = {"loss": f"{loss_value:.4f}", "tok/s": f"{tps:,.0f}"}
            if mfu is not None:
                post["mfu"] = f"{100 * mfu:.1f}%"
            bar.set_postfix(post, refresh=False)
        return row

    def _after_step(self, p: _Progress, step_loss: torch.Tensor, count: int, grad_norm, lr: float,
                    metrics: Metrics, result: PretrainResult, bar) -> None:  # fmt: skip
        """Log, validate and save as the step's number asks; then the caller's ``on_step``."""
        cfg, s, step = self.cfg, self.s, p.step
        is_log = step % cfg.log_every == 0 or step == s.total
        is_eval = step % cfg.eval_every == 0 or step == s.total
        is_save = step % cfg.save_every == 0
        loss_value = None
        if is_log or is_save or is_eval:
            ddp.all_reduce_sum(step_loss, self.d)
            loss_value = float(step_loss) / count
            if not math.isfinite(loss_value):
                raise self._diverged(step, f"the training loss became {loss_value}")
            p.last_loss = loss_value
            result.losses.append((step, loss_value))
        row = self._log_row(p, loss_value, grad_norm, lr, bar) if is_log else None
        if is_eval and s.val_sources is not None:
            val, bpb = self._evaluate()
            result.evals.append((step, val))
            row = row or dict(step=step, loss=loss_value, lr=lr, tokens=p.tokens)
            row["val_loss"], row["val_bpb"] = val, bpb
            if bpb is not None:
                result.val_bpb.append((step, bpb))
            self.log(f"lmlab pretrain: step {step}: val loss {val:.4f}"
                     + (f", {bpb:.4f} bits per byte" if bpb is not None else ""))  # fmt: skip
        if row is not None:
            metrics.write(row)
        if is_save and step < s.total:
            self._save(step, p.tokens, loss_value)
            p.saved_step = step
        if bar is not None:
            bar.update(1)
        if is_log or is_eval or is_save:
            p.t_mark, p.tok_mark = time.perf_counter(), p.tokens
        if self.on_step is not None:
            self.on_step(step, loss_value)

    def _progress_bar(self, start: int):
        if not (self.d.is_main and self.cfg.progress):
            return None
        from lmlab.progress import progress_bar

        # tqdm's bar on a terminal; a plain line every 30 s in a log file, CI or under nohup.
        bar = progress_bar(
            total=self.s.total, initial=start, desc="pretrain", unit="step", dynamic_ncols=True
        )
        self.log = lambda msg: bar.write(msg, file=sys.stderr)  # lines above the bar, not through it
        return bar

    def _summarise(self, p: _Progress, result: PretrainResult) -> None:
        result.step = p.step
        result.train_loss = p.last_loss
        result.tokens_per_s = p.timed_tokens / p.timed_s if p.timed_s > 0 else None
        if result.tokens_per_s and p.peak and p.flops:
            result.mfu = p.flops * (result.tokens_per_s / self.s.tokens_per_step) / (p.peak * self.d.world)

    def _loop(self, start: int, metrics: Metrics, result: PretrainResult) -> None:
        cfg, d, s, dev = self.cfg, self.d, self.s, self.d.device
        sampler = StepSampler(s.plan, start, s.total, d.rank, d.world, cfg.grad_accum)
        # On CPU a worker process would take cycles from the model's threads (measured slower on 2 cores).
        workers = cfg.workers if cfg.workers is not None else (0 if dev.type == "cpu" else 1)
        loader = make_loader(s.dataset, sampler, workers, pin_memory=dev.type == "cuda")
        batches = iter(loader)
        p = _Progress(
            start,
            start,
            start * s.tokens_per_step,
            start if cfg.resume else -1,
            peak_flops(dev, self.peak_tflops),
        )
        bar = self._progress_bar(start)
        p.t_mark, p.tok_mark = time.perf_counter(), p.tokens
        p.t_begin = time.perf_counter()
        # Every step's loss is added here until a save checks it (_check_finite): a checkpoint is
        # never written from a diverged state, even when the steps before it were not logged.
        self.unchecked_loss = torch.zeros((), dtype=torch.float32, device=dev)
        s.train_head.train()
        with _Stop() as stop:
            while p.step < s.total:
                micro, n_global = self._next_micro(batches, stop)
                if micro is None:
                    break
                if p.flops is None:
                    b = micro[0]
                    tgt = b["labels"].shape[1] if s.family == ENCODER_DECODER else None
                    p.flops = flops_per_step(s.base, cfg.batch_size, b["input_ids"].shape[1], tgt)
                count = max(n_global, 1)
                step_loss, grad_norm, lr = train_step(s, micro, count, d, cfg.fsdp, cfg.clip)
                self.unchecked_loss += step_loss
                p.step += 1
                p.tokens += s.tokens_per_step
                self._after_step(p, step_loss, count, grad_norm, lr, metrics, result, bar)
            del batches
            if bar is not None:
                bar.close()
            self._summarise(p, result)
            if stop.signum is not None:
                name = signal.Signals(stop.signum).name
                if p.saved_step != p.step:
                    self._save(p.step, p.tokens, p.last_loss)
                result.stopped_by = name
                self.log(
                    f"lmlab pretrain: stopped by {name} after step {p.step}; checkpoint written. "
                    f"Continue with: lmlab pretrain --resume {self.run_dir}"
                )
                return
        if p.saved_step != p.step:
            self._save(p.step, p.tokens, p.last_loss)
        result.final_dir = self._save_final(p.step)
        self.log(f"lmlab pretrain: done, {p.step} steps; model in {result.final_dir}")
