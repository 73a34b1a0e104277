"""Pre-training (``lmlab pretrain``): :func:`pretrain` a :class:`PretrainConfig`; :func:`evaluate`
(a model's validation loss under an objective) is :func:`lmlab.eval.evaluate`, re-exported.

Modules: ``config`` (the settings), ``setup`` (model, objective, data, heads, optimizer), ``loop``
(``pretrain`` and ``train_step``), ``state`` (the run directory, resume checks), ``checkpoint``,
``metrics``, ``precision``, ``data`` (the batch stream), ``loss``, ``optim``, ``distributed``.

Importing this package is cheap; torch and transformers load on first use of these names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmlab.train.config import PretrainConfig

if TYPE_CHECKING:
    from lmlab.eval.loss import evaluate
    from lmlab.train.loop import PretrainResult, pretrain

__all__ = ["PretrainConfig", "PretrainResult", "evaluate", "pretrain"]


def __getattr__(name: str) -> Any:
    if name == "evaluate":  # evaluation lives in lmlab.eval; re-exported here as before
        from lmlab.eval import loss

        return loss.evaluate
    if name in ("PretrainResult", "pretrain"):
        from lmlab.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'lmlab.train' has no attribute {name!r}")
