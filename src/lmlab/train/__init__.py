"""The pre-training loop (``lmlab pretrain``): :func:`pretrain` a :class:`PretrainConfig`, and
:func:`evaluate` a model's validation loss under an objective.

Importing this package is cheap; torch and transformers load on first use of these names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmlab.train.config import PretrainConfig

if TYPE_CHECKING:
    from lmlab.train.loop import PretrainResult, evaluate, pretrain

__all__ = ["PretrainConfig", "PretrainResult", "evaluate", "pretrain"]


def __getattr__(name: str) -> Any:
    if name in ("PretrainResult", "evaluate", "pretrain"):
        from lmlab.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'lmlab.train' has no attribute {name!r}")
