"""Evaluation under a pre-training objective: a model's validation loss and perplexity.

:func:`evaluate` measures a model (trained, untrained or quantized) on the ``val`` split of prepared
data, on batches fixed by a seed; :class:`LossHead` and :func:`eval_pass` are what the training loop
validates with, so both give the same number on the same batches.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from lmlab.models import DECODER, max_positions
from lmlab.models.families import family_of
from lmlab.objectives.registry import make_objective
from lmlab.train import distributed as ddp
from lmlab.train.data import ObjectiveBatches, Sources, check_same_tokenizer, make_loader, to_device, val_keys
from lmlab.train.loss import loss_sum
from lmlab.train.precision import autocast, resolve_precision
from lmlab.train.state import model_settings


class LossHead(torch.nn.Module):
    """``model`` plus its loss, as one module: ``head(batch)`` → :func:`lmlab.train.loss.loss_sum`.

    ``impl="auto"``: lmlab's chunked projection + cross-entropy on the model's body (eager runs).  A
    compiled head takes ``impl="reference"``: compiling the model and its plain loss together lets
    ``torch.compile`` fuse the fp32 upcast and the log-softmax into the projection's consumer.
    """

    def __init__(self, model: torch.nn.Module, start_id: int = 0, impl: str = "auto"):
        super().__init__()
        self.model, self.start_id, self.impl = model, start_id, impl

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return loss_sum(self.model, batch, start_id=self.start_id, impl=self.impl)


@torch.no_grad()
def eval_pass(head: LossHead, loader, device: torch.device, d: ddp.Dist, precision: str) -> tuple[float, int]:
    was_training = head.training
    head.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    try:
        for batch in loader:
            batch = to_device(batch, device)
            n = batch.pop("n_targets")
            batch.pop("n_raw")
            with autocast(device, precision):
                s = head(batch)
            total += torch.stack([s.double(), n.double()])
    finally:
        head.train(was_training)
    ddp.all_reduce_sum(total, d)
    return float(total[0]), int(total[1])


def evaluate(
    model: torch.nn.Module,
    data_dir: str | os.PathLike | list,
    objective: Any,
    *,
    batch_size: int = 32,
    seq_len: int | None = None,
    max_batches: int = 20,
    seed: int = 0,
    device: str | torch.device | None = None,
    workers: int = 0,
    precision: str | None = None,
) -> dict[str, float]:
    """Validation loss of ``model`` on the ``val`` split under ``objective`` (a name or an object).

    ``precision``: ``bf16`` (autocast) or ``fp32``; by default bf16 on CUDA and fp32 on CPU.
    ``seq_len``: by default the length the model was trained at (a run's ``final/`` records it in
    ``lmlab_training.json``), else ``min(512, the model's positions)``.

    Returns ``loss`` (mean cross-entropy per scored target token, nats), ``perplexity``
    (``exp(loss)``: the perplexity of the objective's targets, e.g. the spans for span
    corruption), ``tokens`` (scored targets) and ``rows``.  The rows and the noise are fixed by
    ``seed``, so an untrained and a trained model are measured on the very same batches.
    """
    from lmlab.data import load_tokenizer

    dirs = [str(x) for x in data_dir] if isinstance(data_dir, list | tuple) else [str(data_dir)]
    check_same_tokenizer(dirs)
    family = family_of(model).kind
    if isinstance(objective, str):
        objective = make_objective(objective, load_tokenizer(dirs[0]), family)
    trained = model_settings(getattr(model, "name_or_path", None), model.config).get("seq_len")
    seq_len = seq_len or trained or min(512, max_positions(model) or 512)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    sources = Sources(dirs, int(objective.raw_length(seq_len)), split="val")
    dataset = ObjectiveBatches(sources, objective, seed, shift_labels=family == DECODER)
    keys = val_keys(sources.n_rows, batch_size, max_batches, 0, 1)
    loader = make_loader(dataset, keys, workers, pin_memory=False)
    model.to(dev)
    start_id = getattr(model.config, "decoder_start_token_id", 0) or 0
    # fp32 on CPU unless asked: quantized and float models are then compared on the same arithmetic.
    prec = resolve_precision(precision or ("auto" if dev.type == "cuda" else "fp32"), dev)
    # The head takes the model's mode, so eval_pass gives the model back in the mode it came in.
    head = LossHead(model, start_id).train(model.training)
    s, n = eval_pass(head, loader, dev, ddp.Dist(device=dev), prec)
    loss = s / max(n, 1)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "tokens": n,
        "rows": sum(len(k[2]) for k in keys),
    }
