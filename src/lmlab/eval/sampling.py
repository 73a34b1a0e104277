"""Sampling text from a causal or T5 model: :func:`generate` and the ``lmlab generate`` command.

    lmlab generate runs/gpt/final --prompt "Call me Ishmael." --max-new-tokens 64 --temperature 0.8 --top-p 0.95
    lmlab generate runs/t5/final --prompt "The <extra_id_0> sat on the <extra_id_1>." --temperature 0

Decoding is Hugging Face ``model.generate`` (with its KV cache): temperature scaling, then top-k,
then nucleus (top-p) filtering (Holtzman et al. 2020, §3.1 "Nucleus Sampling"), and multinomial
sampling; temperature 0 is greedy decoding.  The sampling knobs are exactly the arguments: a model's
``generation_config`` supplies its special token ids (and any forced or suppressed tokens), never
its own sampling or repetition-penalty defaults, so temperature 0 here is the plain argmax chain.
Sampling is seeded on a forked RNG: the caller's random state is untouched and the same seed gives
the same samples; ``num_samples`` samples are drawn in turn from that one seed.

A causal prompt is its encoding without the trailing ``</s>`` lmlab's tokenizer appends (it would
tell the model the text is over), with the tokenizer's BOS where it adds one; an empty prompt starts
from BOS (else EOS), i.e. unconditional samples.  For T5 the prompt is the encoder input (eos
included) and the output is what the decoder writes; for a prompt with sentinels that is T5's target
format, ``<extra_id_0> span0 <extra_id_1> span1 ...`` (Raffel et al. 2020, §3.1.4 "Unsupervised
objective"), which :func:`fill_sentinels` puts back in place.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable
from typing import Any

from lmlab.errors import LmlabError

__all__ = ["configure", "fill_sentinels", "generate", "prompt_ids", "run", "sentinel_spans", "check_sampling"]

_SENTINEL = re.compile(r"<extra_id_(\d+)>")
# Text T5's decoded target may carry around its spans: its start (pad) and end (eos) tokens.
_FRAME = re.compile(r"<pad>|</s>")
MISSING = "?"


# --------------------------------------------------------------------------------- T5's sentinels


def sentinel_spans(output: str) -> dict[int, str]:
    """The spans of a T5 target ``"<extra_id_0> span0 <extra_id_1> span1 ..."`` by sentinel number,
    each stripped of surrounding spaces; text before the first sentinel is ignored, and a sentinel
    that occurs twice keeps its first span."""
    parts = _SENTINEL.split(_FRAME.sub("", output))  # [before, "0", span0, "1", span1, ...]
    spans: dict[int, str] = {}
    for k, text in zip(parts[1::2], parts[2::2], strict=True):
        spans.setdefault(int(k), text.strip())
    return spans


def fill_sentinels(prompt: str, output: str, mark: str = "[{}]") -> str:
    """``prompt`` with each sentinel ``<extra_id_k>`` replaced by span k of the T5 ``output``, marked
    with ``mark`` (``"[{}]"``): ``fill_sentinels("The <extra_id_0> sat.", "<extra_id_0> cat</s>")`` is
    ``"The [cat] sat."``.  A span the output lacks is marked ``[?]``; an empty one ``[]``."""
    spans = sentinel_spans(output)
    return _SENTINEL.sub(lambda m: mark.format(spans.get(int(m.group(1)), MISSING)), prompt)


def has_sentinels(text: str) -> bool:
    return _SENTINEL.search(text) is not None


# ------------------------------------------------------------------------------------------ checks


def check_sampling(
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    num_samples: int,
    flags: bool = False,
) -> None:
    """A one-line :class:`LmlabError` for a setting no sampler takes (``flags``: name them as the
    command's options, ``--max-new-tokens``, rather than as arguments)."""

    def name(n: str) -> str:
        return "--" + n.replace("_", "-") if flags else n

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not is_int(max_new_tokens) or max_new_tokens <= 0:
        raise LmlabError(f"{name('max_new_tokens')} must be a positive integer, got {max_new_tokens!r}")
    if not is_int(num_samples) or num_samples <= 0:
        raise LmlabError(f"{name('num_samples')} must be a positive integer, got {num_samples!r}")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
    ):
        raise LmlabError(f"{name('temperature')} must be a finite number >= 0, got {temperature!r}")
    if temperature < 0:
        raise LmlabError(f"{name('temperature')} must be >= 0 (0 is greedy decoding), got {temperature!r}")
    if top_k is not None and (not is_int(top_k) or top_k <= 0):
        raise LmlabError(f"{name('top_k')} must be a positive integer, got {top_k!r}")
    if top_p is not None and (
        isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1
    ):
        raise LmlabError(f"{name('top_p')} must be in (0, 1], got {top_p!r}")


def _check_generates(model: Any, kind: str) -> None:
    from lmlab.models.families import ENCODER

    if kind == ENCODER:
        raise LmlabError(
            f"lmlab generate needs a causal or T5 model; {type(model).__name__} is a masked language model"
        )


# ------------------------------------------------------------------------------------------ prompts


def prompt_ids(tokenizer: Any, prompt: str, kind: str) -> list[int]:
    """The ids ``model.generate`` starts from: for a decoder-only model (``kind == "decoder"``) the
    encoding with the tokenizer's leading special tokens (BOS) but not its trailing ones (lmlab's
    ``</s>``), or ``[BOS]`` (else ``[EOS]``) for an empty prompt; for an encoder-decoder the whole
    encoding, the encoder's input."""
    from lmlab.models.families import DECODER

    full = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if kind != DECODER:
        return full
    plain = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    n = len(plain)
    ids = None
    for i in range(len(full) - n + 1):  # full = leading specials + plain + trailing specials
        if full[i : i + n] == plain:
            ids = full[: i + n]
            break
    if ids is None:  # a post-processor that rewrites the text: drop a trailing eos only
        eos = tokenizer.eos_token_id
        ids = full[:-1] if full and eos is not None and full[-1] == eos else full
    if not ids:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise LmlabError(
                "the prompt encodes to no tokens and the tokenizer has no BOS or EOS to start from"
            )
        ids = [int(start)]
    return ids


def _generation_config(model: Any, tokenizer: Any, *, max_new_tokens, temperature, top_k, top_p) -> Any:
    """The model's generation config (its token ids, forced and suppressed tokens) with every knob
    that shapes the distribution set from the arguments.  transformers fills the fields left None
    from the model's own config, so neutral values are written explicitly."""
    import copy

    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None)
    gc = copy.deepcopy(base) if base is not None else GenerationConfig()
    if gc.eos_token_id is None:
        gc.eos_token_id = tokenizer.eos_token_id
    if gc.pad_token_id is None:
        gc.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else gc.eos_token_id
    gc.max_new_tokens = int(max_new_tokens)
    gc.max_length = None
    gc.min_length = 0
    gc.min_new_tokens = 0
    gc.num_beams = 1
    gc.num_return_sequences = 1
    gc.repetition_penalty = 1.0
    gc.no_repeat_ngram_size = 0
    gc.do_sample = temperature > 0
    if gc.do_sample:
        gc.temperature = float(temperature)
        gc.top_k = int(top_k) if top_k is not None else 0  # 0: no top-k filter
        gc.top_p = float(top_p) if top_p is not None else 1.0
        gc.typical_p = 1.0
        if getattr(gc, "min_p", None) is not None:
            gc.min_p = 0.0
    return gc


def _seeded(device: Any, seed: int):
    """A context with the RNG of ``device`` (and the CPU's) forked and seeded: sampling inside it
    is reproducible and leaves the caller's random state as it was."""
    import contextlib

    import torch

    @contextlib.contextmanager
    def ctx():
        cuda = (
            [device.index if device.index is not None else torch.cuda.current_device()]
            if device.type == "cuda"
            else []
        )
        with torch.random.fork_rng(devices=cuda):
            torch.default_generator.manual_seed(seed)
            for i in cuda:
                torch.cuda.default_generators[i].manual_seed(seed)
            yield

    return ctx()


def generate(
    model: Any,
    tokenizer: Any,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    num_samples: int = 1,
    streamer: Any = None,
) -> list[str]:
    """``num_samples`` continuations of ``prompt`` (a str), each up to ``max_new_tokens`` tokens.

    A decoder-only model's samples are the text after the prompt (special tokens left out); an
    encoder-decoder's are what its decoder wrote, with T5's sentinels kept and its start and end
    tokens left out (:func:`fill_sentinels` puts the spans into a sentinel prompt).  ``temperature``
    0 is greedy; otherwise multinomial sampling after temperature, ``top_k`` and ``top_p``.
    ``streamer`` (a ``transformers`` streamer, e.g. ``TextStreamer``) receives each sample's tokens
    in turn as they are produced.  The model stays as it is (eval mode, its device and dtype).
    """
    import torch
    from transformers.utils import logging as hf_logging

    from lmlab.eval.scoring import model_device
    from lmlab.models.families import DECODER, scoring_family
    from lmlab.models.presets import max_positions

    check_sampling(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        num_samples=num_samples,
    )
    kind = scoring_family(model).kind
    _check_generates(model, kind)
    ids = prompt_ids(tokenizer, prompt, kind)
    if kind == DECODER:
        limit = max_positions(model)
        if limit is not None and len(ids) + max_new_tokens > limit:
            raise LmlabError(
                f"the prompt ({len(ids)} tokens) plus {max_new_tokens} new tokens exceed the model's "
                f"{limit} positions; shorten the prompt or lower max_new_tokens"
            )
    dev = model_device(model)
    input_ids = torch.tensor([ids], dtype=torch.long, device=dev)  # (1, T)
    gc = _generation_config(
        model, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p
    )
    drop = _frame_ids(model, tokenizer, gc)
    samples: list[str] = []
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "flags not valid for greedy" notes about the model's own config
    try:
        with torch.no_grad(), _seeded(dev, int(seed)):
            for _ in range(num_samples):
                out = model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    generation_config=gc,
                    streamer=streamer,
                )
                samples.append(_decode(tokenizer, ids, out[0].tolist(), kind, drop))
    finally:
        hf_logging.set_verbosity(verbosity)
    return samples


def _frame_ids(model: Any, tokenizer: Any, gc: Any) -> set[int]:
    """An encoder-decoder's start, pad, BOS and EOS ids: the frame around its output, not text."""
    found: set[int] = set()
    for v in (
        gc.pad_token_id,
        gc.eos_token_id,
        gc.bos_token_id,
        getattr(gc, "decoder_start_token_id", None),
        getattr(model.config, "decoder_start_token_id", None),
        tokenizer.pad_token_id,
        tokenizer.eos_token_id,
        tokenizer.bos_token_id,
    ):
        for i in v if isinstance(v, (list, tuple)) else [v]:
            if i is not None:
                found.add(int(i))
    return found


def _decode(tokenizer: Any, prompt: list[int], out: list[int], kind: str, drop: set[int]) -> str:
    from lmlab.models.families import DECODER

    if kind == DECODER:
        # Decode with the prompt, then cut it off: a continuation decoded alone loses the space
        # before its first word (SentencePiece-style decoders strip it at the start of a text).
        new = out[len(prompt) :]
        full = tokenizer.decode(prompt + new, skip_special_tokens=True)
        head = tokenizer.decode(prompt, skip_special_tokens=True)
        return full[len(head) :] if full.startswith(head) else tokenizer.decode(new, skip_special_tokens=True)
    return tokenizer.decode([i for i in out if i not in drop], skip_special_tokens=False)


# ------------------------------------------------------------------------------------------- the CLI


def _streamer_class() -> type:
    from transformers import TextStreamer

    class SampleStreamer(TextStreamer):
        """``TextStreamer`` that leaves out ``drop`` ids (T5's start and end tokens, so that its
        sentinels can be printed) and calls ``on_end(ids)`` with each finished sample's ids."""

        def __init__(self, tokenizer, *, skip_prompt: bool, drop=(), on_end: Callable | None = None, **kw):
            super().__init__(tokenizer, skip_prompt=skip_prompt, **kw)
            self.drop = set(drop)
            self.on_end = on_end
            self.ids: list[int] = []

        def put(self, value):
            if self.skip_prompt and self.next_tokens_are_prompt:
                return super().put(value)
            flat = [int(i) for i in value.reshape(-1).tolist() if int(i) not in self.drop]
            if not flat:
                return None
            self.ids.extend(flat)
            return super().put(value.new_tensor(flat))

        def end(self):
            super().end()
            ids, self.ids = self.ids, []
            if self.on_end is not None:
                self.on_end(ids)

    return SampleStreamer


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        metavar="MODEL",
        help="a run's final/, a checkpoint RUN/checkpoints/step-N/, an lmlab quantize output or any "
        "Hugging Face causal or T5 model directory",
    )
    p.add_argument(
        "--prompt", required=True, help="the text to continue (T5: the encoder input, sentinels allowed)"
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=64, metavar="N", help="tokens to generate (default 64)"
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        metavar="T",
        help="sampling temperature; 0 is greedy (default 1.0)",
    )
    p.add_argument(
        "--top-k", type=int, default=None, metavar="K", help="sample from the K most likely tokens"
    )
    p.add_argument(
        "--top-p", type=float, default=None, metavar="P", help="nucleus sampling: the top tokens of mass P"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed of the sampling (default 0)")
    p.add_argument(
        "--num-samples", type=int, default=1, metavar="N", help="samples to draw, one after the other"
    )
    p.add_argument(
        "--tokenizer", default=None, metavar="DIR", help="the tokenizer (default: the model's or its run's)"
    )
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument(
        "--dtype", default=None, choices=("float32", "bfloat16", "float16"), help="the model's float dtype"
    )


def run(args: argparse.Namespace) -> int:
    if not args.prompt.strip():
        raise LmlabError("--prompt is empty")
    check_sampling(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        num_samples=args.num_samples,
        flags=True,
    )
    from lmlab.eval.load import load_for_eval
    from lmlab.models.families import DECODER

    loaded = load_for_eval(args.model, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype)
    _check_generates(loaded.model, loaded.kind)
    print(f"lmlab generate: {loaded.description} on {loaded.device}", file=sys.stderr, flush=True)
    tok, n = loaded.tokenizer, args.num_samples
    fill = loaded.kind != DECODER and has_sentinels(args.prompt)
    done = 0

    def on_end(ids: list[int]) -> None:
        nonlocal done
        done += 1
        if fill:
            print(
                f"filled: {fill_sentinels(args.prompt, tok.decode(ids, skip_special_tokens=False))}",
                flush=True,
            )
        if done < n:
            print(f"--- sample {done + 1} of {n} ---", flush=True)

    from lmlab.models.presets import quiet_hf_progress

    with quiet_hf_progress():
        gc_drop = set()
        if loaded.kind != DECODER:
            gc = loaded.model.generation_config
            gc_drop = _frame_ids(loaded.model, tok, gc)
        streamer = _streamer_class()(
            tok,
            skip_prompt=loaded.kind != DECODER,  # a decoder prints its prompt, T5 skips its start token
            drop=gc_drop,
            on_end=on_end,
            skip_special_tokens=loaded.kind == DECODER,
        )
        if n > 1:
            print(f"--- sample 1 of {n} ---", flush=True)
        generate(
            loaded.model,
            tok,
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            num_samples=n,
            streamer=streamer,
        )
    return 0
