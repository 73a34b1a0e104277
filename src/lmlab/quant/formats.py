"""The 4-bit formats lmlab knows, registered once: every other module reads this table.

An entry gives the format's name, its bits per code, whether bitsandbytes stores it (its
``quant_state`` names only ``nf4`` and ``fp4``; lmlab writes ``int4`` in the same layout and reads
it back, bitsandbytes cannot) and how its 16 values are built (see :mod:`lmlab.quant.codebooks` for
the constructions). :func:`lmlab.quant.codebooks.codebook`, the 4-bit functions and ops,
``Linear4bit``, the quantization configs, serialization and the ``lmlab quantize --method`` choices
all take their list from :data:`FORMATS`, and their checks from :func:`check_quant_type` and
:func:`check_block_size`. Adding a 4-bit format is one entry here (and a config class in
:mod:`lmlab.quant.api`).

This module imports no torch at import time, so the CLI can build its choices from it cheaply.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lmlab.errors import LmlabError

if TYPE_CHECKING:
    import torch

BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCK_SIZE = 256  # double quantization's block of scales (QLoRA §3)
FLOAT_DTYPE_NAMES = ("float32", "float16", "bfloat16")

NF4_OFFSET = 0.9677083  # = 929/960, QLoRA's outermost quantile (bitsandbytes' default)


# The builders import torch when first called (once per process: the result is cached per device).
def _nf4_values() -> torch.Tensor:
    import torch

    # Follow the construction step by step, including where it rounds to float32, so the table
    # equals the published one exactly: quantile points in float32 (torch.linspace), the inverse
    # normal CDF in float64, then float32 values divided by their maximum in float32.
    pos = torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 9)[:-1].double())  # 8 positive
    neg = -torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 8)[:-1].double())  # 7 negative
    values = torch.cat([pos.float(), torch.zeros(1), neg.float()]).sort().values
    return values / values.max()


def _fp4_values() -> torch.Tensor:
    import torch

    # Bit pattern 0b0EEM: exponent field E (bias 2), mantissa bit M; E == 0 is subnormal.
    # This reproduces bitsandbytes' table [0, 0.0625, 8, 12, 4, 6, 2, 3] / 12 (signed copy after).
    # Its exponent field is laid out so that patterns 2..7 read 8, 12, 4, 6, 2, 3: exponent
    # values (2, 2, 1, 1, 0, 0) for E = 1..3 in reverse, which we simply list.
    magnitudes = torch.tensor([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0])
    # "+ 0.0" turns -0.0 into +0.0: the reference table's pattern 0b1000 is a plain zero.
    values = torch.cat([magnitudes, -magnitudes + 0.0])
    return values / values.abs().max()


def _int4_values() -> torch.Tensor:
    import torch

    magnitudes = torch.arange(7, -1, -1, dtype=torch.float32)  # 7..0, bitsandbytes' int4 order
    values = torch.cat([magnitudes, -magnitudes + 0.0])
    return values / 7.0


@dataclass(frozen=True)
class Format:
    """One 4-bit format: ``values()`` builds its ``(2**bits,) float32`` codebook, indexed by the code."""

    name: str
    bits: int
    bitsandbytes: bool
    values: Callable[[], torch.Tensor]
    summary: str


FORMATS: dict[str, Format] = {
    "nf4": Format("nf4", 4, True, _nf4_values, "4-bit NormalFloat (QLoRA)"),
    "fp4": Format(
        "fp4", 4, True, _fp4_values, "bitsandbytes' 4-bit float (1 sign, 2 exponent, 1 mantissa bit)"
    ),
    "int4": Format("int4", 4, False, _int4_values, "uniform symmetric 4-bit integers, k/7 (lmlab's own)"),
}
QUANT_TYPES: tuple[str, ...] = tuple(FORMATS)
INT8_METHOD = "int8"  # LLM.int8(): not blockwise, no codebook
METHODS: tuple[str, ...] = (*QUANT_TYPES, INT8_METHOD)  # what lmlab quantize --method accepts


def check_quant_type(quant_type: object, what: str) -> str:
    """``quant_type`` if it names a registered format, else a one-line error naming ``what``."""
    if not isinstance(quant_type, str) or quant_type not in FORMATS:
        raise LmlabError(f"{what}: quant_type must be one of {', '.join(QUANT_TYPES)}, got {quant_type!r}")
    return quant_type


def check_block_size(block_size: object, what: str) -> int:
    """``block_size`` if it is one of :data:`BLOCK_SIZES`, else a one-line error naming ``what``."""
    if isinstance(block_size, bool) or block_size not in BLOCK_SIZES:
        raise LmlabError(
            f"{what}: block_size must be one of {', '.join(map(str, BLOCK_SIZES))}, got {block_size!r}"
        )
    return block_size


def check_float_dtype(dtype: object, what: str, field: str = "dtype") -> None:
    """A one-line error naming ``what`` unless ``dtype`` is torch.float32, float16 or bfloat16."""
    if str(dtype).removeprefix("torch.") not in FLOAT_DTYPE_NAMES or not str(dtype).startswith("torch."):
        raise LmlabError(f"{what}: {field} must be float32, float16 or bfloat16, got {dtype}")
