"""The CUDA kernels of lmlab's quantization ops (registered in :mod:`lmlab.quant.ops`).

Today one: ``lmlab::int8_mm`` through ``torch._int_mm`` (int8 x int8 -> int32 on tensor cores).
This is where the Triton kernels of ``lmlab::quantize_4bit`` / ``lmlab::dequantize_4bit`` /
``lmlab::linear_4bit`` go: a function here with the op's signature, one ``register_kernel(...,
"cuda")`` line in :mod:`lmlab.quant.ops`, and a test in ``tests/quant/kernels/test_cuda.py`` that
holds it to the reference. Nothing here runs at import.
"""

from __future__ import annotations

import torch

from lmlab.quant.int8 import int_mm_reference


def int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a (M, K) int8 @ b (N, K).T -> (M, N) int32``, exact."""
    try:
        return torch._int_mm(a, b.t())
    except RuntimeError:  # the kernel's shape constraints (M > 16, K and N multiples of 8)
        return int_mm_reference(a, b)
