"""``quantize_(model, Config)``: swap the linear layers of any model for quantized ones, in place.

    from lmlab.quant import quantize_, NF4Config
    report = quantize_(model, NF4Config(double_quant=True))
    print(report)

Configs are frozen dataclasses validated on construction, the one place their fields are checked
(the CLI and the load path build them through it): one :class:`FourBitConfig` subclass per
registered 4-bit format (:data:`lmlab.quant.formats.FORMATS`), and :class:`Int8Config`;
:func:`config_for` finds the class of a method name. Works for ``nn.Linear`` in any model and for
Hugging Face GPT-2's ``Conv1D`` (whose weight is stored transposed). The output head
(``model.get_output_embeddings()`` and modules named in ``skip_modules``, ``lm_head`` by default)
stays in floating point, as in QLoRA and LLM.int8() practice.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from lmlab.errors import LmlabError
from lmlab.quant.formats import FORMATS, INT8_METHOD, check_block_size, check_float_dtype
from lmlab.quant.modules import Linear4bit, Linear8bit, is_conv1d, is_linear_like, linear_weight

FilterFn = Callable[[nn.Module, str], bool]


def _check_skip_modules(config: object) -> None:
    skip = config.skip_modules
    if isinstance(skip, str) or not all(isinstance(m, str) for m in skip):
        raise LmlabError(
            f"{type(config).__name__}: skip_modules must be a list of module names, got {skip!r}"
        )
    object.__setattr__(config, "skip_modules", tuple(skip))


@dataclass(frozen=True)
class FourBitConfig:
    """Blockwise 4-bit quantization in one of the registered formats (:data:`lmlab.quant.formats.FORMATS`).

    Use the subclass of the format (:class:`NF4Config`, :class:`FP4Config`, :class:`Int4Config`);
    :func:`config_for` finds it by name. Every field is checked here, the one place: the CLI and the
    load path build their configs through this constructor.
    """

    block_size: int = 64
    double_quant: bool = False
    compute_dtype: torch.dtype | None = None
    skip_modules: tuple[str, ...] = ("lm_head",)
    quant_type: ClassVar[str] = ""

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.quant_type not in FORMATS:
            raise LmlabError(
                f"{name}: not a registered 4-bit format ({self.quant_type!r}); use NF4Config etc."
            )
        check_block_size(self.block_size, name)
        if not isinstance(self.double_quant, bool):
            raise LmlabError(f"{name}: double_quant must be True or False")
        if self.compute_dtype is not None:
            check_float_dtype(self.compute_dtype, name, "compute_dtype")
        _check_skip_modules(self)

    @property
    def method(self) -> str:
        return self.quant_type

    def to_json(self) -> dict:
        return {
            "method": self.quant_type,
            "block_size": self.block_size,
            "double_quant": self.double_quant,
            "compute_dtype": None
            if self.compute_dtype is None
            else str(self.compute_dtype).removeprefix("torch."),
            "skip_modules": list(self.skip_modules),
        }


@dataclass(frozen=True)
class NF4Config(FourBitConfig):
    """4-bit NormalFloat (QLoRA). ``double_quant=True`` gives ≈ 4.127 bits per parameter."""

    quant_type: ClassVar[str] = "nf4"


@dataclass(frozen=True)
class FP4Config(FourBitConfig):
    """bitsandbytes' 4-bit float (1 sign, 2 exponent, 1 mantissa bit)."""

    quant_type: ClassVar[str] = "fp4"


@dataclass(frozen=True)
class Int4Config(FourBitConfig):
    """Uniform symmetric 4-bit integers (``k/7``), lmlab's own: saved in bitsandbytes' layout, loaded
    by lmlab (bitsandbytes itself cannot read it)."""

    quant_type: ClassVar[str] = "int4"


@dataclass(frozen=True)
class Int8Config:
    """LLM.int8(): int8 weights, input columns with any ``|x| >= threshold`` in floating point."""

    threshold: float = 6.0
    skip_modules: tuple[str, ...] = field(default=("lm_head",))

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise LmlabError(f"Int8Config: threshold must be a number, got {self.threshold!r}")
        if not math.isfinite(self.threshold) or self.threshold < 0:
            raise LmlabError(f"Int8Config: threshold must be finite and >= 0, got {self.threshold}")
        _check_skip_modules(self)

    @property
    def method(self) -> str:
        return INT8_METHOD

    def to_json(self) -> dict:
        return {"method": INT8_METHOD, "threshold": self.threshold, "skip_modules": list(self.skip_modules)}


Config = FourBitConfig | Int8Config


def _make_4bit(module: nn.Module, config: FourBitConfig, name: str) -> nn.Module:
    return Linear4bit.from_linear(
        module, config.quant_type, config.block_size, config.double_quant, config.compute_dtype, name=name
    )


def _make_int8(module: nn.Module, config: Int8Config, name: str) -> nn.Module:
    return Linear8bit.from_linear(module, config.threshold, name=name)


def _config_classes() -> dict[str, type]:
    """method name -> config class: one per registered 4-bit format, and LLM.int8()."""
    four_bit = {cls.quant_type: cls for cls in FourBitConfig.__subclasses__() if cls.quant_type in FORMATS}
    return {**four_bit, INT8_METHOD: Int8Config}


def config_for(method: str) -> type:
    """The config class of a method name (``"nf4"``, ``"fp4"``, ``"int4"``, ``"int8"``)."""
    classes = _config_classes()
    if method not in classes:
        raise LmlabError(f"unknown quantization method {method!r}; expected one of {', '.join(classes)}")
    return classes[method]


def _builder(config: object) -> Callable[[nn.Module, object, str], nn.Module] | None:
    if isinstance(config, FourBitConfig) and type(config) is config_for(config.quant_type):
        return _make_4bit
    if type(config) is Int8Config:
        return _make_int8
    return None


def config_from_json(meta: dict) -> Config:
    """The config ``to_json`` wrote; its fields are checked by the config's constructor."""
    cls = config_for(meta.get("method"))
    kwargs = {k: v for k, v in meta.items() if k != "method"}
    if "skip_modules" in kwargs and isinstance(kwargs["skip_modules"], list):
        kwargs["skip_modules"] = tuple(kwargs["skip_modules"])
    if kwargs.get("compute_dtype") is not None:
        name = kwargs["compute_dtype"]
        dtype = getattr(torch, name, None) if isinstance(name, str) else None
        if not isinstance(dtype, torch.dtype):
            raise LmlabError(
                f"{cls.__name__}: compute_dtype must be float32, float16 or bfloat16, got {name!r}"
            )
        kwargs["compute_dtype"] = dtype
    try:
        return cls(**kwargs)
    except TypeError as e:  # an unknown field
        raise LmlabError(f"{cls.__name__}: {e}") from None


@dataclass(frozen=True)
class QuantReport:
    """What :func:`quantize_` changed. Byte counts are for the quantized layers' weights
    (``bytes_before`` / ``bytes_after``) and for the whole model (``model_bytes_*``)."""

    method: str
    layers: tuple[str, ...]
    params: int
    bytes_before: int
    bytes_after: int
    model_bytes_before: int
    model_bytes_after: int
    skipped: tuple[str, ...] = ()

    @property
    def bits_per_param(self) -> float:
        """Stored bits per weight of the quantized layers (codes, scales and code tables)."""
        return 8.0 * self.bytes_after / self.params if self.params else float("nan")

    @property
    def compression(self) -> float:
        return self.bytes_before / self.bytes_after if self.bytes_after else float("nan")

    def to_json(self) -> dict:
        return {
            "method": self.method,
            "layers": len(self.layers),
            "params": self.params,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "bits_per_param": self.bits_per_param,
            "model_bytes_before": self.model_bytes_before,
            "model_bytes_after": self.model_bytes_after,
            "skipped": list(self.skipped),
        }

    def __str__(self) -> str:
        rows = [
            ("", "before", "after", "ratio"),
            (
                f"quantized layers ({len(self.layers)})",
                _human(self.bytes_before),
                _human(self.bytes_after),
                f"{self.compression:.2f}x",
            ),
            (
                "whole model",
                _human(self.model_bytes_before),
                _human(self.model_bytes_after),
                f"{self.model_bytes_before / max(1, self.model_bytes_after):.2f}x",
            ),
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [f"method {self.method}: {self.params:,} weights at {self.bits_per_param:.3f} bits/param"]
        for r in rows:
            lines.append(
                "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r))
            )
        if self.skipped:
            lines.append(f"kept in floating point: {', '.join(self.skipped)}")
        return "\n".join(lines)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def model_nbytes(model: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.data_ptr()
        if key in seen and t.numel():
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def _output_head_names(model: nn.Module) -> set[str]:
    names: set[str] = set()
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            head = get()
        except (NotImplementedError, AttributeError):
            head = None
        if head is not None:
            names |= {n for n, m in model.named_modules() if m is head}
    return names


def matches_module(name: str, pattern: str) -> bool:
    """Whether ``pattern`` names the module ``name``: the full name, a dotted prefix of it (a whole
    sub-tree: ``"encoder.layer.1"``) or a dotted suffix (``"c_attn"``, ``"attn.c_attn"``) — the way
    transformers' ``llm_int8_skip_modules`` match, at module boundaries (no regular expressions)."""
    return name == pattern or name.startswith(f"{pattern}.") or name.endswith(f".{pattern}")


def unmatched_skip_modules(model: nn.Module, patterns: tuple[str, ...] | list[str]) -> list[str]:
    """The ``patterns`` that match no linear layer of ``model`` (a typo would quantize the layer the
    user meant to keep)."""
    names = [n for n, m in model.named_modules() if n and is_linear_like(m)]
    return [p for p in patterns if not any(matches_module(n, p) for n in names)]


def _default_filter(config: Config, heads: set[str], keep_float: tuple[str, ...]) -> FilterFn:
    skip = tuple(config.skip_modules)

    def keep(module: nn.Module, name: str) -> bool:
        parts = name.split(".")
        if name in heads or any(matches_module(name, s) for s in skip):
            return False
        # Hugging Face's _keep_in_fp32_modules (T5: "wo", whose input T5 casts to wo.weight.dtype)
        return not any(k in parts or name.endswith(k) for k in keep_float)

    return keep


def mark_quantized(model: nn.Module) -> nn.Module:
    """Set ``is_loaded_in_4bit`` / ``is_loaded_in_8bit`` where the model holds lmlab's 4-bit / int8
    layers, as transformers does on a bitsandbytes model: peft's ``prepare_model_for_kbit_training``
    reads them. :func:`quantize_` and :func:`lmlab.quant.load_quantized` call it."""
    for cls, flag in ((Linear4bit, "is_loaded_in_4bit"), (Linear8bit, "is_loaded_in_8bit")):
        if any(isinstance(m, cls) for m in model.modules()):
            setattr(model, flag, True)
    return model


def quantize_(model: nn.Module, config: Config, filter_fn: FilterFn | None = None) -> QuantReport:
    """Replace the linear layers of ``model`` by quantized ones, in place; returns a report.

    ``filter_fn(module, name) -> bool`` chooses the layers (``nn.Linear`` or ``Conv1D``) to
    quantize; by default every one except the output head, ``config.skip_modules`` and a Hugging
    Face model's ``_keep_in_fp32_modules`` (T5's ``wo``, as transformers does for bitsandbytes).
    """
    builder = _builder(config)
    if builder is None:
        names = ", ".join(cls.__name__ for cls in _config_classes().values())
        raise LmlabError(f"quantize_: expected a config ({names}), got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise LmlabError(f"quantize_: expected a torch.nn.Module, got {type(model).__name__}")
    keep_float = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    keep = filter_fn or _default_filter(config, _output_head_names(model), keep_float)
    before = model_nbytes(model)
    targets: list[tuple[str, nn.Module]] = []
    skipped: list[str] = []
    for name, module in model.named_modules():
        if not name or not is_linear_like(module):
            continue
        if keep(module, name):
            targets.append((name, module))
        else:
            skipped.append(name)
    params = bytes_before = bytes_after = 0
    for name, module in targets:
        w = linear_weight(module)
        new = builder(module, config, f"{name}.weight")
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, new)
        params += w.numel()
        bytes_before += w.numel() * w.element_size()
        bytes_after += new.quantized_nbytes
    mark_quantized(model)
    return QuantReport(
        method=config.method,
        layers=tuple(n for n, _ in targets),
        params=params,
        bytes_before=bytes_before,
        bytes_after=bytes_after,
        model_bytes_before=before,
        model_bytes_after=model_nbytes(model),
        skipped=tuple(skipped),
    )


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (Linear4bit, Linear8bit))}


def float_linear_names(model: nn.Module) -> list[str]:
    """The full names of the linear layers (``nn.Linear``, ``Conv1D``) left in floating point."""
    return [n for n, m in model.named_modules() if n and is_linear_like(m)]


# What transformers sets on a quantized model (PreTrainedModel.from_pretrained, HfQuantizer) and
# removes in its own dequantize().
_QUANT_ATTRS = (
    "hf_quantizer",
    "is_quantized",
    "is_loaded_in_4bit",
    "is_loaded_in_8bit",
    "quantization_method",
)


def _conv1d_names(model: nn.Module) -> set[str] | None:
    """Names of the modules that are ``Conv1D`` in a fresh float instance of a Hugging Face ``model``
    (GPT-2's), built on the meta device (no memory); None when that cannot be told."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(type(model), "_from_config"):
        return None
    try:
        with torch.device("meta"):
            ref = type(model)._from_config(config)
    except Exception:  # noqa: BLE001 (a model transformers cannot rebuild: plain nn.Linear then)
        return None
    return {n for n, m in ref.named_modules() if is_conv1d(m)}


def _float_layer(layer: nn.Module, conv1d: bool) -> nn.Module:
    w = layer.dequantized_weight(layer.weight_dtype)  # (out, in)
    bias = None if layer.bias is None else layer.bias.detach().clone().to(layer.weight_dtype)
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        with torch.device("meta"):
            new = Conv1D(layer.out_features, layer.in_features)
        new.weight = nn.Parameter(w.t().contiguous())  # Conv1D stores (in, out)
        new.bias = nn.Parameter(bias if bias is not None else w.new_zeros(layer.out_features))
        return new
    new = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, device="meta")
    new.weight = nn.Parameter(w)
    if bias is not None:
        new.bias = nn.Parameter(bias)
    return new


def dequantize_(model: nn.Module) -> nn.Module:
    """Replace every lmlab quantized layer of ``model`` by a float layer holding its dequantized
    weight, in place (transformers' ``model.dequantize()``); returns the model.

    A layer that a fresh float instance of the Hugging Face model has as ``Conv1D`` (GPT-2) becomes
    ``Conv1D`` again, so that ``save_pretrained`` writes the shapes the architecture expects; every
    other becomes ``nn.Linear``. Weights and biases get the dtype the layer was quantized from, and
    are trainable again. ``config.quantization_config`` and transformers' quantization attributes are
    removed: the model is a float model. Raises if ``model`` has no quantized layer.
    """
    if not isinstance(model, nn.Module):
        raise LmlabError(f"dequantize_: expected a torch.nn.Module, got {type(model).__name__}")
    layers = quantized_layers(model)
    if not layers:
        raise LmlabError("dequantize_: the model has no lmlab quantized layers")
    conv1d = _conv1d_names(model) or set()
    for name, layer in layers.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        with torch.no_grad():
            setattr(parent, attr, _float_layer(layer, name in conv1d))
    for attr in _QUANT_ATTRS:
        if attr in vars(model):
            delattr(model, attr)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    return model
