"""Throughput and peak memory of `lmlab prepare` on real text, beside plain Hugging Face use.

    python bench/prepare.py [--corpus ../shared/corpora/sotu.txt] [--repeat 8]

Each variant runs in its own process so its peak resident memory is its own:
  lmlab prepare (train)   tokenizer training + shards, end to end
  lmlab prepare (reuse)   shards with an existing tokenizer: the streaming tokenization pass
  lmlab prepare (xN)      the same corpus given N times: peak memory must not grow with size
  HF per-document loop    PreTrainedTokenizerFast(doc) one document at a time, the pattern of
                          many prepare scripts, collecting ids in a Python list
  HF batched, in memory   the whole corpus read into memory and tokenized in one batched call
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT.parent / "shared" / "corpora" / "sotu.txt"

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
mode, corpus, out, tok_dir, repeat = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
t0 = time.perf_counter()
if mode.startswith("lmlab"):
    from lmlab.data import prepare
    res = prepare([corpus] * repeat, out, tokenizer=None if mode == "lmlab-train" else tok_dir, progress=False)
    n = res.meta["train"]["tokens"] + res.meta["val"]["tokens"]
else:
    import numpy as np
    from lmlab.data import load_tokenizer
    from lmlab.data.corpus import iter_documents
    tok = load_tokenizer(tok_dir)
    docs = list(iter_documents(Path(corpus)))
    if mode == "hf-loop":
        ids = []
        for d in docs:
            ids.extend(tok(d).input_ids)  # the tokenizer appends </s> itself, as T5's does
    else:
        ids = [i for row in tok(docs).input_ids for i in row]
    arr = np.asarray(ids, dtype=np.uint16)
    arr.tofile(out + "/hf.bin")
    n = arr.size
dt = time.perf_counter() - t0
print(json.dumps({"tokens": n, "seconds": dt, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def run(mode: str, corpus: Path, tok_dir: str, repeat: int = 1) -> dict:
    with tempfile.TemporaryDirectory() as out:
        p = subprocess.run(
            [sys.executable, "-c", CHILD, mode, str(corpus), out, tok_dir, str(repeat)],
            capture_output=True,
            text=True,
            check=False,
        )
        if p.returncode:
            sys.exit(f"{mode} failed:\n{p.stderr}")
        return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=DEFAULT)
    ap.add_argument("--repeat", type=int, default=8, help="N for the bounded-memory run")
    args = ap.parse_args()
    if not args.corpus.is_file():
        sys.exit(f"bench/prepare.py: error: {args.corpus} not found (the shared corpora are optional)")
    size = args.corpus.stat().st_size
    print(f"corpus {args.corpus.name}: {size / 1e6:.1f} MB; 2 threads available; vocabulary 8192 (Unigram)")

    with tempfile.TemporaryDirectory() as tok_dir:
        from lmlab.data import prepare

        prepare([args.corpus], tok_dir, progress=False)  # a tokenizer for the reuse runs
        rows = [
            ("lmlab prepare (train tokenizer)", run("lmlab-train", args.corpus, tok_dir), 1),
            ("lmlab prepare (reuse tokenizer)", run("lmlab-reuse", args.corpus, tok_dir), 1),
            (
                f"lmlab prepare (reuse, corpus x{args.repeat})",
                run("lmlab-reuse", args.corpus, tok_dir, args.repeat),
                args.repeat,
            ),
            ("HF tokenizer, per-document loop", run("hf-loop", args.corpus, tok_dir), 1),
            ("HF tokenizer, one batch in memory", run("hf-batch", args.corpus, tok_dir), 1),
        ]
    base = rows[1][1]["tokens"] / rows[1][1]["seconds"]
    print(
        f"{'variant':<40} {'tokens':>12} {'s':>7} {'M tok/s':>8} {'MB/s':>6} {'peak MiB':>9} {'lmlab(reuse)/this':>18}"
    )
    for name, r, rep in rows:
        tps = r["tokens"] / r["seconds"]
        print(
            f"{name:<40} {r['tokens']:>12,} {r['seconds']:>7.2f} {tps / 1e6:>8.2f} "
            f"{size * rep / r['seconds'] / 1e6:>6.1f} {r['rss'] / 2**20:>9.0f} {base / tps:>17.2f}x"
        )


if __name__ == "__main__":
    main()
