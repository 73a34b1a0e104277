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
# The trainers reserve memory for the whole vocabulary up front (32 bytes an entry: 32 GB, and a
# crash, at a billion); the largest vocabularies in use are a few hundred thousand.
MAX_VOCAB_SIZE = 1 << 24


class AlphabetTooLarge(LmlabError):
    """The corpus has more distinct characters than the Unigram vocabulary has room for."""


def check_settings(vocab_size: int, kind: str) -> None:
    """One-line errors for a tokenizer that cannot be built, before any text is read."""
    if kind not in TOKENIZER_TYPES:
        raise LmlabError(f"unknown tokenizer type {kind!r}; choose one of {', '.join(TOKENIZER_TYPES)}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise LmlabError(
            f"--vocab-size {vocab_size} is too small: the {len(BASE_SPECIALS)} special tokens and "
            f"{NUM_SENTINELS} sentinels need at least {MIN_VOCAB_SIZE}"
        )
    if vocab_size > MAX_VOCAB_SIZE:
        raise LmlabError(f"--vocab-size {vocab_size} is too large: lmlab supports at most {MAX_VOCAB_SIZE:,}")


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

    The same texts give the same tokenizer, byte for byte, in every process and with any number
    of threads (``RAYON_NUM_THREADS``): the BPE trainer is deterministic (merges of equal count
    are ordered by the pair), and the Unigram vocabulary is put in a canonical order after
    training (:func:`_canonical_unigram`).  A Unigram vocabulary too small for the text's
    distinct characters raises :class:`AlphabetTooLarge`.
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
    try:
        tok.train_from_iterator(texts, trainer=trainer)
    except Exception as e:  # tokenizers raises a bare Exception
        if "not large enough to contain all chars" not in str(e):
            raise
        raise AlphabetTooLarge(
            f"--vocab-size {vocab_size} is too small for the distinct characters of this text: a Unigram "
            "vocabulary must hold every one of them; use a larger --vocab-size, or --tokenizer-type bpe"
        ) from None
    if kind == "unigram":
        tok = _canonical_unigram(tok)
    # Added in reverse so that <extra_id_0> lands on the highest id (T5's convention).
    tok.add_special_tokens(list(reversed(SENTINELS)))
    _check_layout(tok)
    return tok


# Scores are rounded to this many decimals before ids are assigned: the trainer's log-probabilities
# carry summation-order noise (up to ~4e-11 seen) that would otherwise reorder tied pieces.
SCORE_DECIMALS = 5
# Scores closer than this are the same score plus that noise.
_SCORE_TOLERANCE = 1e-9
# The step the Unigram trainer adds to the score of each required character it had pruned
# (tokenizers' ``UnigramTrainer::finalize``, ``min_score_penalty_delta``).
_REQUIRED_CHAR_STEP = 0.0001


def _canonical_unigram(tok: Tokenizer) -> Tokenizer:
    """Rebuild a freshly trained Unigram vocabulary in one stable order, specials demoted.

    The trainer is not reproducible: it walks its table of pre-tokens in hash order (random per
    process, even single-threaded), so scores differ in their last bits from run to run; it gives
    the characters it had pruned the scores ``min + k * 0.0001`` in hash order too; and tied
    pieces get ids in whatever order they arrived.  Here the pruned characters get their scores
    by code point, every score is rounded to :data:`SCORE_DECIMALS` decimals, and the pieces are
    sorted by (score descending, piece), so one corpus always gives one ``tokenizer.json``.

    The trainer also stores the special tokens with log-probability 0, the best score a piece can
    have, so with ``encode_special_tokens`` (how ``prepare`` encodes documents) the literal text
    "</s>" would still become the end-of-document id.  They get the lowest score instead, so such
    text is spelled out in ordinary pieces.
    """
    from tokenizers import Tokenizer

    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    n_special = len(BASE_SPECIALS)
    if [p for p, _ in vocab[:n_special]] != list(BASE_SPECIALS):
        raise LmlabError(f"the Unigram trainer did not put {', '.join(BASE_SPECIALS)} first")
    pieces = {p: s for p, s in vocab[n_special:]}
    pieces.update(_reorder_required_chars(pieces))
    rounded = sorted(((round(s, SCORE_DECIMALS), p) for p, s in pieces.items()), key=lambda e: (-e[0], e[1]))
    floor = round((rounded[-1][0] if rounded else 0.0) - 1000.0, SCORE_DECIMALS)
    spec["model"]["vocab"] = [[p, floor] for p in BASE_SPECIALS] + [[p, s] for s, p in rounded]
    return Tokenizer.from_str(json.dumps(spec))


def _reorder_required_chars(pieces: dict[str, float]) -> dict[str, float]:
    """New scores for the characters at the bottom of a trained Unigram vocabulary.

    The trainer's lowest piece has the model's minimum score ``m``; the characters it had pruned
    get ``m``, ``m + 0.0001``, ``m + 0.0002``, ... in hash order, and other rare characters can
    sit at ``m`` too (to within float noise).  The same scores are handed out again in code-point
    order.
    """
    import bisect

    singles = sorted((s, p) for p, s in pieces.items() if len(p) == 1)
    if not singles:
        return {}
    lowest = min(pieces.values())
    keys = [s for s, _ in singles]
    chain: list[str] = []
    scores: list[float] = []
    penalty = 0.0
    while True:
        want = lowest + penalty
        lo = bisect.bisect_left(keys, want - _SCORE_TOLERANCE)
        hi = bisect.bisect_right(keys, want + _SCORE_TOLERANCE)
        if lo == hi:
            break
        chain.extend(p for _, p in singles[lo:hi])
        scores.extend([want] * (hi - lo))
        penalty += _REQUIRED_CHAR_STEP
    return dict(zip(sorted(chain), sorted(scores, reverse=True), strict=True))


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
