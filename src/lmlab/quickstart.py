"""``lmlab quickstart``: the README's main job, end to end, on the embedded default corpus.

    lmlab quickstart [--out runs/quickstart] [--steps 800]

1. prepare   the default corpus (pydoc topics + stdlib docstrings) → tokenizer + token shards
2. pretrain  ``t5-tiny`` with T5's span corruption (Raffel et al. 2020 §3.1.4), evaluating the
             same validation batches before and after
3. quantize  the trained model to NF4 (QLoRA §3) and LLM.int8() (Dettmers et al. 2022 §3) and
             evaluate each on the same batches
4. summary   one table: validation loss, perplexity of the span targets, bits per byte of the text,
             KL divergence and top-1 agreement of each quantized model against the float one
             (llama.cpp's protocol), weight memory; and the gzip / bz2 / xz floor of the same text

Every stage is a library call that a user can make on their own (``lmlab.data.prepare``,
``lmlab.train.pretrain``, ``lmlab.eval.denoising_loss``, ``lmlab.eval.compare``,
``lmlab.quant.quantize_``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

DEFAULTS = dict(model="t5-tiny", objective="span", steps=800, batch_size=32, seq_len=128)


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/quickstart", metavar="DIR", help="run directory (runs/quickstart)")
    p.add_argument("--data", metavar="DIR", help="a prepared directory instead of the default corpus")
    p.add_argument(
        "--steps", type=int, default=DEFAULTS["steps"], help=f"training steps ({DEFAULTS['steps']})"
    )
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="rows per step (32)")
    p.add_argument("--seq-len", type=int, default=DEFAULTS["seq_len"], help="encoder input length (128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--fresh", action="store_true", help="delete --out first if it holds an earlier quickstart"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _say(msg: str) -> None:
    print(msg, flush=True)


def _remove_earlier_quickstart(out: Path) -> None:
    """``--fresh``: delete ``out`` only if it is an earlier quickstart's run that nothing is writing."""
    import shutil

    from lmlab.errors import LmlabError
    from lmlab.io import DirLock, output_kind
    from lmlab.train.config import read_run_config

    saved = read_run_config(out) if output_kind(out) == "run" else {}
    if {k: saved.get(k) for k in ("objective", "model")} != {k: DEFAULTS[k] for k in ("objective", "model")}:
        raise LmlabError(
            f"{out} holds something other than an earlier quickstart run; --fresh deletes only those "
            "(choose another --out)"
        )
    with DirLock(out):  # refuses while a run is writing there
        shutil.rmtree(out)


def run(args: argparse.Namespace) -> int:
    from lmlab import runtime
    from lmlab.cli import env_onednn_policy

    # fp32 CPU products by $LMLAB_ONEDNN for every stage (evaluations included), as for lmlab pretrain.
    with runtime.onednn_policy(env_onednn_policy()):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    import torch
    from transformers.utils import logging as hf_logging

    from lmlab import runtime
    from lmlab.cli import env_cache_dir
    from lmlab.data import ensure_default_data, load_meta, load_tokenizer
    from lmlab.errors import LmlabError
    from lmlab.eval import compare, compression_bits_per_byte, denoising_loss, load_eval_text
    from lmlab.eval.denoising import objective_batches
    from lmlab.models import ENCODER_DECODER
    from lmlab.models.presets import build_model, load_model
    from lmlab.quant import Int8Config, NF4Config, quantize_
    from lmlab.quant.api import model_nbytes
    from lmlab.train import PretrainConfig, pretrain
    from lmlab.train.config import RUN_CONFIG

    hf_logging.disable_progress_bar()  # lmlab's own bars say enough; HF's per-load bars are noise here
    t0 = time.perf_counter()
    progress = False if args.no_progress else None  # None: bars on a terminal only
    out = Path(args.out)
    if (out / RUN_CONFIG).exists():
        if not args.fresh:
            raise LmlabError(
                f"{out} already holds a run; pass --fresh to replace it, or choose another --out"
            )
        _remove_earlier_quickstart(out)
    # Refused before any work (pretrain would refuse it too, but only after prepare and an evaluation).
    from lmlab.io import check_output_dir

    check_output_dir(out, "run", inputs=[args.data] if args.data else [])

    # Every number is checked (PretrainConfig validates on construction) before prepare runs.
    cfg = PretrainConfig(
        data=[args.data or "default corpus"],  # the prepared directory is filled in below
        out=str(out),
        objective=DEFAULTS["objective"],
        model=DEFAULTS["model"],
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        eval_every=max(args.steps // 4, 1),
        eval_batches=8,
        save_every=max(args.steps // 2, 1),
        keep=1,
        seed=args.seed,
        progress=not args.no_progress,
        device="cpu" if not torch.cuda.is_available() else None,
        onednn=runtime.current_onednn_policy(),
    )
    _say("[1/4] prepare: corpus -> tokenizer -> token shards")
    if args.data:
        data = Path(args.data)
        meta = load_meta(data)
    else:
        data = ensure_default_data(progress=progress, cache=env_cache_dir())
        meta = load_meta(data)
    _say(
        f"      {data}: {meta['train']['tokens']:,} train / {meta['val']['tokens']:,} val tokens, "
        f"vocabulary {meta['vocab_size']:,} ({meta['tokenizer']['type']})"
    )

    cfg = dataclasses.replace(cfg, data=[str(data)])
    initial = build_model(cfg.model, meta["vocab_size"], meta["special_ids"], seed=cfg.seed)
    n_params = sum(p.numel() for p in initial.parameters())
    # Every model is scored on the same validation rows and the same corruptions (seed 1234).
    tok = load_tokenizer(data)
    val = load_eval_text(tok, data_dir=data, split="val")
    ev = dict(objective=cfg.objective, batch_size=32, seq_len=args.seq_len, max_rows=256, seed=1234)

    def evaluate(model):
        return denoising_loss(model, tok, val, **ev)

    def damage(base, model):
        kw = {k: v for k, v in ev.items() if k != "objective"}
        batches = (b for b, _ in objective_batches(tok, val.ids, cfg.objective, ENCODER_DECODER, **kw))
        return compare(base, model, tok, batches=batches)

    _say(
        f"[2/4] pretrain: {cfg.model} ({n_params / 1e6:.1f} M parameters), span corruption, {args.steps} steps"
    )
    before = evaluate(initial)
    _say(
        f"      before training: validation loss {before.loss:.3f}, target perplexity {before.perplexity:,.1f}"
    )
    del initial
    t_train = time.perf_counter()
    result = pretrain(cfg, tune_process=True)  # the command owns its process (lmlab.runtime)
    t_train = time.perf_counter() - t_train
    if result.final_dir is None:
        raise LmlabError(
            f"training stopped early ({result.stopped_by}); resume with lmlab pretrain --resume {out}"
        )
    trained = load_model(result.final_dir)
    after = evaluate(trained)
    _say(
        f"      after training:  validation loss {after.loss:.3f}, target perplexity {after.perplexity:,.1f}"
    )

    _say("[3/4] quantize: NF4 (block 64, double quant) and LLM.int8() (threshold 6.0)")
    rows = [("float32, untrained", before, None, model_nbytes(trained), None)]
    rows.append(("float32, trained", after, None, model_nbytes(trained), None))
    for name, config in (("NF4 + double quant", NF4Config(double_quant=True)), ("LLM.int8()", Int8Config())):
        model = load_model(result.final_dir)
        report = quantize_(model, config)
        res = evaluate(model)
        kl = damage(trained, model)
        rows.append((name, res, kl, model_nbytes(model), report))
        _say(
            f"      {name}: validation loss {res.loss:.3f}, KL to float {kl.kl_mean:.5f}, "
            f"{report.bits_per_param:.3f} bits per quantized weight"
        )

    _say("[4/4] summary")
    _say(
        f"      {'model':<20} {'val loss':>8} {'target ppl':>10} {'bits/byte':>9} {'KL':>8} {'top-1':>6} "
        f"{'weights':>10} {'bits/param*':>11}"
    )
    for name, res, kl, nbytes, report in rows:
        bits = f"{report.bits_per_param:.3f}" if report is not None else "32"
        kl_s, top1 = (f"{kl.kl_mean:.5f}", f"{kl.top1_agreement:.3f}") if kl is not None else ("", "")
        _say(
            f"      {name:<20} {res.loss:>8.3f} {res.perplexity:>10,.1f} {res.bits_per_byte:>9.3f} {kl_s:>8} "
            f"{top1:>6} {nbytes / 2**20:>7.2f} MB {bits:>11}"
        )
    floor = compression_bits_per_byte("\n\n".join(val.docs).encode("utf-8"))
    _say(
        "      bits/byte: the span targets' NLL per UTF-8 byte of the rows' text (comparable across tokenizers; the "
        "targets are 15% of the text, so it is no compression rate)"
    )
    _say(
        f"      the compressors' bits per byte of the same text, the floor a causal LM must beat (lmlab eval): "
        f"gzip {floor['gzip']:.3f}, bz2 {floor['bz2']:.3f}, xz {floor['xz']:.3f}"
    )
    _say(
        "      KL, top-1: mean KL(float || quantized) of the next-token distributions and the share of positions "
        "whose top token agrees, on the same corruptions"
    )
    _say(
        "      * of the quantized linear layers, code tables included; embeddings and the output head stay in float"
    )
    _say(
        f"      trained {result.step} steps ({'bf16 autocast' if result.precision == 'bf16' else 'fp32'}) at "
        f"{result.tokens_per_s or 0:,.0f} tokens/s in {t_train:.0f} s; "
        f"total {time.perf_counter() - t0:.0f} s"
    )
    _say(f"      run directory: {out} (final model: {result.final_dir}; metrics: {out / 'metrics.csv'})")
    if after.loss >= before.loss:
        print("lmlab quickstart: warning: validation loss did not improve", file=sys.stderr)
        return 1
    return 0
