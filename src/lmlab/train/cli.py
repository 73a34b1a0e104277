"""``lmlab pretrain``: the command-line face of :func:`lmlab.train.pretrain`.

    lmlab pretrain --data data/ --objective span --model t5-tiny --steps 2000 --out runs/t5
    lmlab pretrain --resume runs/t5 [--steps 4000]
    torchrun --nproc_per_node 2 -m lmlab pretrain --data data/ --objective causal --model gpt ...

``LMLAB_ONEDNN`` (auto, 1, 0) chooses the library of fp32 CPU products for the run
(``PretrainConfig.onednn``); the command applies lmlab's process tuning (:mod:`lmlab.runtime`).
Imports nothing heavy until :func:`run`.
"""

from __future__ import annotations

import argparse

from lmlab.errors import LmlabError

# Flags a --resume may give again (they change how long the run goes or how it reports).
_RESUMABLE = ("steps", "tokens", "eval_every", "eval_batches", "save_every", "keep", "log_every", "workers",
              "device", "compile", "progress")  # fmt: skip


def configure(parser: argparse.ArgumentParser) -> None:
    from lmlab.models.presets import PRESETS
    from lmlab.objectives.cli import objective_help
    from lmlab.train.config import OPTIMIZERS, PRECISIONS, SCHEDULES

    S = argparse.SUPPRESS  # unset flags stay absent, so --resume can tell what was given
    p = parser
    p.add_argument(
        "--data", nargs="+", metavar="DIR", default=S, help="prepared director(ies) (`lmlab prepare`)"
    )
    p.add_argument(
        "--mix-alpha",
        type=float,
        default=S,
        metavar="A",
        help="sample source i with probability ∝ n_i^A (mT5: 0.3; 1 = proportional; default 1)",
    )
    p.add_argument(
        "--objective",
        default=S,
        help=objective_help("{names} (default span)"),
    )
    p.add_argument(
        "--model",
        default=S,
        choices=list(PRESETS),
        metavar="PRESET",
        help=f"model preset: {', '.join(PRESETS)} (default t5-tiny)",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, default=S, help="optimizer steps (default 1000)")
    g.add_argument(
        "--tokens", type=int, default=S, help="train on this many corpus tokens instead of --steps"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=S,
        metavar="B",
        help="global batch in rows per optimizer step, over all processes (default 32)",
    )
    p.add_argument(
        "--seq-len", type=int, default=S, metavar="L", help="model input length (default: preset's)"
    )
    p.add_argument("--lr", type=float, default=S, help="peak learning rate (AdamW 1e-3, Adafactor 1e-2)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=S, help="adamw (default) or adafactor (T5's)")
    p.add_argument("--schedule", choices=SCHEDULES, default=S, help="after warmup (default cosine)")
    p.add_argument("--warmup", type=int, default=S, help="linear warmup steps (default 5%% of steps, ≤ 1000)")
    p.add_argument("--weight-decay", type=float, default=S, help="decoupled weight decay (default 0.01)")
    p.add_argument("--grad-accum", type=int, default=S, metavar="N", help="micro-steps per optimizer step")
    p.add_argument("--clip", type=float, default=S, help="gradient-norm clipping (default 1.0; 0 = off)")
    p.add_argument("--eval-every", type=int, default=S, metavar="K", help="validation loss every K steps")
    p.add_argument("--eval-batches", type=int, default=S, metavar="N", help="validation batches (default 20)")
    p.add_argument("--save-every", type=int, default=S, metavar="K", help="checkpoint every K steps (500)")
    p.add_argument("--keep", type=int, default=S, metavar="N", help="checkpoints kept (default 3)")
    p.add_argument("--log-every", type=int, default=S, metavar="K", help="metrics row every K steps (1)")
    p.add_argument("--compile", action="store_true", default=S, help="torch.compile the model")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=S,
        help="bf16 autocast or fp32 (default auto: bf16 on GPUs and on CPUs with native bf16, else fp32)",
    )
    p.add_argument("--fsdp", action="store_true", default=S, help="shard with FSDP2 under torchrun")
    p.add_argument(
        "--init",
        metavar="MODEL_DIR",
        default=S,
        help="continue pre-training a saved model (Gururangan et al. 2020)",
    )
    p.add_argument("--resume", metavar="RUN_DIR", default=None, help="continue a run with its own settings")
    p.add_argument("--seed", type=int, default=S, help="seed of the model, the data order and the noise")
    p.add_argument(
        "--workers", type=int, default=S, help="DataLoader worker processes (default 0 on CPU, 1 on GPUs)"
    )
    p.add_argument("--device", default=S, help="cpu, cuda, cuda:1 … (default: cuda when available)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=S, help="no progress bar")
    p.add_argument("--out", metavar="RUN_DIR", default=S, help="run directory to create")


def _given(args: argparse.Namespace) -> dict:
    skip = {"command", "_module", "resume"}
    out = {k: v for k, v in vars(args).items() if k not in skip}
    if out.get("clip") == 0:
        out["clip"] = None
    return out


def run(args: argparse.Namespace) -> int:
    from lmlab.cli import env_onednn_policy, env_peak_tflops
    from lmlab.train.config import PretrainConfig

    given = _given(args)
    if args.resume:
        if "out" in given and given["out"] != args.resume:
            raise LmlabError("--resume RUN_DIR continues that directory; drop --out")
        fixed = sorted(k for k in given if k not in _RESUMABLE)
        if fixed:
            flags = ", ".join("--" + k.replace("_", "-") for k in fixed)
            raise LmlabError(f"--resume uses the run's own settings; {flags} cannot be given again")
        cfg = PretrainConfig.resume_from(args.resume, **given, onednn=env_onednn_policy())
    else:
        for need in ("data", "out"):
            if need not in given:
                raise LmlabError(f"--{need} is required (or --resume RUN_DIR)")
        if "init" in given and "model" in given:
            raise LmlabError(
                f"--model {given['model']} and --init {given['init']}: the model comes from --init; drop --model"
            )
        cfg = PretrainConfig(**given, onednn=env_onednn_policy())

    from lmlab.train.loop import pretrain

    # The command owns its process: TF32 on CUDA, glibc keeping freed memory on CPU (lmlab.runtime).
    result = pretrain(cfg, tune_process=True, peak_tflops=env_peak_tflops())
    if result.stopped_by:
        return 130 if result.stopped_by == "SIGINT" else 143
    return 0
