"""Corpus → tokenizer → token shards (``lmlab prepare``) and the readers training uses.

See :mod:`lmlab.data.shards` for the on-disk format and :mod:`lmlab.data.tokenizer` for the
vocabulary layout of lmlab's own tokenizers (T5's: ``<pad>``=0, ``</s>``=1, ``<unk>``=2, ``<mask>``=3,
sentinels on top); any Hugging Face tokenizer can be reused with its own (:func:`load_tokenizer`).
"""

from lmlab.data.pipeline import PrepareResult, default_data_dir, ensure_default_data, prepare
from lmlab.data.shards import load_meta, load_tokens, token_dtype
from lmlab.data.tokenizer import (
    EOS,
    MASK,
    NUM_SENTINELS,
    PAD,
    SENTINELS,
    UNK,
    load_tokenizer,
    read_tokenizer,
    special_ids,
    train_tokenizer,
)

__all__ = [
    "PrepareResult",
    "default_data_dir",
    "ensure_default_data",
    "prepare",
    "EOS",
    "MASK",
    "NUM_SENTINELS",
    "PAD",
    "SENTINELS",
    "UNK",
    "load_meta",
    "load_tokenizer",
    "load_tokens",
    "read_tokenizer",
    "special_ids",
    "token_dtype",
    "train_tokenizer",
]
