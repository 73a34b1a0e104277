"""Training and loading lmlab's tokenizers (Hugging Face ``tokenizers``).

The vocabulary follows T5's layout (Raffel et al. 2020, §2.2 and Appendix; the released T5
SentencePiece model): ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, then ``<mask>`` = 3 (for BERT's
masked LM), the learned pieces, and 100 sentinels at the very top of the vocabulary with
``<extra_id_0>`` the highest id, ``<extra_id_k>`` = vocab_size − 1 − k.

Two models: a SentencePiece-style Unigram LM (T5's choice, the default) and a byte-level BPE
(GPT-2's, which never needs ``<unk>``).  Like T5's own tokenizer, lmlab's appends ``</s>`` to every
sequence (a ``TemplateProcessing`` post-processor, ``$A </s>``), so ``tok("hello world")`` gives
the ids training saw: ``prepare`` ends each document with ``</s>`` the same way.  A saved
``tokenizer.json`` loads with ``transformers.PreTrainedTokenizerFast(tokenizer_file=...)``;
:func:`load_tokenizer` also sets its special-token attributes, and what it returns saves (with
``save_pretrained``) a ``tokenizer_config.json`` whose class, ``PreTrainedTokenizerFast``,
transformers 4.x and 5.x both load.

Any other Hugging Face tokenizer works too (a directory with a ``tokenizer.json``, or a slow
tokenizer's files that ``AutoTokenizer`` converts): :func:`load_tokenizer` loads it with its own
special tokens (BERT's ``[CLS]``/``[SEP]``/``[MASK]``, T5's ``<extra_id_N>``, GPT-2's
``<|endoftext|>`` and no pad), and :func:`role_ids` and :func:`framing` say what ``prepare`` and the
objectives need from it.  Only lmlab's own tokenizers (:func:`is_lmlab_layout`) keep the layout above.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmlab.errors import LmlabError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

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
    add_eos_template(tok)
    return tok


def add_eos_template(tok: Tokenizer) -> None:
    """Make ``tok`` append ``</s>`` to every sequence, as T5's tokenizer does (its post-processor,
    ``$A </s>`` and ``$A </s> $B </s>``); ``encode(..., add_special_tokens=False)`` still adds nothing."""
    from tokenizers import processors

    eos = (EOS, tok.token_to_id(EOS))
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B:1 {EOS}:1", special_tokens=[eos]
    )


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


def is_lmlab_layout(tok: Tokenizer) -> bool:
    """Whether ``tok`` has lmlab's own layout (module docstring): a tokenizer lmlab trained."""
    try:
        _check_layout(tok)
    except LmlabError:
        return False
    return True


def _read_file(p: Path) -> Tokenizer:
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise LmlabError(f"{p} is not a valid tokenizer.json: {str(e).splitlines()[0]}") from None


def read_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load one of lmlab's own ``tokenizers.Tokenizer`` from ``tokenizer.json`` or a directory holding
    one; a tokenizer of another layout is refused (:func:`load_tokenizer` takes any)."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise LmlabError(f"no tokenizer at {path} (expected a tokenizer.json or a directory with one)")
    tok = _read_file(p)
    _check_layout(tok)
    return tok


# Files of a Hugging Face tokenizer (fast or slow) that ``save_pretrained`` writes or ``AutoTokenizer`` reads.
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
# What transformers 4.x and 5.x both resolve (5.x's own name for it, TokenizersBackend, 4.x lacks).
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
PADDING_SIDES = ("right", "left")


def load_tokenizer(path: str | os.PathLike, padding_side: str | None = None) -> Any:
    """A ``transformers`` fast tokenizer, with its special tokens set, from any tokenizer.

    ``path`` is a ``tokenizer.json``, a prepared data directory, a run directory, a saved model
    directory, or any Hugging Face tokenizer directory (a ``tokenizer.json``, or a slow tokenizer's
    files that ``AutoTokenizer`` converts).  lmlab's own tokenizers (:func:`is_lmlab_layout`) get
    lmlab's special tokens (pad, eos, unk, mask, sentinels) and append ``</s>`` when they were
    trained to; any other tokenizer is loaded by ``AutoTokenizer`` with its own.  ``padding_side``
    (``"left"`` for causal models, as transformers advises for batched generation) is saved with it.
    """
    if padding_side is not None and padding_side not in PADDING_SIDES:
        raise LmlabError(f"padding_side must be one of {', '.join(PADDING_SIDES)}, got {padding_side!r}")
    p = Path(path)
    file = p / "tokenizer.json" if p.is_dir() else p
    tok = _read_file(file) if file.is_file() else None
    if tok is not None and is_lmlab_layout(tok):
        return _lmlab_class()(
            tokenizer_object=tok,
            pad_token=PAD,
            eos_token=EOS,
            unk_token=UNK,
            mask_token=MASK,
            additional_special_tokens=list(SENTINELS),
            model_max_length=1 << 30,
            # No token_type_ids (transformers 4.x's default adds them, and GPT-2's generate() refuses them).
            model_input_names=["input_ids", "attention_mask"],
            **({"padding_side": padding_side} if padding_side else {}),
        )
    if p.is_dir() and any((p / n).is_file() for n in HF_TOKENIZER_FILES):
        return _auto_tokenizer(p, padding_side)
    if tok is not None:  # a lone tokenizer.json of another layout: no file names its special tokens
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(tokenizer_object=tok, padding_side=padding_side or "right")
    raise LmlabError(f"no tokenizer at {path} (expected a tokenizer.json or a directory with one)")


def _auto_tokenizer(d: Path, padding_side: str | None) -> Any:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        kw = {"padding_side": padding_side} if padding_side else {}
        tok = AutoTokenizer.from_pretrained(d, use_fast=True, local_files_only=True, **kw)
    except Exception as e:  # OSError, ValueError, ImportError (no sentencepiece), ...
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = lines[0][:300] if lines else type(e).__name__
        raise LmlabError(f"{d}: transformers' AutoTokenizer cannot load its tokenizer ({why})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if not getattr(tok, "is_fast", False) or getattr(tok, "backend_tokenizer", None) is None:
        raise LmlabError(
            f"{d}: its tokenizer ({type(tok).__name__}) has no fast (Rust) form and transformers could not "
            "convert it; lmlab needs a tokenizer.json (save it with a fast tokenizer)"
        )
    return tok


_LMLAB_CLASS: list[type] = []


def _lmlab_class() -> type:
    """``transformers.PreTrainedTokenizerFast`` whose ``save_pretrained`` writes a ``tokenizer_config.json``
    that transformers 4.x loads too (made on first use: importing this module imports no transformers)."""
    if _LMLAB_CLASS:
        return _LMLAB_CLASS[0]
    from transformers import PreTrainedTokenizerFast

    class LmlabTokenizerFast(PreTrainedTokenizerFast):
        """lmlab's tokenizer in transformers; saves as a plain ``PreTrainedTokenizerFast``."""

        def save_pretrained(self, save_directory, *args, **kwargs):  # type: ignore[override]
            files = super().save_pretrained(save_directory, *args, **kwargs)
            portable_tokenizer_config(Path(save_directory) / "tokenizer_config.json")
            return files

    LmlabTokenizerFast.__module__ = __name__
    globals()["LmlabTokenizerFast"] = LmlabTokenizerFast  # so that pickle finds it by name
    _LMLAB_CLASS.append(LmlabTokenizerFast)
    return LmlabTokenizerFast


def set_padding_side(tok: Any, side: str) -> None:
    """Pad ``tok``'s batches on ``side`` and save that with it (``tokenizer_config.json``'s
    ``padding_side``): ``"left"`` for causal models, which generate from the last position."""
    if side not in PADDING_SIDES:
        raise LmlabError(f"padding_side must be one of {', '.join(PADDING_SIDES)}, got {side!r}")
    tok.padding_side = side
    tok.init_kwargs["padding_side"] = side


def portable_tokenizer_config(path: str | os.PathLike) -> None:
    """Rewrite a ``tokenizer_config.json`` of lmlab's tokenizer so that transformers 4.x and 5.x load it.

    transformers 5 names the class ``TokenizersBackend`` (4.x has no such class) and writes the
    sentinels as a list under ``extra_special_tokens``, which 4.x takes for a dict of named tokens;
    both versions read the class ``PreTrainedTokenizerFast`` and the list ``additional_special_tokens``.
    """
    from lmlab.io import atomic_write_json, read_json_object

    cfg = read_json_object(path)
    cfg["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    extra = cfg.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        cfg["additional_special_tokens"] = extra
    elif extra:
        cfg["extra_special_tokens"] = extra
    cfg.pop("backend", None)  # 5.x's marker for the same class
    atomic_write_json(path, cfg)


def backend_copy(tok: Any) -> Tokenizer:
    """The Rust ``tokenizers.Tokenizer`` under ``tok`` (or ``tok`` itself), copied, with truncation and
    padding off: a model directory's ``tokenizer.json`` may truncate to 128 ids and pad (MiniLM's
    does), which would silently cut every document ``prepare`` encodes."""
    from tokenizers import Tokenizer

    raw = tok if hasattr(tok, "get_vocab_size") else tok.backend_tokenizer
    out = Tokenizer.from_str(raw.to_str())
    out.no_truncation()
    out.no_padding()
    return out


def sentinel_run(vocab: dict[str, int]) -> tuple[int | None, int]:
    """``(<extra_id_0>'s id, k)``: T5's sentinels ``<extra_id_j>`` = ``<extra_id_0> - j`` for ``j < k``
    (Raffel et al. 2020; the layout of T5's and lmlab's vocabularies), ``(None, 0)`` without them."""
    first = vocab.get(SENTINELS[0])
    if first is None:
        return None, 0
    k = 0
    while vocab.get(f"<extra_id_{k}>") == first - k:
        k += 1
    return first, k


ROLES = ("pad", "eos", "unk", "mask", "bos", "cls", "sep")


def role_ids(tok: Any) -> dict[str, int | None]:
    """The ids of ``tok``'s special tokens by role (``None`` where it has none), read from the tokenizer:
    ``pad``, ``eos``, ``unk``, ``mask``, ``bos``, ``cls``, ``sep``, ``sentinel_0`` and ``num_sentinels``
    (:func:`sentinel_run`), and ``vocab_size`` (every id, added tokens included).

    ``tok`` is a ``transformers`` tokenizer (its own special-token attributes) or a raw
    ``tokenizers.Tokenizer`` (lmlab's token names: it records no roles).
    """
    if hasattr(tok, "get_vocab_size"):  # tokenizers.Tokenizer
        vocab = tok.get_vocab(with_added_tokens=True)
        names = {"pad": PAD, "eos": EOS, "unk": UNK, "mask": MASK}
        out: dict[str, int | None] = {r: vocab.get(names[r]) if r in names else None for r in ROLES}
        size = tok.get_vocab_size(with_added_tokens=True)
    elif hasattr(tok, "convert_tokens_to_ids"):  # transformers
        vocab = tok.get_vocab()
        out = {r: getattr(tok, f"{r}_token_id", None) for r in ROLES}
        size = len(tok)
    else:
        raise LmlabError(f"expected a transformers or tokenizers tokenizer, got {type(tok).__name__}")
    out["sentinel_0"], out["num_sentinels"] = sentinel_run(vocab)
    out["vocab_size"] = max(int(size), max(vocab.values(), default=-1) + 1)
    return {k: None if v is None else int(v) for k, v in out.items()}


def framing(tok: Tokenizer) -> tuple[int, int]:
    """How many special tokens ``tok``'s post-processor puts before and after one sequence:
    BERT's ``[CLS] … [SEP]`` is (1, 1), T5's and lmlab's ``… </s>`` (0, 1), GPT-2's (0, 0)."""
    probe = "a b"
    plain = tok.encode(probe, add_special_tokens=False).ids
    full = tok.encode(probe, add_special_tokens=True).ids
    n = len(plain)
    for i in range(len(full) - n + 1):
        if full[i : i + n] == plain:
            return i, len(full) - i - n
    return 0, 0  # a post-processor that rewrites the sequence itself: treated as adding nothing


def vocab_sha256(tok: Any) -> str:
    """A fingerprint of what the ids mean: SHA-256 of every (id, token) pair and the special roles.

    Two tokenizers with the same fingerprint turn the same ids into the same tokens; ``pretrain
    --init`` compares the model's with the data's (files, formatting and truncation settings aside).
    """
    import hashlib

    vocab = tok.get_vocab(with_added_tokens=True) if hasattr(tok, "get_vocab_size") else tok.get_vocab()
    roles = {k: v for k, v in role_ids(tok).items() if k != "vocab_size"}
    blob = json.dumps([sorted((i, t) for t, i in vocab.items()), sorted(roles.items())], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def save_tokenizer(tok: Tokenizer, path: str | os.PathLike) -> None:
    """Write ``tokenizer.json`` atomically."""
    from lmlab.io import atomic_write_bytes

    text = tok.to_str(pretty=False)
    json.loads(text)  # fail here, not at load time, if the library ever emits something odd
    atomic_write_bytes(path, text.encode("utf-8"))
