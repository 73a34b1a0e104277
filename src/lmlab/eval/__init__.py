"""Evaluation of trained, untrained and quantized models (``lmlab.eval``).

:func:`evaluate` is a model's validation loss and perplexity under a pre-training objective
(:mod:`lmlab.eval.loss`); the training loop validates with the same :class:`LossHead` and
:func:`eval_pass`, so both measure the same thing on the same batches.  Importing this package is
cheap; torch loads on first use of these names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmlab.eval.loss import LossHead, eval_pass, evaluate

__all__ = ["LossHead", "eval_pass", "evaluate"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from lmlab.eval import loss

        return getattr(loss, name)
    raise AttributeError(f"module 'lmlab.eval' has no attribute {name!r}")
