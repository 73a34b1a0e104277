"""Evaluation of trained, untrained, quantized and any Hugging Face models (``lmlab.eval``).

The measuring instrument every later experiment stands on; each function returns a dataclass whose
``to_dict()`` is what ``lmlab eval --json`` prints:

* :func:`perplexity`: causal LMs, Hugging Face's sliding-window scheme; perplexity, bits per byte and
  word perplexity with lm-evaluation-harness's definitions (:mod:`lmlab.eval.causal`);
* :func:`denoising_loss`, :func:`pseudo_log_likelihood`: T5 / BERT, the NLL of a pre-training
  objective's targets on fixed corruptions, and the MLM pseudo-log-likelihood (:mod:`lmlab.eval.denoising`);
* :func:`compare`: quantization damage, llama.cpp's protocol (KL divergence, top-1 agreement, deltas)
  (:mod:`lmlab.eval.damage`);
* :func:`memorization`: Carlini et al.'s extractable rate and Pythia's partial score (:mod:`lmlab.eval.extraction`);
* :func:`compression_bits_per_byte`: the gzip / bz2 / xz floor (:mod:`lmlab.eval.bytes`);
* :func:`load_for_eval`, :func:`generate`: any model directory, and sampling (:mod:`lmlab.eval.load`,
  :mod:`lmlab.eval.sampling`);
* :func:`evaluate`, :class:`LossHead`, :func:`eval_pass`: the validation loss the training loop reports
  (:mod:`lmlab.eval.loss`).

All of them score through :mod:`lmlab.eval.scoring`: only the scored positions reach the output
projection.  The modules are named for their subject, not their function (``causal``, ``damage``,
``extraction``, ``sampling``), so that ``lmlab.eval.perplexity`` is always the function, never a module.  Importing this package is cheap; torch loads on first use of these names.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "LossHead": "loss",
    "eval_pass": "loss",
    "evaluate": "loss",
    "perplexity": "causal",
    "PerplexityResult": "causal",
    "Window": "causal",
    "window_plan": "causal",
    "window_batches": "causal",
    "windowed_text": "causal",
    "WindowedText": "causal",
    "default_max_length": "causal",
    "denoising_loss": "denoising",
    "DenoisingResult": "denoising",
    "objective_batches": "denoising",
    "default_objective": "denoising",
    "pseudo_log_likelihood": "denoising",
    "PLLResult": "denoising",
    "compare": "damage",
    "CompareResult": "damage",
    "ModelScore": "damage",
    "distribution_stats": "damage",
    "check_same_tokenizer": "damage",
    "memorization": "extraction",
    "MemorizationResult": "extraction",
    "SplitMemorization": "extraction",
    "sample_offsets": "extraction",
    "greedy_continuations": "extraction",
    "compression_bits_per_byte": "bytes",
    "token_byte_lengths": "bytes",
    "bytes_of": "bytes",
    "load_for_eval": "load",
    "Loaded": "load",
    "generate": "sampling",
    "fill_sentinels": "sampling",
    "load_eval_text": "text",
    "EvalText": "text",
    "TextStats": "text",
    "text_stats": "text",
    "encode_documents": "text",
    "decode_documents": "text",
    "causal_stream": "text",
    "documents_from_paths": "text",
    "token_nll": "scoring",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"lmlab.eval.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'lmlab.eval' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
