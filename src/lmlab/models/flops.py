"""Model FLOPs of a training step, for model-FLOPs utilisation (MFU; Chowdhery et al. 2022, App. B).

A weight matrix of ``n`` entries applied to one token costs ``2n`` FLOPs forward and ``4n``
backward, so ``6n`` per token in training (Kaplan et al. 2020).  Attention adds, per layer and
per query token, ``12 · inner · T_kv`` (QKᵀ and AV, forward and backward), counted over the full
key length as PaLM and nanoGPT do.  For T5 the encoder's matrices see the input tokens and the
decoder's the target tokens, except cross-attention's key and value projections, which see the
encoder output.  Embedding look-ups, norms and biases are left out; the output projection is in.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from lmlab.models.presets import DECODER, ENCODER, ENCODER_DECODER, model_family

if TYPE_CHECKING:
    import torch
    from torch import nn

# Dense bf16 tensor-core peaks (vendor data sheets, SXM parts), FLOP/s.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}


def _linear_weights(model: nn.Module) -> list[tuple[str, int]]:
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear | Conv1D):
            out.append((name, mod.weight.numel()))
    return out


def flops_per_step(model: nn.Module, batch_size: int, input_len: int, target_len: int | None = None) -> float:
    """Training FLOPs of one optimizer step over ``batch_size`` rows.

    ``input_len``: tokens per row the encoder (or the decoder-only model) reads; ``target_len``:
    decoder tokens per row for an encoder–decoder model.
    """
    c = model.config
    family = model_family(model)
    B, T = batch_size, input_len
    if family == ENCODER_DECODER:
        S = target_len if target_len is not None else T
        enc = dec = 0
        for name, n in _linear_weights(model):
            if name.startswith("encoder.") or name.endswith(("EncDecAttention.k", "EncDecAttention.v")):
                enc += n
            else:
                dec += n  # decoder blocks and lm_head
        inner = c.num_heads * c.d_kv
        attn_enc = 12 * c.num_layers * inner * T * T
        attn_dec = 12 * c.num_decoder_layers * inner * S * (S + T)
        return float(B * (6 * enc * T + 6 * dec * S + attn_enc + attn_dec))
    n = sum(n for _, n in _linear_weights(model))
    if family == ENCODER:
        layers, inner = c.num_hidden_layers, c.hidden_size
    else:
        assert family == DECODER
        layers, inner = c.n_layer, c.n_embd
    return float(B * T * (6 * n + 12 * layers * inner * T))


def peak_flops(device: torch.device | str) -> float | None:
    """The device's dense bf16 peak in FLOP/s, or None when unknown (CPU, an unlisted GPU).

    ``LMLAB_PEAK_TFLOPS`` overrides it (e.g. for a PCIe part or another precision).
    """
    import torch

    if os.environ.get("LMLAB_PEAK_TFLOPS"):
        return float(os.environ["LMLAB_PEAK_TFLOPS"]) * 1e12
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16.items():
        if key in name:
            return peak
    return None
