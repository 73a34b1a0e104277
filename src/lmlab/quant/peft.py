"""QLoRA through peft on lmlab's quantized layers: LoRA adapters beside ``Linear4bit`` / ``Linear8bit``.

QLoRA (Dettmers et al. 2023, §3 "QLoRA Finetuning"): the base weights stay frozen in 4 bits (or
LLM.int8()'s 8 bits), low-rank adapters ``B A`` (Hu et al. 2021, "LoRA", §4.1) are trained in 16/32
bits beside them, ``y = base(x) + B A dropout(x) · alpha / r``. peft ships this layer for
bitsandbytes' modules (``peft/tuners/lora/bnb.py``); this module is the same layer for lmlab's,
found by peft through its custom-module registration (``LoraConfig._register_custom_module``,
peft's "custom models" guide), which is the one documented way peft offers to adapt a layer type
it does not know:

    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
    from lmlab.quant import NF4Config, quantize_
    from lmlab.quant.peft import register_lora_layers

    quantize_(model, NF4Config(double_quant=True, compute_dtype=torch.bfloat16))
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    config = register_lora_layers(LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    model = get_peft_model(model, config)
    ...                                     # train; model.save_pretrained("adapter/")
    config = register_lora_layers(LoraConfig.from_pretrained("adapter/"))
    model = PeftModel.from_pretrained(base, "adapter/", config=config)

peft does not save the registration in ``adapter_config.json`` (it is not a config field), so a
config read back from disk is registered again before loading; the adapter files themselves are
peft's own (``adapter_model.safetensors``, ``base_model.model.<module>.lora_A.weight`` ...), the
same keys as for a bitsandbytes model, and load onto either.

``merge`` / ``merge_and_unload`` dequantize and merge: the merged layer is a float ``nn.Linear``
(``Conv1D`` where the quantized layer says it was one) holding ``dequantize(W) + B A · alpha / r``,
the very function the adapted model computes, and ``unmerge`` puts the quantized layer back bit for
bit. (peft's bitsandbytes layers re-quantize the sum instead; on a tiny NF4 GPT-2 that rounding
undid most of the adapters' effect on the logits.) Quantize the merged model again with
``quantize_`` if it should stay small. LoRA variants and initialisations that read or rewrite the
base weight itself (DoRA, PiSSA, OLoRA, LoftQ, ...) are refused in one line.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
from torch import nn

from lmlab.errors import LmlabError
from lmlab.quant.modules import Linear4bit, Linear8bit

try:
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import check_adapters_to_merge
except ImportError as e:  # pragma: no cover - exercised only without peft
    raise ImportError(f"lmlab.quant.peft needs peft (pip install peft): {e}") from None

__all__ = ["LoraLinear4bit", "LoraLinear8bit", "LORA_LAYERS", "register_lora_layers"]

# LoRA initialisations that only draw random matrices; the others read the base weight (PiSSA's
# SVD, OLoRA's QR, LoftQ's alternating quantization, ...), which is packed codes here.
_PLAIN_INITS = (True, False, "gaussian")


class _LoraQuantLinear(nn.Module, LoraLayer):
    """LoRA beside a frozen lmlab quantized linear layer (``base_layer``): one class per base type.

    The adapters get the base layer's device and, for a 4-bit layer with a ``compute_dtype``, that
    dtype (peft's rule for bitsandbytes' ``Linear4bit``); the input is cast to the adapters' dtype
    and the adapter output back to the base output's dtype unless autocast is on.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: LoraConfig,
        r: int = 0,
        lora_alpha: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False  # lmlab layers store (out, in), like nn.Linear
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs: Any) -> None:
        try:
            return super().resolve_lora_variant(config=config, **kwargs)  # None: plain LoRA
        except ValueError:
            requested = [
                f.name
                for f in dataclasses.fields(config)
                if f.metadata.get("is_lora_variant") and getattr(config, f.name)
            ]
            raise LmlabError(
                f"{type(self).__name__}: LoRA variants that read the base weight "
                f"({', '.join(requested) or 'this one'}) are not supported on lmlab's quantized layers; "
                "use plain LoRA"
            ) from None

    def update_layer(
        self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs: Any
    ) -> None:
        init = config.init_lora_weights
        if init not in _PLAIN_INITS:
            raise LmlabError(
                f"{type(self).__name__}: init_lora_weights={init!r} reads the base weight, which is "
                "quantized here; use True, False or 'gaussian'"
            )
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    # -- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        if self.merged:  # a float layer: the input in its dtype, the output in the input's
            w = self.base_layer.weight
            return self.base_layer(x.to(w.dtype), *args, **kwargs).to(x.dtype)
        result = self.base_layer(x, *args, **kwargs)  # a fresh tensor: lmlab's forward is pure
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            convert = not torch.is_autocast_enabled(x.device.type)
            h = self._cast_input_dtype(x, lora_A.weight.dtype) if convert else x
            out = lora_B(lora_A(self.lora_dropout[name](h))) * self.scaling[name]
            result = result + (out.to(result.dtype) if convert else out)
        return result

    # -- merging: dequantize, add the delta, keep it in floating point --------------------------
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``B A · scaling``, ``(out, in)``, in float32 (the merge works in float32)."""
        a = self.lora_A[adapter].weight.float()
        b = self.lora_B[adapter].weight.float()
        return (b @ a) * self.scaling[adapter]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Merge the active (or the named) adapters: the base layer becomes a float layer holding
        ``dequantize(W) + B A · scaling`` (in the dtype ``W`` was quantized from), exactly the
        function the adapted model computes; :meth:`unmerge` puts the quantized layer back as it was.
        """
        names = [n for n in check_adapters_to_merge(self, adapter_names) if n in self.lora_A]
        if not names:
            return
        base = self.get_base_layer()
        quantized = self.__dict__.get("_quantized_base", base)
        conv1d = bool(getattr(quantized, "conv1d", False))  # a GPT-2 Conv1D before quantization
        if base is quantized:
            weight = base.dequantized_weight(torch.float32)  # (out, in)
        else:  # merged before: the float layer of that merge
            weight = (base.weight.t() if conv1d else base.weight).detach().float()
        bias = None if base.bias is None else base.bias.detach().float()
        for name in names:
            weight = weight + self.get_delta_weight(name)
            if self.lora_bias[name]:
                if bias is None:
                    raise LmlabError(
                        f"{type(self).__name__}: cannot merge lora_bias into a layer without a bias"
                    )
                bias = bias + self.lora_B[name].bias.detach().float() * self.scaling[name]
        if safe_merge and not (torch.isfinite(weight).all() and (bias is None or torch.isfinite(bias).all())):
            raise LmlabError(f"{type(self).__name__}: merging {', '.join(names)} gives non-finite weights")
        # A plain attribute, not a submodule: the quantized layer stays out of the state dict.
        self.__dict__["_quantized_base"] = quantized
        # the wider of the base's float dtype and the adapters' (float32 after peft's autocast)
        dtype = torch.promote_types(quantized.weight_dtype, self.lora_A[names[0]].weight.dtype)
        self.base_layer = _float_layer(weight, bias, dtype, conv1d)
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", UserWarning, stacklevel=2)
            return
        self.merged_adapters.clear()
        device = self.base_layer.weight.device  # the model may have moved since the merge
        self.base_layer = self.__dict__.pop("_quantized_base").to(device)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def _float_layer(
    weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, conv1d: bool
) -> nn.Module:
    """A frozen ``nn.Linear`` (or transformers' ``Conv1D``, which stores ``(in, out)``) holding
    ``weight`` ``(out, in)`` and ``bias``."""
    out_features, in_features = weight.shape
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        with torch.device("meta"):
            layer = Conv1D(out_features, in_features)
        layer.weight = nn.Parameter(weight.t().contiguous().to(dtype), requires_grad=False)
        layer.bias = nn.Parameter(
            (bias if bias is not None else weight.new_zeros(out_features)).to(dtype), requires_grad=False
        )
        return layer
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
    return layer


class LoraLinear4bit(_LoraQuantLinear):
    """LoRA beside :class:`lmlab.quant.Linear4bit` (NF4 / FP4 / int4, double quantization or not)."""


class LoraLinear8bit(_LoraQuantLinear):
    """LoRA beside :class:`lmlab.quant.Linear8bit` (LLM.int8())."""


#: lmlab layer type -> its LoRA layer, the mapping peft's ``_register_custom_module`` takes.
LORA_LAYERS: dict[type[nn.Module], type[nn.Module]] = {
    Linear4bit: LoraLinear4bit,
    Linear8bit: LoraLinear8bit,
}


def register_lora_layers(config: LoraConfig) -> LoraConfig:
    """Let peft adapt lmlab's quantized layers with ``config``; returns the same config.

    Call it on the ``LoraConfig`` given to ``get_peft_model`` (or a trainer's ``peft_config``) and
    on the one read back with ``LoraConfig.from_pretrained(dir)`` before
    ``PeftModel.from_pretrained(model, dir, config=config)``: peft keeps the registration on the
    config object, not in ``adapter_config.json``.
    """
    if not isinstance(config, LoraConfig):
        raise LmlabError(f"register_lora_layers: expected a peft LoraConfig, got {type(config).__name__}")
    config._register_custom_module(LORA_LAYERS)
    return config
