"""Throughput of lmlab's objectives beside a per-example reference and Hugging Face's collator.

T5 span corruption, 128 × 568 raw tokens → 512 inputs / 114 targets, and BERT masked LM,
128 × 512, on one CPU thread (torch.set_num_threads(1)), in millions of raw tokens per second.
The per-example reference is lmlab.objectives.reference (Python lists, one row at a time: the
tests' oracle); the peer is transformers.DataCollatorForLanguageModeling fed the usual list of
examples.  Peer figures measured earlier on this kind of machine (FACTS.md): T5's TF
preprocessing 0.90 M tok/s, the HF numpy port 1.44 M, DataCollatorForLanguageModeling 0.51 M.

    .venv/bin/python bench/objectives.py [--repeats 30] [--device cuda]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from lmlab.data.tokenizer import special_ids, train_tokenizer
from lmlab.objectives import BertMLM, SpanCorruption, span_corruption_lengths
from lmlab.objectives import reference as ref

CORPORA = Path(__file__).resolve().parents[2] / "shared" / "corpora"  # ../shared beside the checkout
B = 128


def timed(fn, repeats: int, sync=lambda: None) -> float:
    """Median seconds per call after two warm-up calls."""
    fn()
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def corpus_tokens(n_rows: int, length: int):
    """Real English ids (Moby Dick through a tokenizer trained on it), or random ids without the corpora."""
    path = CORPORA / "moby_dick.txt"
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        tok = train_tokenizer(text.split("\n\n")[:3000], vocab_size=8192)
        ids = tok.encode(text[:2_000_000]).ids
        source = "moby_dick.txt"
    else:
        tok = train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 200, vocab_size=300)
        ids = torch.randint(4, tok.get_vocab_size() - 100, (n_rows * length,)).tolist()
        source = "random ids (no corpora)"
    need = n_rows * length
    ids = (ids * (need // len(ids) + 1))[:need]
    return tok, torch.tensor(ids, dtype=torch.long).view(n_rows, length), source


def line(name: str, seconds: float, ntok: int, base: float | None = None) -> str:
    rate = ntok / seconds / 1e6
    ratio = f"{base / seconds:7.1f}x the reference" if base else ""
    return f"  {name:<52} {seconds * 1e3:8.2f} ms {rate:8.2f} M tok/s  {ratio}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    raw, tlen = span_corruption_lengths(512)
    tok, tokens, source = corpus_tokens(B, raw)
    sp = special_ids(tok)
    V = tok.get_vocab_size(with_added_tokens=True)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device {device}, tokens: {source}"
    )

    # --- span corruption ----------------------------------------------------------------------
    ntok = tokens.numel()
    x = tokens.to(device)
    span = SpanCorruption(sentinel_id=sp["sentinel_0"], eos_id=sp["eos"], pad_id=sp["pad"], impl="fast")
    gen = torch.Generator(device=device).manual_seed(0)
    out = span(x, generator=gen)
    assert out["input_ids"].shape == (B, 512) and out["labels"].shape == (B, tlen)
    print(f"\nT5 span corruption, {B} x {raw} raw tokens -> {B} x 512 inputs / {B} x {tlen} targets")
    t_ref = timed(
        lambda: ref.span_corruption_batch(tokens, random.Random(0), sentinel_id=sp["sentinel_0"]),
        max(3, args.repeats // 10),
    )
    t_fast = timed(lambda: span(x, generator=gen), args.repeats, sync)
    slow = SpanCorruption(sentinel_id=sp["sentinel_0"], impl="reference")
    t_mask = timed(lambda: slow(x, generator=gen), args.repeats, sync)
    print(line("per-example reference (lmlab.objectives.reference)", t_ref, ntok))
    print(line("lmlab SpanCorruption, via the (B, L) noise mask", t_mask, ntok, t_ref))
    print(line("lmlab SpanCorruption (fast path)", t_fast, ntok, t_ref))
    print(
        f"  vs T5 TF 0.90 M tok/s: {ntok / t_fast / 0.90e6:.0f}x; vs HF numpy port 1.44 M: {ntok / t_fast / 1.44e6:.0f}x"
    )

    # --- BERT masked LM -----------------------------------------------------------------------
    mlm_tokens = tokens[:, :512].contiguous()
    ntok = mlm_tokens.numel()
    y = mlm_tokens.to(device)
    mlm = BertMLM(
        vocab_size=V, mask_id=sp["mask"], pad_id=sp["pad"], special_ids=(0, 1, 2, 3, *range(V - 100, V))
    )
    print(f"\nBERT masked LM (15%, 80/10/10), {B} x 512 tokens")
    specials = {0, 1, 2, 3, *range(V - 100, V)}
    t_ref = timed(
        lambda: ref.bert_mlm_batch(
            mlm_tokens, random.Random(0), special_ids=specials, vocab_size=V, mask_id=3
        ),
        max(3, args.repeats // 10),
    )
    print(line("per-example reference (lmlab.objectives.reference)", t_ref, ntok))
    try:
        from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast

        from lmlab.data import load_tokenizer  # noqa: F401 - the same special-token setup

        hf_tok = PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", mask_token="<mask>"
        )
        collator = DataCollatorForLanguageModeling(hf_tok, mlm_probability=0.15, return_tensors="pt")
        examples = [{"input_ids": row} for row in mlm_tokens.tolist()]
        t_hf = timed(lambda: collator(examples), max(3, args.repeats // 3))
        print(line("HF DataCollatorForLanguageModeling", t_hf, ntok, t_ref))
    except ImportError:
        t_hf = None
        print("  HF DataCollatorForLanguageModeling: transformers not installed")
    t_mlm = timed(lambda: mlm(y, generator=gen), args.repeats, sync)
    print(line("lmlab BertMLM", t_mlm, ntok, t_ref))
    if t_hf:
        print(f"  lmlab BertMLM vs HF collator: {t_hf / t_mlm:.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
