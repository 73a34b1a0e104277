"""Evaluation speed: lmlab's sliding-window perplexity and greedy continuations beside the plain loops.

    python bench/eval.py                      # CPU, 2 threads: gpt-tiny/gpt-mini/llama-tiny, ~3 min
    python bench/eval.py --threads 1 --tokens 30000
    python bench/eval.py --device cuda        # where a GPU is at hand

Perplexity: :func:`lmlab.eval.causal.perplexity` (windows batched, only the scored positions
projected) against the loop of Hugging Face's guide "Perplexity of fixed-length models": one window
at a time, batch 1, ``model(input_ids, labels=target_ids).loss`` × (valid labels − 1), stride
max_length / 2.  Both read the same token ids (the State of the Union corpus, framed as ``lmlab
prepare`` frames documents, with the default corpus's tokenizer) with the same untrained, seeded model
on the default corpus's vocabulary.  Printed: scored tokens per second of each, the ratio, and both
perplexities.  The guide weights each later window's mean loss by its scored tokens minus one (its
label-shift correction, exact only for the first window), so its figure differs from the exact one in
the last digits; the exact-weighted figure of the guide's own window losses is printed too.

Memorization: :func:`lmlab.eval.extraction.greedy_continuations` (``model.generate``, 32 prefixes a
batch, KV cache) against ``model.generate`` on one sequence at a time; K = M = 32 (Pythia's
protocol, Biderman et al. 2023); the continuations must be identical.  Best of ``--repeats`` runs
after a warm-up.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "sotu.txt"
PERPLEXITY_CASES = (("gpt-tiny", 128), ("gpt-mini", 256), ("llama-tiny", 128))
MEMO_CASES = ("gpt-tiny", "llama-tiny")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_of(fn, repeats: int, device: torch.device):
    """(best seconds, last result) of ``repeats`` timed calls."""
    best, out = math.inf, None
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best, out


@torch.no_grad()
def guide_loop(model, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, float, int]:
    """The HF guide's loop, as written there: (its perplexity, the exact-weighted one, tokens scored)."""
    encodings = ids[None]  # (1, N)
    seq_len = encodings.size(1)
    nll_sum, n_tokens, exact_sum, exact_n = 0.0, 0, 0.0, 0
    prev_end_loc = 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = encodings[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        neg_log_likelihood = model(input_ids, labels=target_ids).loss
        num_valid_tokens = (target_ids != -100).sum().item()
        num_loss_tokens = num_valid_tokens - target_ids.size(0)
        nll_sum += neg_log_likelihood.item() * num_loss_tokens
        n_tokens += num_loss_tokens
        # What the loss really averaged: the valid labels after the shift drops position 0.
        really = int((target_ids[:, 1:] != -100).sum())
        exact_sum += neg_log_likelihood.item() * really
        exact_n += really
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return math.exp(nll_sum / n_tokens), math.exp(exact_sum / exact_n), exact_n


def corpus_ids(tok, n_tokens: int) -> np.ndarray:
    """About ``n_tokens`` ids of the State of the Union corpus (the default corpus's val split if absent)."""
    from lmlab.eval.text import causal_stream, encode_documents

    if CORPUS.is_file():
        text = CORPUS.read_text(encoding="utf-8", errors="replace")[: n_tokens * 6]
        docs = [d for d in text.split("\n\n") if d.strip()]
        ids = causal_stream(tok, encode_documents(tok, docs))
    else:
        from lmlab.data import ensure_default_data, load_tokens

        ids = np.asarray(load_tokens(ensure_default_data(progress=False), "val"), dtype=np.int64)
    return np.asarray(ids[:n_tokens], dtype=np.int64)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    p.add_argument("--tokens", type=int, default=12_000, help="tokens of text scored per model")
    p.add_argument("--batch-size", type=int, default=8, help="lmlab's windows per forward pass")
    p.add_argument("--memo-samples", type=int, default=32, help="prefixes continued per model")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--only", choices=("perplexity", "memorization"), default=None)
    args = p.parse_args()

    from lmlab.data import ensure_default_data, load_meta, load_tokenizer
    from lmlab.eval.causal import perplexity
    from lmlab.eval.extraction import greedy_continuations
    from lmlab.models.presets import build_model

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA device")
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{args.threads} threads"
    data = ensure_default_data(progress=False)
    meta, tok = load_meta(data), load_tokenizer(data)
    ids = corpus_ids(tok, args.tokens)
    stream = torch.from_numpy(ids).to(dev)
    src = "sotu.txt" if CORPUS.is_file() else "the default corpus's val split"
    print(f"evaluation speed, {where}; {ids.size:,} tokens of {src}, vocabulary {meta['vocab_size']:,}, fp32")

    models: dict[str, torch.nn.Module] = {}

    def model(name: str) -> torch.nn.Module:
        if name not in models:
            models[name] = build_model(name, meta["vocab_size"], meta["special_ids"], seed=0).to(dev).eval()
        return models[name]

    if args.only in (None, "perplexity"):
        for name, L in PERPLEXITY_CASES:
            m, S = model(name), L // 2
            warm = stream[: 4 * L]
            perplexity(m, tok, warm, max_length=L, stride=S, batch_size=args.batch_size)
            guide_loop(m, warm, L, S)
            t_lm, res = best_of(
                lambda m=m, L=L, S=S: perplexity(
                    m, tok, stream, max_length=L, stride=S, batch_size=args.batch_size
                ),
                args.repeats,
                dev,
            )
            t_hf, (ppl_hf, ppl_exact, n) = best_of(
                lambda m=m, L=L, S=S: guide_loop(m, stream, L, S), args.repeats, dev
            )
            assert n == res.tokens, (n, res.tokens)
            print(
                f"perplexity {name} L={L} S={S} ({where}): lmlab {n / t_lm:,.0f} tok/s, HF guide loop "
                f"{n / t_hf:,.0f} tok/s, {t_hf / t_lm:.1f}x; ppl {res.perplexity:.4f} vs {ppl_hf:.4f} "
                f"(guide's windows exactly weighted {ppl_exact:.4f}; relative {abs(res.perplexity / ppl_exact - 1):.1e})"
            )

    if args.only in (None, "memorization"):
        K = M = 32
        n = args.memo_samples
        starts = np.arange(n) * ((ids.size - K - M) // n)
        prefixes = torch.from_numpy(np.stack([ids[s : s + K] for s in starts])).to(dev)  # (N, K)
        for name in MEMO_CASES:
            m = model(name)
            pad = m.config.pad_token_id if m.config.pad_token_id is not None else 0

            def one_at_a_time(m=m, pad=pad) -> torch.Tensor:
                outs = []
                for row in prefixes:
                    x = row[None]
                    out = m.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                                     max_new_tokens=M, min_new_tokens=M, pad_token_id=pad)  # fmt: skip
                    outs.append(out[:, K:])
                return torch.cat(outs)

            greedy_continuations(m, prefixes[:2], M, batch_size=32)
            one_at_a_time_warm = prefixes[:1]
            m.generate(input_ids=one_at_a_time_warm, do_sample=False, max_new_tokens=2, pad_token_id=pad)
            t_lm, got = best_of(
                lambda m=m: greedy_continuations(m, prefixes, M, batch_size=32), args.repeats, dev
            )
            t_hf, want = best_of(one_at_a_time, args.repeats, dev)
            same = bool(torch.equal(got.cpu(), want.cpu()))
            print(
                f"memorization {name} K={K} M={M} ({where}): lmlab {n / t_lm:,.1f} seq/s, generate one at a time "
                f"{n / t_hf:,.1f} seq/s, {t_hf / t_lm:.1f}x; continuations {'identical' if same else 'DIFFER'}"
            )


if __name__ == "__main__":
    main()
