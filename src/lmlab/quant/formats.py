"""The 4-bit formats lmlab knows and the sizes they come in: one registry that every other module reads."""

from __future__ import annotations

import torch

BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QUANT_TYPES = ("nf4", "fp4", "int4")  # int4 is lmlab's own; bitsandbytes stores nf4 and fp4
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NESTED_BLOCK_SIZE = 256
