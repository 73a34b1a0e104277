"""``lmlab eval MODEL``: how good is this model, and what did quantization cost?

    lmlab eval runs/gpt/final --data data/mine                       # val split of a prepared dir
    lmlab eval runs/gpt/final --corpus notes/ more.jsonl.gz          # raw text, tokenized on the fly
    lmlab eval runs/gpt-nf4 --compare runs/gpt/final --data data/mine   # quantization damage (KL, top-1)
    lmlab eval runs/gpt/final --data data/mine --memorization         # Carlini et al. / Pythia
    lmlab eval runs/t5/final --data data/mine --json                  # one JSON object

MODEL is a run's ``final/`` or ``checkpoints/step-N/``, an ``lmlab quantize`` output, a
transformers + bitsandbytes directory, or any Hugging Face model directory (:func:`lmlab.eval.load.load_for_eval`).
What is measured follows the model's kind (its family, :func:`lmlab.models.families.scoring_family`):

* causal LMs: sliding-window perplexity, bits per byte, word perplexity (:mod:`lmlab.eval.causal`);
* T5 (and any encoder–decoder): the NLL of the denoising objective's targets on corruptions fixed by
  ``--seed``, per target token and per byte (:mod:`lmlab.eval.denoising`);
* BERT / MLMs: the MLM loss at the training corruption, and with ``--pll`` the pseudo-log-likelihood;

beside the floor every model must beat: gzip, bz2 and xz bits per byte of the same text
(:func:`lmlab.eval.bytes.compression_bits_per_byte`).  ``--compare BASE`` adds llama.cpp's
quantization-damage figures (:mod:`lmlab.eval.damage`); ``--memorization`` the extractable rate on
the training split beside the validation split (:mod:`lmlab.eval.extraction`).

Without ``--data`` / ``--corpus``, a model inside a run directory is measured on the run's own
prepared data (its ``config.json`` names it).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError

DTYPES = ("float32", "bfloat16", "float16")


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a saved, quantized or Hugging Face model directory")
    src = p.add_argument_group("text to measure on (one of)")
    src.add_argument("--data", metavar="DIR", help="a prepared directory (lmlab prepare)")
    src.add_argument("--split", choices=("val", "train"), default=None, help="its split (val)")
    src.add_argument("--corpus", nargs="+", metavar="PATH", help="raw text: files, directories, .jsonl, .gz")
    src.add_argument(
        "--doc-sep",
        choices=("blank", "line"),
        default="blank",
        help="--corpus documents: blank lines or lines",
    )
    p.add_argument("--tokenizer", metavar="DIR", help="the tokenizer, when MODEL's directory has none")
    w = p.add_argument_group("scoring")
    w.add_argument("--max-length", type=int, metavar="L", help="window / row length in tokens (as trained)")
    w.add_argument("--stride", type=int, metavar="S", help="causal: tokens a window moves by (L/2)")
    w.add_argument("--batch-size", type=int, default=8, metavar="B", help="windows or rows per forward (8)")
    w.add_argument("--objective", metavar="NAME", help="T5/BERT: the denoising objective (as trained)")
    w.add_argument(
        "--seed", type=int, default=0, help="T5/BERT: the corruption's seed; memorization's draw (0)"
    )
    w.add_argument("--max-rows", type=int, metavar="N", help="T5/BERT/--pll: score at most N rows")
    w.add_argument(
        "--pll", action="store_true", help="MLMs: pseudo-log-likelihood (exact, one forward per token)"
    )
    c = p.add_argument_group("quantization damage")
    c.add_argument(
        "--compare", metavar="BASE_MODEL", help="KL, top-1 agreement and deltas against this model"
    )
    m = p.add_argument_group("memorization")
    m.add_argument("--memorization", action="store_true", help="extractable memorization, train vs val split")
    m.add_argument("--prefix", type=int, default=None, metavar="K", help="prefix tokens (32)")
    m.add_argument("--suffix", type=int, default=None, metavar="M", help="continuation tokens (32)")
    m.add_argument("--samples", type=int, default=None, metavar="N", help="sequences per split (256)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--dtype", choices=DTYPES, help="the model's float dtype (as saved; float32 on CPU)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


# ---------------------------------------------------------------------------------------------- checks


def _positive(name: str, value: int | None) -> None:
    if value is not None and value <= 0:
        raise LmlabError(f"{name} must be a positive number, got {value}")


def check_args(args: argparse.Namespace) -> None:
    """Everything about the flags that can be refused before a model is loaded."""
    for name in ("max_length", "stride", "batch_size", "max_rows", "prefix", "suffix", "samples"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    if args.stride is not None and args.max_length is not None and args.stride > args.max_length:
        raise LmlabError(
            f"--stride {args.stride} is longer than --max-length {args.max_length}: windows would skip tokens"
        )
    if args.data and args.corpus:
        raise LmlabError("give --data or --corpus, not both")
    if args.split and not args.data:
        raise LmlabError("--split applies to --data")
    if not args.memorization and any(getattr(args, k) is not None for k in ("prefix", "suffix", "samples")):
        raise LmlabError("--prefix, --suffix and --samples apply to --memorization")
    if args.memorization and args.corpus:
        raise LmlabError(
            "--memorization needs a prepared --data directory (its train split is what was seen)"
        )


def run_dir_of(model: Path) -> Path | None:
    """The run directory a model sits in (``RUN/final``, ``RUN/checkpoints/step-N``), else None."""
    from lmlab.io import output_kind

    for cand in (model.parent, model.parent.parent):
        if output_kind(cand) == "run":
            return cand
    return None


def default_data(model: Path, base: Path | None = None) -> str:
    """The first prepared directory of the run MODEL (else the ``--compare`` BASE) belongs to; a
    one-line error when there is none."""
    from lmlab.train.config import read_run_config

    for m in (model, base):
        run = run_dir_of(m.resolve()) if m is not None and m.exists() else None
        data = read_run_config(run).get("data") if run is not None else None
        if isinstance(data, str):
            data = [data]
        if data and Path(data[0]).is_dir():
            return str(data[0])
    raise LmlabError(f"give --data DIR or --corpus PATH: the text to measure {model} on")


# ---------------------------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> int:
    from lmlab import runtime
    from lmlab.cli import env_onednn_policy

    check_args(args)
    with runtime.onednn_policy(env_onednn_policy()):
        report = evaluate_command(args)
    if args.json:
        print(json.dumps(report, indent=2, allow_nan=True))
    else:
        print(format_report(report))
    return 0


def evaluate_command(args: argparse.Namespace) -> dict[str, Any]:
    """What ``lmlab eval`` measures, as the JSON object it prints."""
    from lmlab import __version__
    from lmlab.eval.bytes import compression_bits_per_byte
    from lmlab.eval.load import load_for_eval
    from lmlab.eval.text import load_eval_text
    from lmlab.models.families import DECODER, ENCODER

    model_path = Path(args.model)
    data = args.data
    if not data and not args.corpus:
        load_path_check(model_path)
        data = default_data(model_path, Path(args.compare) if args.compare else None)
    split = args.split or "val"
    from lmlab.eval.load import resolve_device, resolve_dtype

    resolve_dtype(args.dtype, resolve_device(args.device))  # a bad --device / --dtype before any load
    loaded = load_for_eval(model_path, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype)
    tok, model, kind = loaded.tokenizer, loaded.model, loaded.kind
    if args.pll and kind != ENCODER:
        raise LmlabError(f"--pll scores masked LMs; {model_path} is a {kind} model")
    if args.corpus:
        text = load_eval_text(tok, paths=args.corpus, doc_sep=args.doc_sep)
    else:
        text = load_eval_text(tok, data_dir=data, split=split)
    progress = not args.no_progress
    report: dict[str, Any] = {
        "lmlab_version": __version__,
        "model": _model_entry(loaded),
        "data": _data_entry(args, data, split, text),
        "settings": {
            "batch_size": args.batch_size,
            "seed": args.seed,
            "device": str(loaded.device),
            "dtype": str(loaded.dtype).removeprefix("torch."),
        },
    }
    if kind == DECODER:
        from lmlab.eval.causal import perplexity

        res = perplexity(
            model, tok, text, max_length=args.max_length, stride=args.stride, batch_size=args.batch_size,
            progress=progress,
        )  # fmt: skip
        report["perplexity"] = res.to_dict()
    else:
        from lmlab.eval.denoising import denoising_loss

        res = denoising_loss(
            model, tok, text, objective=args.objective, seq_len=args.max_length, batch_size=args.batch_size,
            seed=args.seed, max_rows=args.max_rows, progress=progress,
        )  # fmt: skip
        report["denoising"] = res.to_dict()
        if args.pll:
            from lmlab.eval.denoising import pseudo_log_likelihood

            pll = pseudo_log_likelihood(
                model, tok, text, max_length=args.max_length, max_rows=args.max_rows, progress=progress
            )
            report["pll"] = pll.to_dict()
    report["compression"] = compression_bits_per_byte(_scored_text(text))
    if args.compare:
        report["compare"] = _compare(args, loaded, text, res, progress)
    if args.memorization:
        report["memorization"] = _memorization(args, loaded, data, progress)
    return report


def load_path_check(model: Path) -> None:
    if not model.exists():
        raise LmlabError(f"{model} does not exist")


def _scored_text(text: Any) -> bytes:
    return "\n\n".join(text.docs).encode("utf-8")


def _model_entry(loaded: Any) -> dict[str, Any]:
    return {
        "path": str(loaded.path),
        "description": loaded.description,
        "kind": loaded.kind,
        "family": loaded.family.name,
        "quantized": loaded.quantized,
    }


def _data_entry(args: argparse.Namespace, data: str | None, split: str, text: Any) -> dict[str, Any]:
    entry: dict[str, Any] = (
        {"corpus": list(args.corpus)} if args.corpus else {"data": str(data), "split": split}
    )
    entry.update(
        documents=text.stats.documents,
        bytes=text.stats.bytes,
        words=text.stats.words,
        tokens=int(len(text.ids)),
    )
    return entry


def _compare(args: argparse.Namespace, loaded: Any, text: Any, res: Any, progress: bool) -> dict[str, Any]:
    from lmlab.eval.damage import check_same_tokenizer, compare
    from lmlab.eval.load import load_for_eval
    from lmlab.models.families import DECODER

    base = load_for_eval(Path(args.compare), tokenizer=args.tokenizer, device=args.device, dtype=args.dtype)
    check_same_tokenizer(
        loaded.tokenizer, base.tokenizer, names=(str(args.model), f"--compare {args.compare}")
    )
    if base.kind != loaded.kind:
        raise LmlabError(
            f"--compare {args.compare} is a {base.kind} model; {args.model} is a {loaded.kind} one"
        )
    if loaded.kind == DECODER:
        out = compare(
            base.model, loaded.model, loaded.tokenizer, text, max_length=res.max_length, stride=res.stride,
            batch_size=args.batch_size, progress=progress,
        )  # fmt: skip
    else:
        from lmlab.eval.denoising import objective_batches

        batches = (
            b
            for b, _raw in objective_batches(
                loaded.tokenizer, text.ids, res.objective, loaded.kind, seq_len=res.seq_len,
                batch_size=args.batch_size, seed=args.seed, max_rows=args.max_rows,
            )
        )  # fmt: skip
        out = compare(
            base.model, loaded.model, loaded.tokenizer, batches=batches, n_bytes=res.bytes, progress=progress
        )
    d = out.to_dict()
    d["base"] = {**d.get("base", {}), "path": str(base.path), "description": base.description}
    return d


def _memorization(args: argparse.Namespace, loaded: Any, data: str | None, progress: bool) -> dict[str, Any]:
    from lmlab.data import load_tokens
    from lmlab.eval.extraction import memorization

    if data is None:
        raise LmlabError(
            "--memorization needs a prepared --data directory (its train split is what was seen)"
        )
    kw = {k: getattr(args, k) for k in ("prefix", "suffix", "samples") if getattr(args, k) is not None}
    res = memorization(
        loaded.model, loaded.tokenizer, load_tokens(data, "train"), load_tokens(data, "val"),
        batch_size=max(args.batch_size, 32), seed=args.seed, progress=progress, **kw,
    )  # fmt: skip
    return res.to_dict()


# ---------------------------------------------------------------------------------------------- the table


def _num(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if math.isnan(x) or math.isinf(x):
            return str(x)
        if abs(x) >= 1e5:
            return f"{x:,.0f}"
        if 0 < abs(x) < 0.01:
            return f"{x:.3e}"  # KL divergences, small deltas
        return f"{x:.{digits}f}" if abs(x) < 1000 else f"{x:,.2f}"
    return str(x)


def _rows(rows: list[tuple[str, Any, Any]]) -> list[str]:
    out = []
    for name, value, err in rows:
        if value is None:
            continue
        e = f"  ± {_num(err)}" if err is not None else ""
        out.append(f"  {name:<28} {_num(value):>14}{e}")
    return out


def format_report(r: dict[str, Any]) -> str:
    """The readable table of :func:`evaluate_command`'s report."""
    m, d = r["model"], r["data"]
    lines = [f"lmlab eval {m['path']}: {m['description']}"]
    where = ", ".join(d["corpus"]) if "corpus" in d else f"{d['data']} ({d['split']} split)"
    lines.append(
        f"text: {where}: {d['documents']:,} documents, {d['tokens']:,} tokens, {d['bytes']:,} bytes, {d['words']:,} words"
    )
    bpb = None
    if "perplexity" in r:
        p = r["perplexity"]
        lines.append(
            f"causal LM, windows of {p['max_length']} tokens moving by {p['stride']} ({p['windows']:,} windows)"
        )
        lines += _rows(
            [
                ("tokens scored", p["tokens"], None),
                ("NLL per token (nats)", p["mean_nll"], p.get("nll_stderr")),
                ("perplexity", p["perplexity"], p.get("perplexity_stderr")),
                ("bits per byte", p["bits_per_byte"], p.get("bits_per_byte_stderr")),
                ("byte perplexity", p.get("byte_perplexity"), None),
                ("word perplexity", p.get("word_perplexity"), None),
            ]
        )
        bpb = p["bits_per_byte"]
    if "denoising" in r:
        q = r["denoising"]
        lines.append(
            f"{q['objective']} objective on {q['rows']:,} rows of {q['seq_len']} tokens (seed {q['seed']}): "
            "NLL of its targets"
        )
        lines += _rows(
            [
                ("targets scored", q["target_tokens"], None),
                ("NLL per target token (nats)", q["loss"], q.get("loss_stderr")),
                ("target perplexity", q["perplexity"], None),
                ("targets' NLL per byte (bits)", q["bits_per_byte"], None),
            ]
        )
    if "pll" in r:
        q = r["pll"]
        lines.append("pseudo-log-likelihood (Salazar et al. 2020)")
        lines += _rows(
            [
                ("tokens scored", q["tokens"], None),
                ("PLL (nats)", q["pll"], None),
                ("pseudo-perplexity", q["pseudo_perplexity"], None),
                ("bits per byte", q["bits_per_byte"], None),
            ]
        )
        bpb = q["bits_per_byte"]
    c = r["compression"]
    floor = "  ".join(f"{k} {v:.3f}" for k, v in c.items())
    lines.append(f"compression floor, bits per byte of the same text: {floor}")
    if bpb is not None:
        best = min(c.values())
        lines.append(
            f"  the model {'beats' if bpb < best else 'does not beat'} the best ({best:.3f}) by {best - bpb:+.3f}"
        )
    if "compare" in r:
        k = r["compare"]
        lines.append(
            f"against {k['base']['path']}: {k['base']['description']} ({k['positions']:,} positions)"
        )
        lines += _rows(
            [
                ("mean KL(base ‖ model) (nats)", k["kl_mean"], k.get("kl_stderr")),
                ("median KL", k.get("kl_median"), None),
                ("95th percentile KL", k.get("kl_p95"), None),
                ("99th percentile KL", k.get("kl_p99"), None),
                ("max KL", k.get("kl_max"), None),
                ("top-1 agreement", k["top1_agreement"], k.get("top1_agreement_stderr")),
                ("base perplexity", k["base"].get("perplexity"), None),
                ("Δ perplexity", k.get("delta_perplexity"), None),
                ("ln perplexity ratio", k.get("ln_perplexity_ratio"), k.get("ln_perplexity_ratio_stderr")),
                ("Δ bits per byte", k.get("delta_bits_per_byte"), None),
                ("mean Δp of the correct token", k.get("mean_delta_p"), None),
                ("RMS Δp of the correct token", k.get("rms_delta_p"), None),
            ]
        )
    if "memorization" in r:
        k = r["memorization"]
        lines.append(
            f"memorization: greedy {k['suffix']} tokens from {k['prefix']}-token prefixes "
            "(Carlini et al. 2023; Pythia's partial score)"
        )
        for split in ("train", "val"):
            s = k[split]
            lines += _rows(
                [
                    (f"{split}: exact ({s['n']:,} sequences)", s["exact_rate"], s.get("exact_stderr")),
                    (f"{split}: partial", s["partial_mean"], s.get("partial_stderr")),
                ]
            )
    return "\n".join(lines)
