"""Training throughput: lmlab's loop beside Hugging Face ``Trainer`` on the same model and batches.

    python bench/pretrain.py                # CPU: t5 and gpt configs, lmlab vs Trainer, ratio
    python bench/pretrain.py --gpu          # GPU: tokens/s and MFU of `gpt` (16×1024) and `t5-base`
                                            # (128×512→114), bf16 autocast + torch.compile

CPU mode.  Each config is trained twice from the same seeded initialisation: once by
``lmlab.train.pretrain`` (its own data pipeline: packed rows, the objective applied to blocks of
rows, in-process on CPU by default) and once by ``transformers.Trainer`` fed the *very batches*
lmlab's pipeline produced for those steps, precomputed, so Trainer pays nothing for data.  Both
use AdamW (β₂ 0.95, weight decay 0.01, torch's fused kernel: Trainer's default
``adamw_torch_fused``), cosine decay after warmup, clipping at 1.0, in fp32 and (where the CPU
has it natively) bf16 autocast.  Every run is a fresh Python process, so each side runs as its
users get it: lmlab's command sets glibc's malloc to keep freed memory
(``lmlab.runtime.keep_freed_memory``, via ``pretrain(..., tune_process=True)``), Trainer leaves the default (``--same-malloc`` gives
Trainer's process lmlab's setting too).  Throughput is raw corpus tokens per second over the
steps after ``--warmup-steps`` (timestamps taken at the end of each step by lmlab's ``on_step``
hook and a ``TrainerCallback``); the first-step losses are printed to show both trained the same
thing.  In fp32 on x86 CPUs lmlab's linear layers and loss take oneDNN's products
(:mod:`lmlab.models.onednn`), Trainer's model MKL's, as each ships; ``LMLAB_ONEDNN=0 python
bench/pretrain.py`` times lmlab on MKL too.

GPU mode.  Synthetic uniform token ids over a GPT-2-sized vocabulary (50304) and T5's (32128),
so the FLOPs match the reference runs; MFU = model FLOPs (:func:`lmlab.models.flops_per_step`)
per second over the device's dense bf16 peak (989 TFLOP/s for H100/H200 SXM).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CPU_CONFIGS = {
    # name: (preset, objective, global batch, seq_len)
    "t5": ("t5-tiny", "span", 32, 128),
    "gpt": ("gpt-tiny", "causal", 16, 256),
}
GPU_CONFIGS = {
    "gpt": ("gpt", "causal", 16, 1024, 50304),
    "t5-base": ("t5-base", "span", 128, 512, 32128),
}


def lmlab_run(
    data: Path, out: Path, preset: str, objective: str, B: int, L: int, steps: int, warm: int, **kw
):
    """tokens/s (median step), the first step's loss (CPU only, else nan), raw tokens per row."""
    from lmlab.cli import env_onednn_policy
    from lmlab.train import PretrainConfig, pretrain

    on_cpu = kw.get("device", "cpu") == "cpu"
    cfg = PretrainConfig(
        data=[str(data)], out=str(out), objective=objective, model=preset, steps=steps, batch_size=B, seq_len=L,
        lr=1e-3, warmup=2, eval_every=10**9, eval_batches=1, save_every=10**9, progress=False, seed=0,
        log_every=1 if on_cpu else 10**9,  # a logged step syncs the GPU; on CPU it costs nothing
        onednn=env_onednn_policy(),
        **kw,
    )  # fmt: skip
    marks: dict[int, float] = {}

    def on_step(step: int, loss) -> None:
        if not on_cpu:
            torch.cuda.synchronize()
        marks[step] = time.perf_counter()

    # As `lmlab pretrain` runs it: the command tunes its process (lmlab.runtime.tune_process).
    r = pretrain(cfg, on_step=on_step, tune_process=True)
    raw = json.loads((out / "config.json").read_text())["resolved"]["raw_len"]
    first = r.losses[0][1] if r.losses and r.losses[0][0] == 1 else float("nan")
    return B * raw / step_time(marks, warm, steps), first, raw


def batch_shapes(data: Path, objective: str, preset: str, L: int) -> tuple[int, int]:
    """(inputs length, labels length) of the objective's rows for this model family."""
    rows = lmlab_batches(data, objective, preset, 1, L, 1)
    return rows[0]["input_ids"].shape[0], rows[0]["labels"].shape[0]


def step_time(marks: dict[int, float], warm: int, steps: int) -> float:
    """Median seconds per step over steps warm+1 … steps (robust to a neighbour's burst of CPU use)."""
    return float(np.median([marks[s] - marks[s - 1] for s in range(warm + 1, steps + 1)]))


def lmlab_batches(data: Path, objective: str, preset: str, B: int, L: int, steps: int):
    """The rows lmlab's pipeline gives steps 0..steps-1 (seed 0, one process)."""
    from lmlab.data import load_tokenizer
    from lmlab.models import get_preset
    from lmlab.objectives import make_objective
    from lmlab.train.data import BatchPlan, ObjectiveBatches, Sources, StepSampler

    family = get_preset(preset).kind
    obj = make_objective(objective, load_tokenizer(data), family)
    src = Sources([str(data)], obj.raw_length(L))
    ds = ObjectiveBatches(src, obj, 0, shift_labels=family == "decoder")
    plan = BatchPlan(src.n_rows, np.array([1.0]), B, 0)
    rows = []
    for key in StepSampler(plan, 0, steps, 0, 1, 1):
        b = ds[key]
        b.pop("n_targets"), b.pop("n_raw")
        for i in range(B):
            rows.append({k: v[i] for k, v in b.items()})
    return rows


def trainer_run(
    data: Path,
    preset: str,
    objective: str,
    B: int,
    L: int,
    steps: int,
    warm: int,
    raw: int,
    compile: bool = False,
    bf16: bool = False,
):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from lmlab.data import load_meta
    from lmlab.models import build_model

    rows = lmlab_batches(data, objective, preset, B, L, steps)
    meta = load_meta(data)
    model = build_model(preset, meta["vocab_size"], meta["special_ids"], seed=0)

    class Rows(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(rows)

    marks: dict[int, float] = {}
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks[state.global_step] = time.perf_counter()

    class FirstLoss(Trainer):
        def compute_loss(self, model, inputs, *a, **kw):
            loss = super().compute_loss(model, inputs, *a, **kw)
            if not losses:
                losses.append(float((loss[0] if isinstance(loss, tuple) else loss).detach()))
            return loss

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=B, learning_rate=1e-3, warmup_steps=2,
            lr_scheduler_type="cosine", weight_decay=0.01, adam_beta2=0.95, max_grad_norm=1.0,
            save_strategy="no", logging_strategy="no", report_to="none", use_cpu=True,
            dataloader_num_workers=0, disable_tqdm=True, seed=0, torch_compile=compile, bf16=bf16,
        )  # fmt: skip
        FirstLoss(model=model, args=args, train_dataset=Rows(), callbacks=[Clock()]).train()
    return B * raw / step_time(marks, warm, steps), losses[0]


def isolated(side: str, **spec) -> dict:
    """One run of ``side`` ("lmlab" or "trainer") in a fresh Python process: its tokens/s and loss."""
    cmd = [sys.executable, __file__, "--one", json.dumps({"side": side, **spec})]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{side} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def one(spec: dict) -> None:
    """The body of :func:`isolated`: run one side, print its result as a JSON line."""
    side = spec.pop("side")
    data = Path(spec.pop("data"))
    args = (data, spec.pop("preset"), spec.pop("objective"), spec.pop("B"), spec.pop("L"), spec.pop("steps"),
            spec.pop("warm"))  # fmt: skip
    if side == "lmlab":
        with tempfile.TemporaryDirectory() as tmp:
            tps, loss, raw = lmlab_run(args[0], Path(tmp) / "run", *args[1:], device="cpu", **spec)
        print(json.dumps({"tps": tps, "loss": loss, "raw": raw}))
    else:
        if spec.pop("same_malloc"):
            from lmlab.runtime import keep_freed_memory

            keep_freed_memory()
        tps, loss = trainer_run(*args, **spec)
        print(json.dumps({"tps": tps, "loss": loss}))


def cpu(args) -> None:
    from lmlab.cli import env_cache_dir, env_onednn_policy
    from lmlab.data import ensure_default_data
    from lmlab.train.precision import resolve_precision

    data = Path(args.data) if args.data else ensure_default_data(progress=False, cache=env_cache_dir())
    native = resolve_precision("auto", torch.device("cpu"))
    precisions = args.precision or (["fp32", "bf16"] if native == "bf16" else ["fp32"])
    print(f"lmlab pretrain vs transformers.Trainer, CPU ({torch.get_num_threads()} threads), data {data}")
    print(f"{args.steps} steps per run, median step time after {args.warmup_steps}, best of {args.repeats} "
          f"alternating runs, each in a fresh process{', both torch.compile' if args.compile else ', eager'}; "
          f"lmlab's default precision on this CPU: {native}; bf16 = autocast on both sides (Trainer bf16=True)"
          f"{'; Trainer with lmlab malloc setting' if args.same_malloc else ''}")  # fmt: skip
    from lmlab.models import onednn

    print(f"fp32 products: lmlab {'oneDNN' if onednn.available(env_onednn_policy()) else 'torch (MKL)'} "
          f"(LMLAB_ONEDNN={os.environ.get('LMLAB_ONEDNN', 'auto')}), Trainer torch (MKL)")  # fmt: skip
    results = []
    for name, (preset, objective, B, L) in CPU_CONFIGS.items():
        if args.only and name not in args.only:
            continue
        for prec in precisions:
            ours, theirs = [], []
            common = dict(data=str(data), preset=preset, objective=objective, B=B, L=L, steps=args.steps,
                          warm=args.warmup_steps, compile=args.compile)  # fmt: skip
            for _ in range(args.repeats):  # alternate, so a noisy neighbour hits both sides alike
                r = isolated("lmlab", **common, workers=args.cpu_workers, precision=prec)
                ours.append(r["tps"])
                loss_ours, raw = r["loss"], r["raw"]
                r = isolated("trainer", **common, raw=raw, bf16=prec == "bf16", same_malloc=args.same_malloc)
                theirs.append(r["tps"])
                loss_theirs = r["loss"]
            label = f"{name} ({preset}, {objective}, {B}x{L})"
            results.append((label, prec, ours, theirs, loss_ours, loss_theirs))
    print(f"{'config':<34} {'precision':>9} {'lmlab tok/s':>12} {'Trainer tok/s':>14} {'ratio':>6}   "
          "runs (lmlab | Trainer), first-step loss lmlab / Trainer")  # fmt: skip
    for label, prec, ours, theirs, lo, lt in results:
        runs = " ".join(f"{x:,.0f}" for x in ours) + " | " + " ".join(f"{x:,.0f}" for x in theirs)
        print(f"{label:<34} {prec:>9} {max(ours):>12,.0f} {max(theirs):>14,.0f} {max(ours) / max(theirs):>5.2f}x   "
              f"{runs}   {lo:.4f} / {lt:.4f}")  # fmt: skip
    # Each side as a user gets it without flags: lmlab's resolved precision, Trainer's fp32.
    best = {(label, prec): (max(ours), max(theirs)) for label, prec, ours, theirs, _, _ in results}
    for label in dict.fromkeys(label for label, *_ in results):
        if (label, native) in best and (label, "fp32") in best:
            ours, theirs = best[(label, native)][0], best[(label, "fp32")][1]
            print(f"{label:<34} defaults: lmlab {native} {ours:,.0f} vs Trainer fp32 {theirs:,.0f} tok/s, "
                  f"{ours / theirs:.2f}x")  # fmt: skip
    print(
        "(GPT's first-step losses differ by the mean's denominator: Trainer divides the summed loss by "
        "every label, 16x256, lmlab by the scored ones, 16x255)"
    )


def synthetic_data(root: Path, vocab: int, tokens: int) -> Path:
    """A prepared directory of uniform random ids over ``vocab`` (throughput only), lmlab's format."""
    from lmlab.cli import env_cache_dir
    from lmlab.data import ensure_default_data, load_meta
    from lmlab.data.shards import token_dtype

    src = ensure_default_data(progress=False, cache=env_cache_dir())
    out = root / f"synthetic-{vocab}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    meta = dict(load_meta(src))
    dtype = token_dtype(vocab)
    rng = np.random.default_rng(0)
    # Ids avoid the specials (0-3) and the tokenizer's sentinels, which the objectives add themselves.
    hi = meta["special_ids"]["sentinel_0"] - meta["special_ids"]["num_sentinels"]
    for split, n in (("train", tokens), ("val", tokens // 50)):
        # Ids stay below the tokenizer's sentinels (the objective takes its sentinel ids from the
        # tokenizer); the model still has the full ``vocab`` rows, which is what the timing needs.
        ids = rng.integers(4, min(vocab, hi + 1), size=n, dtype=np.int64)
        ids.astype(dtype).tofile(out / f"{split}.bin")
        meta[split] = {"tokens": n, "documents": 1}
    meta.update(vocab_size=vocab, dtype=dtype.str)
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def gpu(args) -> None:
    from lmlab.data import load_meta
    from lmlab.models import build_model, flops_per_step, get_preset, peak_flops

    configs = GPU_CONFIGS
    if args.dry_run:  # the same code path on CPU with tiny models, to check the script, not to time
        configs = {"gpt": ("gpt-tiny", "causal", 4, 64, 512), "t5-base": ("t5-tiny", "span", 4, 64, 8192)}
        dev = torch.device("cpu")
    elif not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device")
    else:
        dev = torch.device("cuda")
    from lmlab.cli import env_peak_tflops

    peak = peak_flops(dev, env_peak_tflops())
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (dry run)"
    print(f"lmlab pretrain on {name}, bf16 autocast, fused AdamW; MFU against "
          f"{peak / 1e12 if peak else float('nan'):.0f} TFLOP/s dense bf16")  # fmt: skip
    print(f"{'config':<30} {'compile':>8} {'s/step':>8} {'tokens/s':>12} {'MFU':>7}", flush=True)
    # Run directories in memory where possible: each run ends with a full checkpoint (model + AdamW
    # state, 2.7 GB for t5-base) that is not what is being timed.
    shm = "/dev/shm" if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(dir=shm) as tmp:
        data_for: dict[int, Path] = {}
        for compiled in (True, False) if args.eager_too else (True,):
            for cname, (preset, objective, B, L, vocab) in configs.items():
                if args.only and cname not in args.only:
                    continue
                if vocab not in data_for:
                    data_for[vocab] = synthetic_data(Path(tmp), vocab, tokens=B * 600 * (args.steps + 5))
                data = data_for[vocab]
                accum = 1
                while True:
                    try:
                        tps, _, raw = lmlab_run(
                            data, Path(tmp) / f"{cname}-{compiled}-{accum}", preset, objective, B, L, args.steps,
                            args.warmup_steps, compile=compiled, workers=args.workers, device=dev.type,
                            grad_accum=accum,
                        )  # fmt: skip
                        break
                    except torch.OutOfMemoryError:
                        if accum >= 4:
                            raise
                    # Out of the except block, so the failed run's tensors are released before retrying.
                    gc.collect()
                    torch.cuda.empty_cache()
                    accum *= 2  # the same global batch in smaller micro-batches (an 80 GB card)
                    print(f"{cname}: out of memory; retrying with --grad-accum {accum}", flush=True)
                meta = load_meta(data)
                model = build_model(preset, meta["vocab_size"], meta["special_ids"])
                n_in, n_tgt = batch_shapes(data, objective, preset, L)
                tgt = n_tgt if get_preset(preset).kind == "encoder-decoder" else None
                flops = flops_per_step(model, B, n_in, tgt)
                del model
                mfu = flops * (tps / (B * raw)) / peak if peak else None
                label = f"{cname} ({B}x{L}, {objective}{f', accum {accum}' if accum > 1 else ''})"
                print(f"{label:<30} {str(compiled):>8} {B * raw / tps:>8.3f} {tps:>12,.0f} "
                      f"{100 * mfu if mfu else float('nan'):>6.1f}%", flush=True)  # fmt: skip
                if dev.type == "cuda":
                    torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="GPU mode: gpt and t5-base, bf16 + compile, MFU")
    p.add_argument("--steps", type=int, default=None, help="steps per run (CPU 16, GPU 40)")
    p.add_argument("--warmup-steps", type=int, default=None, help="untimed first steps (CPU 3, GPU 15)")
    p.add_argument("--repeats", type=int, default=2, help="CPU mode: alternating runs of each side")
    p.add_argument("--only", nargs="*", help="config names to run")
    p.add_argument("--data", help="prepared directory for CPU mode (default: the embedded corpus)")
    p.add_argument("--workers", type=int, default=6, help="GPU mode DataLoader workers")
    p.add_argument("--eager-too", action="store_true", help="GPU mode: also time without torch.compile")
    p.add_argument(
        "--compile",
        action="store_true",
        help="CPU mode: torch.compile on both sides (lmlab compiles model+loss, Trainer the model)",
    )
    p.add_argument(
        "--precision",
        nargs="*",
        choices=["fp32", "bf16"],
        help="CPU mode: precisions to compare (default fp32, and bf16 where the CPU has it natively)",
    )
    p.add_argument(
        "--cpu-workers",
        type=int,
        default=None,
        help="CPU mode: lmlab DataLoader workers (default: its own, 0)",
    )
    p.add_argument("--dry-run", action="store_true", help="GPU mode's code path on CPU with tiny models")
    p.add_argument(
        "--same-malloc",
        action="store_true",
        help="CPU mode: give Trainer's process lmlab's malloc setting too (keep freed memory)",
    )
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: one side's run, in its own process
    args = p.parse_args()
    if args.one:
        return one(json.loads(args.one))
    args.steps = args.steps or (40 if args.gpu else 16)
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else (15 if args.gpu else 3)
    gpu(args) if args.gpu or args.dry_run else cpu(args)


if __name__ == "__main__":
    main()
