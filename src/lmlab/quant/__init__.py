"""Quantization: LLM.int8() and 4-bit NormalFloat / FP4 as drop-in layers for any PyTorch model.

Papers: Dettmers et al. 2022, "LLM.int8(): 8-bit Matrix Multiplication for Transformers at
Scale" (§3, vector-wise quantization and mixed-precision decomposition); Dettmers et al. 2023,
"QLoRA: Efficient Finetuning of Quantized LLMs" (§3, 4-bit NormalFloat, double quantization).

    from lmlab.quant import quantize_, NF4Config, save_quantized, load_quantized
    report = quantize_(model, NF4Config(double_quant=True))   # in place, returns a memory report
    save_quantized(model, "out/")                              # safetensors, bitsandbytes' keys
    model = load_quantized("out/")                              # no re-quantization
    model = load_quantized("bnb_dir/")   # also what transformers + bitsandbytes save_pretrained wrote
    dequantize_(model)                   # back to float layers (transformers' model.dequantize())

``save_quantized`` writes transformers' ``quantization_config`` into ``config.json``, so
``AutoModelForCausalLM.from_pretrained("out/")`` loads NF4 / FP4 / int8 outputs with bitsandbytes.

Layout: ``formats`` (the registry of 4-bit formats and block sizes, read by everything below),
``codebooks`` (NF4 / FP4 / int4 tables, quantile and dynamic maps, the kernels' lookup tables),
``blockwise`` (the 4-bit references and double quantization), ``int8`` (LLM.int8() math and
reference), ``ops`` (the ``torch.library`` op contract: ``lmlab::quantize_4bit``,
``dequantize_4bit``, ``linear_4bit``, ``int8_mm``, ``int8_linear``), ``kernels/`` (the device
kernels registered under the ops: ``cpu``, ``native`` (compiled C), ``cuda``), ``functional``
(the public verbs, ``impl="auto"|"reference"|"fast"``), ``state`` (``Quantized4bit`` and its
state dict), ``modules`` (``Linear4bit``, ``Linear8bit``), ``api`` (configs, ``quantize_``),
``serialization``, ``hf`` (``quantization_config`` <-> lmlab configs), ``cli``.
The names below are imported on first use, so that ``lmlab --help`` and ``lmlab.quant.cli`` do
not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_EXPORTS = {
    "FP4Config": "lmlab.quant.api",
    "FourBitConfig": "lmlab.quant.api",
    "Int4Config": "lmlab.quant.api",
    "Int8Config": "lmlab.quant.api",
    "NF4Config": "lmlab.quant.api",
    "QuantReport": "lmlab.quant.api",
    "quantize_": "lmlab.quant.api",
    "dequantize_": "lmlab.quant.api",
    "bnb_kwargs": "lmlab.quant.hf",
    "Quantized4bit": "lmlab.quant.state",
    "dequantize_4bit": "lmlab.quant.functional",
    "quantize_4bit": "lmlab.quant.functional",
    "codebook": "lmlab.quant.codebooks",
    "dynamic_map": "lmlab.quant.codebooks",
    "quantile_codebook": "lmlab.quant.codebooks",
    "int8_matmul": "lmlab.quant.functional",
    "int8_vectorwise": "lmlab.quant.int8",
    "Linear4bit": "lmlab.quant.modules",
    "Linear8bit": "lmlab.quant.modules",
    "load_quantized": "lmlab.quant.serialization",
    "save_quantized": "lmlab.quant.serialization",
    "quantize_pretrained": "lmlab.quant.streaming",
}

__all__ = [
    "FP4Config",
    "FourBitConfig",
    "Int4Config",
    "Int8Config",
    "Linear4bit",
    "Linear8bit",
    "NF4Config",
    "QuantReport",
    "Quantized4bit",
    "bnb_kwargs",
    "codebook",
    "dequantize_",
    "dequantize_4bit",
    "dynamic_map",
    "int8_matmul",
    "int8_vectorwise",
    "load_quantized",
    "quantile_codebook",
    "quantize_",
    "quantize_4bit",
    "quantize_pretrained",
    "save_quantized",
]

if TYPE_CHECKING:
    from lmlab.quant.api import (
        FourBitConfig,
        FP4Config,
        Int4Config,
        Int8Config,
        NF4Config,
        QuantReport,
        dequantize_,
        quantize_,
    )
    from lmlab.quant.codebooks import codebook, dynamic_map, quantile_codebook
    from lmlab.quant.functional import dequantize_4bit, int8_matmul, quantize_4bit
    from lmlab.quant.hf import bnb_kwargs
    from lmlab.quant.int8 import int8_vectorwise
    from lmlab.quant.modules import Linear4bit, Linear8bit
    from lmlab.quant.serialization import load_quantized, save_quantized
    from lmlab.quant.state import Quantized4bit
    from lmlab.quant.streaming import quantize_pretrained


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lmlab.quant' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
