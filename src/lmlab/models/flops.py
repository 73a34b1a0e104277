"""Model FLOPs of a training step, for model-FLOPs utilisation (MFU; Chowdhery et al. 2022, App. B).

A weight matrix of ``n`` entries applied to one token costs ``2n`` FLOPs forward and ``4n``
backward, so ``6n`` per token in training (Kaplan et al. 2020).  Attention adds, per layer and
per query token, ``12 · inner · T_kv`` (QKᵀ and AV, forward and backward), counted over the full
key length as PaLM and nanoGPT do.  For T5 the encoder's matrices see the input tokens and the
decoder's the target tokens, except cross-attention's key and value projections, which see the
encoder output.  Embedding look-ups, norms and biases are left out; the output projection is in.
Each family counts its own (:meth:`lmlab.models.families.base.Family.flops_per_step`); this module
holds the shared parts and the device peaks.

What this counts is every matrix product of one forward and backward pass and nothing else, which
``tests/models/test_flops.py`` checks against ``torch.utils.flop_counter.FlopCounterMode`` on each
family's tiny model: with the CPU attention kernel counted by torch's own SDPA formulas, the two
differ by exactly the QKᵀ that SDPA's backward recomputes (half its forward count; hardware
FLOPs that MFU leaves out, Chowdhery et al. 2022 App. B).  ``FlopCounterMode`` as it comes has
no formula for the CPU kernel (``_scaled_dot_product_flash_attention_for_cpu``) and misses those
layers' attention altogether, hence lmlab's 2–7 % above it there.  Attention is counted over the
full key length even where it is causal (as PaLM, nanoGPT and ``FlopCounterMode`` do); softmax,
norms, biases, the embedding gathers and the loss are not products and are not counted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

# Dense bf16 tensor-core peaks (vendor data sheets, SXM parts), FLOP/s.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}


def linear_weights(model: nn.Module) -> list[tuple[str, int]]:
    """(module name, weight entries) of every ``nn.Linear`` and GPT-2 ``Conv1D`` in ``model``; a tied
    output layer counts once, as its own module."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear | Conv1D):
            out.append(
                (
                    name,
                    mod.in_features * mod.out_features if isinstance(mod, nn.Linear) else mod.weight.numel(),
                )
            )
    return out


def flops_per_step(model: nn.Module, batch_size: int, input_len: int, target_len: int | None = None) -> float:
    """Training FLOPs of one optimizer step over ``batch_size`` rows, as the model's family counts them.

    ``input_len``: tokens per row the encoder (or the decoder-only model) reads; ``target_len``:
    decoder tokens per row for an encoder–decoder model.
    """
    from lmlab.models.families import family_of

    return family_of(model).flops_per_step(model, batch_size, input_len, target_len)


def peak_flops(device: torch.device | str, override_tflops: float | None = None) -> float | None:
    """The device's dense bf16 peak in FLOP/s, or None when unknown (CPU, an unlisted GPU).

    ``override_tflops`` (TFLOP/s) replaces the table, e.g. for a PCIe part or another precision;
    the CLI takes it from ``LMLAB_PEAK_TFLOPS``.
    """
    import torch

    if override_tflops is not None:
        return float(override_tflops) * 1e12
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16.items():
        if key in name:
            return peak
    return None
