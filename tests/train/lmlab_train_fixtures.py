"""A tiny prepared data directory for the training tests (tokenizer of 512 ids, ~40k tokens)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

WORDS_TEXT = (
    "the a of and to in is was for on that with as by at from it this be are were which an or his her "
    "model data language train text token sentence paper result table method small large corpus word "
    "river city king music science history water light north year people time world school"
)
WORDS = WORDS_TEXT.split(" ")


def make_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        sentences = []
        for _ in range(rng.randint(2, 6)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(5, 14))]
            sentences.append(" ".join(words).capitalize() + ".")
        texts.append(" ".join(sentences))
    return texts


def write_prepared(out: Path, train_docs: int = 600, val_docs: int = 80, seed: int = 0, tok=None) -> Path:
    """Write tokenizer.json, train.bin, val.bin and meta.json in lmlab's shard format."""
    from lmlab.data import special_ids, train_tokenizer
    from lmlab.data.shards import FORMAT, token_dtype
    from lmlab.data.tokenizer import save_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    train, val = make_texts(train_docs, seed), make_texts(val_docs, seed + 1)
    if tok is None:
        tok = train_tokenizer(train, vocab_size=512)
    save_tokenizer(tok, out / "tokenizer.json")
    V = tok.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(V)
    meta = {"format": FORMAT, "dtype": dtype.str, "vocab_size": V, "special_ids": special_ids(tok)}
    for split, docs in (("train", train), ("val", val)):
        ids = []
        for enc in tok.encode_batch(docs, add_special_tokens=False):
            ids.extend(enc.ids)
            ids.append(1)
        arr = np.asarray(ids, dtype=dtype)
        (out / f"{split}.bin").write_bytes(arr.tobytes())
        meta[split] = {"tokens": int(arr.size), "documents": len(docs)}
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def tiny_config(data_dir: Path, out: Path, **kw):
    """A t5-tiny span-corruption run of 8 steps on ``data_dir``: seconds on a CPU."""
    from lmlab.train import PretrainConfig

    base = dict(data=[str(data_dir)], out=str(out), objective="span", model="t5-tiny", steps=8, batch_size=4,
                seq_len=32, eval_every=4, eval_batches=2, save_every=2, keep=3, workers=1, progress=False,
                precision="fp32")  # fmt: skip
    return PretrainConfig(**{**base, **kw})
