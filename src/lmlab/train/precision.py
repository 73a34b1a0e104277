"""Mixed precision for training and evaluation: which one a run gets, and its autocast context.

``bf16`` is autocast to bfloat16 (weights and optimizer state stay fp32); ``fp32`` is plain fp32.
``auto`` picks bf16 where the device multiplies it natively (CUDA with bf16 support; x86 CPUs with
AVX512-BF16 or AMX, probed lazily by :func:`lmlab.runtime.cpu_native_bf16`).
"""

from __future__ import annotations

import contextlib

import torch

from lmlab import runtime


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """``bf16`` or ``fp32`` for a run on ``device``; ``auto`` (and None) picks bf16 where native."""
    if precision in (None, "auto"):
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if device.type == "cpu" and runtime.cpu_native_bf16() else "fp32"
    return precision


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
