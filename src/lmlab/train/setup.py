"""Setting up a run: the model, the objective, the data streams, the loss heads and the optimizer.

:func:`build` turns a :class:`PretrainConfig` into a :class:`Setup` (everything the loop needs,
checked before a step runs): a fresh preset or the ``--init`` model (continued pre-training,
Gururangan et al. 2020), the objective for its family, the input and corpus lengths, the mixed
sources (∝ n^α, Xue et al. 2021 §2), the loss heads (compiled, DDP- or FSDP-wrapped) and the
optimizer and schedule (T5: Adafactor and inverse-square-root, Raffel et al. 2020 §3.1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from lmlab.data.shards import load_meta
from lmlab.data.tokenizer import set_padding_side
from lmlab.errors import LmlabError
from lmlab.eval.loss import LossHead
from lmlab.models import DECODER, build_model, get_preset, max_positions
from lmlab.models.families import family_of
from lmlab.models.presets import check_not_quantized, load_model_with_head
from lmlab.objectives.registry import make_objective
from lmlab.train import distributed as ddp
from lmlab.train.config import PretrainConfig
from lmlab.train.data import (
    TRAIN_STREAM,
    BatchPlan,
    ObjectiveBatches,
    Sources,
    check_same_tokenizer,
    mixing_rates,
)
from lmlab.train.optim import build_optimizer, build_scheduler
from lmlab.train.precision import resolve_precision
from lmlab.train.state import model_settings


def _resolve_steps(cfg: PretrainConfig, tokens_per_step: int) -> int:
    if cfg.steps is not None:
        return int(cfg.steps)
    if cfg.tokens is not None:
        return max(1, math.ceil(cfg.tokens / tokens_per_step))
    return 1000


class Setup:
    """What :func:`build` resolves for a run: the model and its heads, the data, the optimizer.

    ``base`` is the model itself (on the run's device, sharded under FSDP); ``train_head`` what a
    step calls (compiled and/or DDP-wrapped), ``eval_head`` the eager head validation uses, and
    ``sync_target`` the module whose gradient sync ``no_sync`` holds back between micro-steps.
    ``val_sources`` is None for data without a validation split.
    """

    tokenizer: Any
    family: str
    seq_len: int  # the model's input length
    raw_len: int  # corpus tokens per row, for that input length under the objective
    objective: Any
    start_id: int
    sources: Sources
    rates: np.ndarray
    plan: BatchPlan
    tokens_per_step: int
    total: int
    warmup: int
    precision: str
    base: torch.nn.Module
    eval_head: LossHead
    train_head: torch.nn.Module
    sync_target: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    dataset: ObjectiveBatches
    val_sources: Sources | None
    val_dataset: ObjectiveBatches | None


def build(cfg: PretrainConfig, d: ddp.Dist, log: Callable[[str], None]) -> Setup:
    """Everything a run needs, checked (one-line errors) before a step runs; the caller's order of
    random draws is this function's (the model's initialisation first)."""
    from lmlab.data import load_tokenizer

    s = Setup()
    meta = check_same_tokenizer(cfg.data)
    s.tokenizer = load_tokenizer(cfg.data[0])
    model, default_len = _model(cfg, meta, s.tokenizer, log)
    s.family = family_of(model).kind
    if s.family == DECODER:  # saved with final/: transformers' advice for batched generation
        set_padding_side(s.tokenizer, "left")
    _lengths(s, cfg, model, default_len)
    s.start_id = getattr(model.config, "decoder_start_token_id", 0) or 0

    if cfg.batch_size % (cfg.grad_accum * d.world):
        raise LmlabError(
            f"--batch-size {cfg.batch_size} must be divisible by --grad-accum {cfg.grad_accum} × "
            f"{d.world} processes"
        )
    s.sources = Sources(cfg.data, s.raw_len)
    sizes = [len(t) for t in s.sources.tokens]
    s.rates = mixing_rates(sizes, cfg.mix_alpha)
    s.plan = BatchPlan(s.sources.n_rows, s.rates, cfg.batch_size, cfg.seed)
    s.tokens_per_step = cfg.batch_size * s.raw_len
    s.total = _resolve_steps(cfg, s.tokens_per_step)
    s.warmup = cfg.warmup if cfg.warmup is not None else min(1000, s.total // 20)

    s.precision = resolve_precision(cfg.precision, d.device)
    s.base = model.to(d.device)
    if cfg.fsdp:
        ddp.shard_(s.base, d)
    _heads(s, cfg, d)
    s.optimizer = build_optimizer(s.base, cfg, d.device)
    s.scheduler = build_scheduler(s.optimizer, cfg, s.total, s.warmup)
    s.dataset = ObjectiveBatches(s.sources, s.objective, cfg.seed, shift_labels=s.family == DECODER)
    _check_targets(s, cfg)
    _validation(s, cfg, log)
    return s


def _model(
    cfg: PretrainConfig, meta: dict[str, Any], tokenizer: Any, log: Callable[[str], None]
) -> tuple[torch.nn.Module, int]:
    """The ``--init`` model or a fresh preset, and the input length it defaults to."""
    vocab = int(meta["vocab_size"])
    if cfg.init:
        check_not_quantized(cfg.init)
        own = check_init_tokenizer(cfg.init, cfg.data[0], tokenizer)  # before the (slow) load
        model, fresh = load_model_with_head(cfg.init)
        if fresh:
            was = (getattr(model.config, "architectures", None) or ["body"])[0]
            log(
                f"lmlab pretrain: note: --init {cfg.init} is a {was} without the {type(model).__name__} head; "
                f"its {len(fresh)} head tensors start fresh (the output projection tied to the input "
                "embeddings), as transformers does"
            )
        check_init_embedding(cfg.init, model, vocab, own)
        # The length it was trained at, as its final/ records it (lmlab.train.state.model_settings).
        trained = model_settings(getattr(model, "name_or_path", None), model.config).get("seq_len")
        return model, trained or 512
    preset = get_preset(cfg.model)
    specials = {k: v for k, v in (meta.get("special_ids") or {}).items() if v is not None}
    return build_model(preset, vocab, specials, seed=cfg.seed), preset.seq_len


def _advice(init: str) -> str:
    return f"prepare the data with the model's tokenizer (lmlab prepare --tokenizer {init})"


def check_init_tokenizer(init: str, data: str, tokenizer: Any) -> bool:
    """Refuse ``--init`` of a model directory whose own tokenizer (a run's ``final/``, a Hugging Face
    checkpoint) is not the one ``data`` was prepared with (:func:`lmlab.data.tokenizer.vocab_sha256`:
    the same ids for the same tokens, whatever the files); whether it has a tokenizer at all."""
    from lmlab.data.tokenizer import load_tokenizer, vocab_sha256

    try:
        own = load_tokenizer(init)
    except LmlabError as e:
        if not str(e).startswith("no tokenizer at"):
            raise
        return False
    if vocab_sha256(own) != vocab_sha256(tokenizer):
        raise LmlabError(
            f"--init {init} has its own tokenizer and {data} was prepared with another; {_advice(init)}"
        )
    return True


def check_init_embedding(init: str, model: torch.nn.Module, vocab: int, has_tokenizer: bool) -> None:
    """Refuse ``--init`` of a model that cannot read the data's ``vocab`` ids, in one line.

    With its own (matching) tokenizer the input embedding needs a row for each id; more rows are
    fine (T5's 32,128 for its tokenizer's 32,100).  Without one, only the sizes can be compared,
    and they must be equal.
    """
    rows = model.get_input_embeddings().num_embeddings
    if not has_tokenizer and model.config.vocab_size != vocab:
        raise LmlabError(
            f"--init {init} has a vocabulary of {model.config.vocab_size} ids but the data's "
            f"tokenizer has {vocab}; {_advice(init)}"
        )
    if rows < vocab:
        raise LmlabError(
            f"--init {init}: its input embedding has {rows} rows, fewer than the {vocab} ids of its tokenizer"
        )


def _lengths(s: Setup, cfg: PretrainConfig, model: torch.nn.Module, default_len: int) -> None:
    """The input length (checked against the model's positions) and the objective's corpus length."""
    s.seq_len = int(cfg.seq_len or default_len)
    limit = max_positions(model)
    if limit is not None and s.seq_len > limit:
        raise LmlabError(f"--seq-len {s.seq_len} exceeds the model's {limit} positions")
    s.objective = make_objective(cfg.objective, s.tokenizer, s.family, cfg.objective_args)
    if s.seq_len < 1:
        raise LmlabError(f"--seq-len must be positive, got {s.seq_len}")
    s.raw_len = int(s.objective.raw_length(s.seq_len))
    if s.raw_len < 1:
        raise LmlabError(
            f"--seq-len {s.seq_len} is too short for --objective {cfg.objective} "
            f"(its rows would hold {s.raw_len} corpus tokens); raise --seq-len"
        )


def _heads(s: Setup, cfg: PretrainConfig, d: ddp.Dist) -> None:
    # What a step calls: the loss head, compiled if asked, under DDP when on several ranks (nanoGPT's
    # order: compile, then DDP).  Evaluation uses the eager head: it runs rarely, and a compiled
    # no-grad graph would cost a second compilation.
    # The loss: the fused chunked projection + cross-entropy (lmlab.train.loss) in eager mode.  Under
    # torch.compile the model's own logits path, which Inductor fuses itself; under FSDP too, whose
    # unsharding hooks sit on the model's own forward.
    s.eval_head = LossHead(s.base, s.start_id, impl="reference" if cfg.fsdp else "auto")
    compiled = torch.compile(LossHead(s.base, s.start_id, impl="reference")) if cfg.compile else None
    head = compiled if compiled is not None else s.eval_head
    s.train_head = head if cfg.fsdp else ddp.wrap_ddp(head, d)
    s.sync_target = s.base if cfg.fsdp else s.train_head


def _validation(s: Setup, cfg: PretrainConfig, log: Callable[[str], None]) -> None:
    s.val_sources = s.val_dataset = None
    # Data prepared with --val-fraction 0 has an empty val split: it is trained on, not validated on.
    val_dirs = [x for x in cfg.data if int(load_meta(x)["val"]["tokens"]) > 0]
    if not val_dirs:
        log(
            "lmlab pretrain: note: the data has no validation split (prepared with --val-fraction 0); "
            "training without a validation loss"
        )
        return
    if len(val_dirs) < len(cfg.data):
        missing = ", ".join(x for x in cfg.data if x not in val_dirs)
        log(f"lmlab pretrain: note: {missing} has no validation split; validating on the others")
    s.val_sources = Sources(val_dirs, s.raw_len, split="val")
    s.val_dataset = ObjectiveBatches(s.val_sources, s.objective, cfg.seed, shift_labels=s.family == DECODER)


def _check_targets(s: Setup, cfg: PretrainConfig) -> None:
    """Refuse a configuration that scores no target (causal at ``--seq-len 1``: a loss of 0)."""
    rows = np.array([[0, r] for r in range(min(8, s.sources.n_rows[0]))], dtype=np.int64)
    batch = s.dataset[(TRAIN_STREAM, 0, rows, 0, len(rows))]
    if int(batch["n_targets"]) == 0:
        raise LmlabError(
            f"--objective {cfg.objective} with --seq-len {s.seq_len} leaves no target to score "
            f"(0 scored tokens in {len(rows)} rows); raise --seq-len"
        )
