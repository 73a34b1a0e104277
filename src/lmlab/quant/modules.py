"""Drop-in quantized linear layers: :class:`Linear4bit` (NF4 / FP4, QLoRA §3) and
:class:`Linear8bit` (LLM.int8(), Dettmers et al. 2022 §3).

Both hold their quantized weight in plain buffers, so ``state_dict``, ``.to()`` and ``deepcopy``
work as for any module, and both have a pure ``forward`` (it never changes the module) that is
differentiable with respect to its input, so adapters (QLoRA) can be trained on top.

``Linear4bit.state_dict()`` uses bitsandbytes' key layout (``weight``, ``weight.absmax``,
``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map``,
``weight.quant_state.bitsandbytes__nf4``); ``Linear8bit`` stores ``weight`` (int8) and ``SCB``
(float32 row absmax, bitsandbytes' name).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.errors import LmlabError
from lmlab.quant.codebooks import codebook, dynamic_map
from lmlab.quant.formats import BLOCK_SIZES, FLOAT_DTYPES, NESTED_BLOCK_SIZE
from lmlab.quant.functional import dequantize_4bit, quantize_4bit
from lmlab.quant.int8 import int8_dequantize, int8_matmul, int8_vectorwise
from lmlab.quant.state import Quantized4bit


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The ``(out_features, in_features)`` weight of an ``nn.Linear`` or a GPT-2 style ``Conv1D``
    (which stores it transposed, ``(in, out)``, and computes ``x @ W + b``)."""
    if is_conv1d(module):
        return module.weight.detach().t()
    return module.weight.detach()


def is_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D, matched by shape of its API so transformers stays optional
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def is_linear_like(module: nn.Module) -> bool:
    return (
        type(module) is nn.Linear or isinstance(module, nn.Linear) or is_conv1d(module)
    ) and not isinstance(module, (Linear4bit, Linear8bit))


def _bias_of(module: nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return None if bias is None else bias.detach()


class Linear4bit(nn.Module):
    """``y = x @ dequantize(W).T + b`` with ``W`` stored blockwise in 4 bits.

    The weight is decoded to ``compute_dtype`` (default: the input's dtype) on every call; the
    output has the input's dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        quant_type: str = "nf4",
        block_size: int = 64,
        double_quant: bool = False,
        compute_dtype: torch.dtype | None = None,
        weight_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if quant_type not in ("nf4", "fp4"):
            raise LmlabError(f"Linear4bit: quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
        if block_size not in BLOCK_SIZES:
            raise LmlabError(f"Linear4bit: block_size must be one of {BLOCK_SIZES}, got {block_size!r}")
        if compute_dtype is not None and compute_dtype not in FLOAT_DTYPES:
            raise LmlabError(f"Linear4bit: unsupported compute_dtype {compute_dtype}")
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        n = in_features * out_features
        blocks = math.ceil(n / block_size)
        # Shells with the right shapes; from_linear or load_state_dict fills them.
        empty = Quantized4bit(
            packed=torch.zeros((n + 1) // 2, 1, dtype=torch.uint8, device=device),
            absmax=torch.zeros(blocks, dtype=torch.uint8 if double_quant else torch.float32, device=device),
            code=codebook(quant_type, device),
            quant_type=quant_type,
            block_size=block_size,
            shape=torch.Size((out_features, in_features)),
            dtype=weight_dtype,
            offset=torch.zeros((), device=device) if double_quant else None,
            nested_absmax=torch.zeros(math.ceil(blocks / NESTED_BLOCK_SIZE), device=device)
            if double_quant
            else None,
            nested_code=dynamic_map(device) if double_quant else None,
        )
        self._set_state(empty)
        # The layer is frozen (QLoRA trains adapters beside it), its bias too.
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=weight_dtype, device=device), requires_grad=False)
            if bias
            else None
        )

    # -- the quantized state lives in buffers; these two functions convert -------------------
    def _set_state(self, q: Quantized4bit) -> None:
        self.quant_type = q.quant_type
        self.block_size = q.block_size
        self.weight_dtype = q.dtype
        self.nested_block_size = q.nested_block_size
        # "weight" is persistent so that the "weight.*" keys are recognised as ours on load; the
        # rest is written and read in bitsandbytes' layout by the state-dict hooks below.
        self.register_buffer("weight", q.packed)
        self.register_buffer("weight_absmax", q.absmax, persistent=False)
        self.register_buffer("weight_quant_map", q.code, persistent=False)
        self.register_buffer("weight_offset", q.offset, persistent=False)
        self.register_buffer("weight_nested_absmax", q.nested_absmax, persistent=False)
        self.register_buffer("weight_nested_quant_map", q.nested_code, persistent=False)

    @property
    def quantized(self) -> Quantized4bit:
        return Quantized4bit(
            packed=self.weight,
            absmax=self.weight_absmax,
            code=self.weight_quant_map,
            quant_type=self.quant_type,
            block_size=self.block_size,
            shape=torch.Size((self.out_features, self.in_features)),
            dtype=self.weight_dtype,
            offset=self.weight_offset,
            nested_absmax=self.weight_nested_absmax,
            nested_code=self.weight_nested_quant_map,
            nested_block_size=self.nested_block_size,
        )

    @property
    def double_quant(self) -> bool:
        return self.weight_nested_absmax is not None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        quant_type: str = "nf4",
        block_size: int = 64,
        double_quant: bool = False,
        compute_dtype: torch.dtype | None = None,
        name: str = "weight",
    ) -> Linear4bit:
        """Quantize an ``nn.Linear`` (or GPT-2 ``Conv1D``); the source module is not modified."""
        w = linear_weight(linear)
        out_features, in_features = w.shape
        bias = _bias_of(linear)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features, layer.compute_dtype = in_features, out_features, compute_dtype
        if compute_dtype is not None and compute_dtype not in FLOAT_DTYPES:
            raise LmlabError(f"Linear4bit: unsupported compute_dtype {compute_dtype}")
        layer._set_state(quantize_4bit(w.contiguous(), quant_type, block_size, double_quant, name=name))
        layer.bias = None if bias is None else nn.Parameter(bias.clone(), requires_grad=False)
        return layer

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_4bit(self.quantized, dtype or self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or (x.dtype if x.dtype in FLOAT_DTYPES else torch.float32)
        w = dequantize_4bit(self.quantized, dtype)  # (out, in), a constant for autograd
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), w, bias).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={self.quant_type}, block_size={self.block_size}, double_quant={self.double_quant}"
        )

    @property
    def quantized_nbytes(self) -> int:
        return self.quantized.nbytes

    # -- bitsandbytes' serialized layout ---------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # weight (packed) and bias
        for key, value in self.quantized.state_dict(prefix=f"{prefix}weight").items():
            destination[key] = value if keep_vars else value.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        ours = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(f"{prefix}weight.")}
        if ours:
            if f"{prefix}weight" not in state_dict:
                # Never fall back to the empty shell: that would be an all-zero layer.
                error_msgs.append(f"{prefix}weight: the packed 4-bit weight is missing")
                return
            ours["weight"] = state_dict[f"{prefix}weight"]
            try:
                q = Quantized4bit.from_state_dict(ours, prefix="weight")
            except (LmlabError, KeyError, ValueError) as e:
                error_msgs.append(f"{prefix}weight: {e}")
                return
            if tuple(q.shape) != (self.out_features, self.in_features):
                error_msgs.append(
                    f"{prefix}weight: checkpoint shape {tuple(q.shape)} != "
                    f"({self.out_features}, {self.in_features})"
                )
                return
            device = self.weight.device
            self._set_state(q.to(device))
            # The packed bytes are now in place; let the default loader handle only the bias.
            state_dict = {k: v for k, v in state_dict.items() if k != f"{prefix}weight"}
            super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
            if f"{prefix}weight" in missing_keys:
                missing_keys.remove(f"{prefix}weight")
            # torch treats dotted keys as submodules and would call "weight.absmax" unexpected.
            unexpected_keys[:] = [k for k in unexpected_keys if not k.startswith(f"{prefix}weight.")]
        else:
            super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
            if strict:
                missing_keys.append(f"{prefix}weight.quant_state")


class _Int8Linear(torch.autograd.Function):
    """LLM.int8() forward; the input gradient uses the dequantized int8 weight (as bitsandbytes)."""

    @staticmethod
    def forward(ctx, x, w_q, w_scale, threshold):
        ctx.save_for_backward(w_q, w_scale)
        return int8_matmul(x, w_q, w_scale, threshold)

    @staticmethod
    def backward(ctx, grad_out):
        w_q, w_scale = ctx.saved_tensors
        w = int8_dequantize(w_q, w_scale).to(grad_out.dtype)  # (N, K)
        return grad_out @ w, None, None, None


class Linear8bit(nn.Module):
    """LLM.int8() linear layer: ``weight`` ``(out, in) int8`` and ``SCB`` ``(out,) float32`` buffers.

    ``threshold`` (6.0 as in the paper) picks the outlier input columns computed in floating point;
    0 disables the decomposition.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        threshold: float = 6.0,
        weight_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not threshold >= 0 or math.isinf(threshold):
            raise LmlabError(f"Linear8bit: threshold must be a finite number >= 0, got {threshold!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.threshold = float(threshold)
        self.weight_dtype = weight_dtype
        self.register_buffer(
            "weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("SCB", torch.zeros(out_features, device=device))
        # The layer is frozen (QLoRA trains adapters beside it), its bias too.
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=weight_dtype, device=device), requires_grad=False)
            if bias
            else None
        )

    @classmethod
    def from_linear(cls, linear: nn.Module, threshold: float = 6.0, name: str = "weight") -> Linear8bit:
        w = linear_weight(linear)
        if not bool(torch.isfinite(w).all()):
            from lmlab.quant.functional import _raise_not_finite

            _raise_not_finite(w, name)
        out_features, in_features = w.shape
        bias = _bias_of(linear)
        layer = cls(in_features, out_features, bias is not None, threshold, w.dtype, device=w.device)
        q, scale = int8_vectorwise(w)
        layer.weight.copy_(q)
        layer.SCB.copy_(scale)
        if bias is not None:
            layer.bias = nn.Parameter(bias.clone(), requires_grad=False)
        return layer

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return int8_dequantize(self.weight, self.SCB).to(dtype or self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _Int8Linear.apply(x, self.weight, self.SCB, self.threshold)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out

    @property
    def quantized_nbytes(self) -> int:
        return self.weight.numel() + self.SCB.numel() * self.SCB.element_size()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"threshold={self.threshold}"
        )
