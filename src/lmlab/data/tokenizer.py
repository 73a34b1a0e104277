"""Training and loading lmlab's tokenizers (Hugging Face ``tokenizers``).

The vocabulary follows T5's layout (Raffel et al. 2020, §2.2 and Appendix; the released T5
SentencePiece model): ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, then ``<mask>`` = 3 (for BERT's
masked LM), the learned pieces, and 100 sentinels at the very top of the vocabulary with
``<extra_id_0>`` the highest id, ``<extra_id_k>`` = vocab_size − 1 − k.

Two models: a SentencePiece-style Unigram LM (T5's choice, the default) and a byte-level BPE
(GPT-2's, which never needs ``<unk>``).  A saved ``tokenizer.json`` loads with
``transformers.PreTrainedTokenizerFast(tokenizer_file=...)``; :func:`load_tokenizer` also sets its
special-token attributes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from lmlab.errors import LmlabError

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

PAD, EOS, UNK, MASK = "<pad>", "</s>", "<unk>", "<mask>"
BASE_SPECIALS = (PAD, EOS, UNK, MASK)  # ids 0, 1, 2, 3
NUM_SENTINELS = 100
SENTINELS = tuple(f"<extra_id_{k}>" for k in range(NUM_SENTINELS))
TOKENIZER_TYPES = ("unigram", "bpe")
DEFAULT_VOCAB_SIZE = 8192
# The smallest vocabulary worth training: the specials, the sentinels and room for an alphabet.
MIN_VOCAB_SIZE = len(BASE_SPECIALS) + NUM_SENTINELS + 64


def check_settings(vocab_size: int, kind: str) -> None:
    """One-line errors for a tokenizer that cannot be built, before any text is read."""
    if kind not in TOKENIZER_TYPES:
        raise LmlabError(f"unknown tokenizer type {kind!r}; choose one of {', '.join(TOKENIZER_TYPES)}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise LmlabError(
            f"--vocab-size {vocab_size} is too small: the {len(BASE_SPECIALS)} special tokens and "
            f"{NUM_SENTINELS} sentinels need at least {MIN_VOCAB_SIZE}"
        )
    if vocab_size > 1 << 32:
        raise LmlabError(f"--vocab-size {vocab_size} does not fit in 32-bit token ids")


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    kind: str = "unigram",
    show_progress: bool = False,
) -> Tokenizer:
    """Train a tokenizer on an iterator of documents (streamed; never held in memory at once).

    The learned part has ``vocab_size - 100`` entries (the 4 base specials included) and the
    100 sentinels are added on top, so the returned tokenizer has exactly ``vocab_size`` ids
    unless the corpus is too small to fill the learned part.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    check_settings(vocab_size, kind)
    learned = vocab_size - NUM_SENTINELS
    if kind == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFKC(), normalizers.Replace(Regex(r"[ \t]+"), " ")]
        )
        # Newlines are kept as their own pieces so that decoding gives the text's lines back.
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(r"\n+"), behavior="isolated"),
                pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
            ]
        )
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        trainer = trainers.UnigramTrainer(
            vocab_size=learned,
            special_tokens=list(BASE_SPECIALS),
            unk_token=UNK,
            max_piece_length=16,
            show_progress=show_progress,
        )
    else:
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=learned,
            special_tokens=list(BASE_SPECIALS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
    tok.train_from_iterator(texts, trainer=trainer)
    if kind == "unigram":
        tok = _demote_special_pieces(tok)
    # Added in reverse so that <extra_id_0> lands on the highest id (T5's convention).
    tok.add_special_tokens(list(reversed(SENTINELS)))
    _check_layout(tok)
    return tok


def _demote_special_pieces(tok: Tokenizer) -> Tokenizer:
    """Give the special tokens' Unigram pieces the lowest score.

    The trainer stores them with log-probability 0, the best score a piece can have, so with
    ``encode_special_tokens`` (how ``prepare`` encodes documents) the literal text "</s>" would
    still become the end-of-document id.  Demoted, such text is spelled out in ordinary pieces.
    """
    from tokenizers import Tokenizer

    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    floor = min(score for _, score in vocab) - 1000.0
    for entry in vocab:
        if entry[0] in BASE_SPECIALS:
            entry[1] = floor
    return Tokenizer.from_str(json.dumps(spec))


def special_ids(tok: Tokenizer) -> dict[str, int]:
    """The ids of the special tokens, by role: pad, eos, unk, mask, sentinel_0 (highest)."""
    return {
        "pad": tok.token_to_id(PAD),
        "eos": tok.token_to_id(EOS),
        "unk": tok.token_to_id(UNK),
        "mask": tok.token_to_id(MASK),
        "sentinel_0": tok.token_to_id(SENTINELS[0]),
        "num_sentinels": NUM_SENTINELS,
    }


def _check_layout(tok: Tokenizer) -> None:
    v = tok.get_vocab_size(with_added_tokens=True)
    ids = special_ids(tok)
    want = {"pad": 0, "eos": 1, "unk": 2, "mask": 3, "sentinel_0": v - 1}
    bad = {k: ids[k] for k in want if ids[k] != want[k]}
    if bad or any(tok.token_to_id(s) != v - 1 - k for k, s in enumerate(SENTINELS)):
        raise LmlabError(
            f"tokenizer does not follow lmlab's layout (<pad>=0, </s>=1, <unk>=2, <mask>=3, "
            f"<extra_id_k>=vocab-1-k): got {bad or 'misplaced sentinels'}"
        )


def read_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a ``tokenizers.Tokenizer`` from ``tokenizer.json`` or a directory holding one."""
    from tokenizers import Tokenizer

    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise LmlabError(f"no tokenizer at {path} (expected a tokenizer.json or a directory with one)")
    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise LmlabError(f"{p} is not a valid tokenizer.json: {str(e).splitlines()[0]}") from None
    _check_layout(tok)
    return tok


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """A ``transformers`` tokenizer with lmlab's special tokens set (pad, eos, unk, mask, sentinels).

    ``path`` is a ``tokenizer.json``, a prepared data directory, a run directory or a saved
    model directory.  Encoding appends nothing: callers add ``</s>`` where their objective
    wants it, exactly as ``prepare`` separates documents.
    """
    from transformers import PreTrainedTokenizerFast

    tok = read_tokenizer(path)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        mask_token=MASK,
        additional_special_tokens=list(SENTINELS),
        model_max_length=1 << 30,
    )


def save_tokenizer(tok: Tokenizer, path: str | os.PathLike) -> None:
    """Write ``tokenizer.json`` atomically."""
    from lmlab.io import atomic_write_bytes

    text = tok.to_str(pretty=False)
    json.loads(text)  # fail here, not at load time, if the library ever emits something odd
    atomic_write_bytes(path, text.encode("utf-8"))
