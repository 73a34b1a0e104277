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
from lmlab.impl import check_impl
from lmlab.quant import ops
from lmlab.quant.blockwise import dequantize_4bit_reference
from lmlab.quant.codebooks import codebook, dynamic_map
from lmlab.quant.formats import NESTED_BLOCK_SIZE, check_block_size, check_float_dtype, check_quant_type
from lmlab.quant.functional import (
    _raise_not_finite,
    decoded_absmax,
    dequantize_4bit,
    quantize_4bit,
    use_kernel,
)
from lmlab.quant.int8 import Int8LinearReference, int8_dequantize, quantize_int8_weight
from lmlab.quant.state import FLOAT_DTYPES, Quantized4bit


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


class Linear4bit(nn.Linear):
    """``y = x @ dequantize(W).T + b`` with ``W`` stored blockwise in 4 bits.

    The weight is decoded to ``compute_dtype`` (default: the input's dtype) on every call; the
    output has the input's dtype. ``quant_type`` is any registered format
    (:data:`lmlab.quant.formats.FORMATS`). The forward is one ``lmlab::linear_4bit`` op
    (``impl="reference"``: the reference decode and ``F.linear``). This constructor is the only one:
    :meth:`from_linear` and loading build the layer through it.
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
        impl: str = "auto",
    ) -> None:
        # An nn.Linear to the libraries that look for one (peft's "all-linear", as bitsandbytes'
        # layers are), but not nn.Linear's __init__: the weight is a quantized buffer.
        nn.Module.__init__(self)
        self.conv1d = False  # from_linear records a GPT-2 Conv1D, so merging/dequantizing can give it back
        check_quant_type(quant_type, "Linear4bit")
        check_block_size(block_size, "Linear4bit")
        if compute_dtype is not None:
            check_float_dtype(compute_dtype, "Linear4bit", "compute_dtype")
        check_float_dtype(weight_dtype, "Linear4bit", "weight_dtype")
        self.impl = check_impl(impl, "Linear4bit")
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
        impl: str = "auto",
    ) -> Linear4bit:
        """Quantize an ``nn.Linear`` (or GPT-2 ``Conv1D``); the source module is not modified."""
        w = linear_weight(linear)
        out_features, in_features = w.shape
        bias = _bias_of(linear)
        if w.dtype not in FLOAT_DTYPES:
            raise LmlabError(f"{name}: 4-bit quantization needs float32, float16 or bfloat16, got {w.dtype}")
        layer = cls(
            in_features,
            out_features,
            bias is not None,
            quant_type,
            block_size,
            double_quant,
            compute_dtype,
            weight_dtype=w.dtype,
            device=w.device,
            impl=impl,
        )
        q = quantize_4bit(w.contiguous(), quant_type, block_size, double_quant, name=name, impl=impl)
        layer._set_state(q)
        layer.conv1d = is_conv1d(linear)
        if bias is not None:
            layer.bias = nn.Parameter(bias.clone(), requires_grad=False)
        return layer

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_4bit(self.quantized, dtype or self.weight_dtype, impl=self.impl)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or (x.dtype if x.dtype in FLOAT_DTYPES else torch.float32)
        bias = None if self.bias is None else self.bias.to(dtype)
        shape = [self.out_features, self.in_features]
        # The scales as stored: a device kernel decodes double-quantized ones inside.
        nested = (
            self.weight_offset,
            self.weight_nested_absmax,
            self.weight_nested_quant_map,
            self.nested_block_size,
        )
        if use_kernel(self.impl, "dequantize_4bit", self.weight.device, "Linear4bit"):
            y = ops.linear_4bit(
                x.to(dtype),
                self.weight,
                self.weight_absmax,
                self.quant_type,
                self.block_size,
                shape,
                bias,
                *nested,
            )
        else:  # (out, in), a constant for autograd
            absmax = decoded_absmax(self.weight_absmax, *nested)
            w = dequantize_4bit_reference(self.weight, absmax, self.quant_type, self.block_size, shape, dtype)
            y = F.linear(x.to(dtype), w, bias)
        return y.to(x.dtype)

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


class Linear8bit(nn.Linear):
    """LLM.int8() linear layer: ``weight`` ``(out, in) int8`` and ``SCB`` ``(out,) float32`` buffers.

    ``threshold`` (6.0 as in the paper) picks the outlier input columns computed in floating point;
    0 disables the decomposition. The forward is one ``lmlab::int8_linear`` op (``impl="reference"``:
    the reference with the same input gradient). This constructor is the only one:
    :meth:`from_linear` and loading build the layer through it.

    Interchangeable with bitsandbytes' ``Linear8bitLt`` (``has_fp16_weights=False``):
    :meth:`from_linear` rounds the weight to float16 first as bitsandbytes' ``Int8Params`` does
    (:func:`lmlab.quant.int8.quantize_int8_weight`), so ``weight`` and ``SCB`` are byte-identical to
    its; the state dict carries ``weight``, ``bias``, ``SCB`` and ``weight_format`` (a uint8 scalar,
    0 = row-major, bitsandbytes' only format since 0.45), and loads with or without
    ``weight_format`` (older lmlab files lack it), in both directions with ``strict=True``.
    """

    # bitsandbytes.utils.LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING; only "row" is written since bitsandbytes 0.45
    WEIGHT_FORMATS = {"row": 0, "col32": 1, "col_turing": 2, "col_ampere": 3}

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        threshold: float = 6.0,
        weight_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        impl: str = "auto",
    ) -> None:
        # An nn.Linear to the libraries that look for one (peft's "all-linear", as bitsandbytes'
        # layers are), but not nn.Linear's __init__: the weight is a quantized buffer.
        nn.Module.__init__(self)
        self.conv1d = False  # from_linear records a GPT-2 Conv1D, so merging/dequantizing can give it back
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise LmlabError(f"Linear8bit: threshold must be a number, got {threshold!r}")
        if not threshold >= 0 or math.isinf(threshold):
            raise LmlabError(f"Linear8bit: threshold must be a finite number >= 0, got {threshold!r}")
        self.impl = check_impl(impl, "Linear8bit")
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
    def from_linear(
        cls, linear: nn.Module, threshold: float = 6.0, name: str = "weight", impl: str = "auto"
    ) -> Linear8bit:
        w = linear_weight(linear)
        if not bool(torch.isfinite(w).all()):
            _raise_not_finite(w, name)
        out_features, in_features = w.shape
        bias = _bias_of(linear)
        layer = cls(
            in_features, out_features, bias is not None, threshold, w.dtype, device=w.device, impl=impl
        )
        q, scale = quantize_int8_weight(w)
        layer.weight.copy_(q)
        layer.SCB.copy_(scale)
        layer.conv1d = is_conv1d(linear)
        if bias is not None:
            layer.bias = nn.Parameter(bias.clone(), requires_grad=False)
        return layer

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return int8_dequantize(self.weight, self.SCB).to(dtype or self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            raise LmlabError(f"Linear8bit: expected a floating-point input, got {x.dtype}")
        # The buffers were checked when built or loaded; int8_matmul's per-call checks would sync.
        if use_kernel(self.impl, "int8_mm", x.device, "Linear8bit"):
            out = ops.int8_linear(x, self.weight, self.SCB, self.threshold)
        else:
            out = Int8LinearReference.apply(x, self.weight, self.SCB, self.threshold)
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

    # -- bitsandbytes' serialized layout ---------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # bias, weight, SCB
        destination[f"{prefix}weight_format"] = torch.tensor(
            self.WEIGHT_FORMATS["row"], dtype=torch.uint8, device=self.SCB.device
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        key = f"{prefix}weight_format"
        if key in state_dict:
            self._check_weight_format(key, state_dict[key])
        weight = state_dict.get(f"{prefix}weight")
        if isinstance(weight, torch.Tensor) and weight.dtype != torch.int8:
            # copy_ would cast a float weight into the int8 buffer: a silently garbage layer
            raise LmlabError(
                f"{prefix}weight is {weight.dtype}, a Linear8bit loads int8 codes and SCB "
                "(quantize a float layer with Linear8bit.from_linear or quantize_)"
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if key in unexpected_keys:
            unexpected_keys.remove(key)

    @classmethod
    def _check_weight_format(cls, key: str, value: object) -> None:
        """A stored ``weight_format`` (tensor, int or name) that is not row-major is a one-line error."""
        if isinstance(value, torch.Tensor):
            value = value.item() if value.numel() == 1 else value.tolist()
        if value in ("row", 0):
            return
        names = {v: k for k, v in cls.WEIGHT_FORMATS.items()}
        name = names.get(value, value) if isinstance(value, int) else value
        raise LmlabError(
            f"{key}: weight format {name!r} is not supported; Linear8bit loads row-major int8 weights "
            "(weight_format 0, 'row'), as bitsandbytes writes them"
        )
