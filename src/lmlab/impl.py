"""One switch for every fast path: ``impl="auto" | "reference" | "fast"``.

Each lmlab kernel has a plain PyTorch reference that runs everywhere and a fast path (vectorised CPU
code, oneDNN products, the fused loss, the lean T5 forward, a compiled 4-bit loop, Triton on CUDA
later). Every function or module that has both takes the same argument:

* ``"auto"`` (the default): the fast path where it applies to these inputs, else the reference;
* ``"reference"``: always the reference (what tests hold the fast path to);
* ``"fast"``: the fast path, and a one-line :class:`LmlabError` where it does not apply, so that a
  benchmark or a test never times or checks the reference by mistake.

The choice is made per call from the inputs (device, dtype, shape); nothing is probed at import and no
module global or environment variable switches it.
"""

from __future__ import annotations

from typing import Literal

from lmlab.errors import LmlabError

Impl = Literal["auto", "reference", "fast"]
IMPLS: tuple[str, ...] = ("auto", "reference", "fast")


def check_impl(impl: str, what: str = "impl") -> str:
    """``impl`` if it is one of :data:`IMPLS`, else a one-line error naming ``what``."""
    if impl not in IMPLS:
        raise LmlabError(f"{what}: impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    return impl


def use_fast(impl: str, applies: bool, what: str, why_not: str = "") -> bool:
    """Whether to take the fast path: ``applies`` says if it can run on these inputs.

    ``impl="fast"`` where it cannot is an error naming ``what`` (and ``why_not`` when given).
    """
    check_impl(impl, what)
    if impl == "reference":
        return False
    if impl == "fast" and not applies:
        raise LmlabError(f"{what}: impl='fast' does not apply here" + (f" ({why_not})" if why_not else ""))
    return applies
