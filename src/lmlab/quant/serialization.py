"""Save a quantized model to safetensors and load it back without quantizing again.

A saved directory holds

* ``model.safetensors`` -- the whole state dict; 4-bit layers in bitsandbytes' key layout
  (``weight``, ``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``,
  ``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``), int8 layers as
  ``weight`` (int8) and ``SCB``. Tied weights are stored once (safetensors' ``save_model``).
* ``lmlab_quant.json`` -- the method, its settings, and every quantized layer with its shape.
* ``config.json`` -- for Hugging Face models, so the architecture can be rebuilt.

Nothing is pickled, so loading never executes code from the directory. Directories are written
atomically (:func:`lmlab.io.atomic_dir`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from lmlab.errors import LmlabError
from lmlab.io import atomic_dir
from lmlab.quant.api import Config, config_from_json, quantized_layers
from lmlab.quant.blockwise import _dtype_from_name, _dtype_name
from lmlab.quant.modules import Linear4bit, Linear8bit

WEIGHTS_NAME = "model.safetensors"
META_NAME = "lmlab_quant.json"
FORMAT_VERSION = 1


def _layer_meta(module: nn.Module) -> dict:
    meta = {
        "in_features": module.in_features,
        "out_features": module.out_features,
        "bias": module.bias is not None,
        "weight_dtype": _dtype_name(module.weight_dtype),
    }
    if isinstance(module, Linear4bit):
        meta.update(
            kind="linear4bit",
            quant_type=module.quant_type,
            block_size=module.block_size,
            double_quant=module.double_quant,
            compute_dtype=None if module.compute_dtype is None else _dtype_name(module.compute_dtype),
        )
    else:
        meta.update(kind="linear8bit", threshold=module.threshold)
    return meta


def save_quantized(
    model: nn.Module,
    directory: str | os.PathLike,
    config: Config | None = None,
    extra_files: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write ``model`` (already passed through :func:`quantize_`) to ``directory``, atomically.

    ``extra_files`` (e.g. tokenizer files) are copied in as they are.
    """
    from safetensors.torch import save_model

    layers = quantized_layers(model)
    if not layers:
        raise LmlabError("save_quantized: the model has no quantized layers; run quantize_ first")
    meta = {
        "format": FORMAT_VERSION,
        "config": config.to_json() if config is not None else None,
        "model_class": type(model).__name__,
        "layers": {name: _layer_meta(m) for name, m in layers.items()},
    }
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        hf_config = getattr(model, "config", None)
        if hf_config is not None and hasattr(hf_config, "save_pretrained"):
            hf_config.save_pretrained(tmp)
        save_model(model, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        for f in extra_files:
            f = Path(f)
            if f.is_file() and not (tmp / f.name).exists():
                shutil.copy2(f, tmp / f.name)
    return directory


def _shell(meta: dict) -> nn.Module:
    dtype = _dtype_from_name(meta.get("weight_dtype", "float32"))
    if meta["kind"] == "linear4bit":
        compute = meta.get("compute_dtype")
        return Linear4bit(
            meta["in_features"],
            meta["out_features"],
            bias=meta["bias"],
            quant_type=meta["quant_type"],
            block_size=meta["block_size"],
            double_quant=meta["double_quant"],
            compute_dtype=None if compute is None else _dtype_from_name(compute),
            weight_dtype=dtype,
        )
    if meta["kind"] == "linear8bit":
        return Linear8bit(
            meta["in_features"],
            meta["out_features"],
            bias=meta["bias"],
            threshold=meta["threshold"],
            weight_dtype=dtype,
        )
    raise LmlabError(f"unknown layer kind {meta['kind']!r} in {META_NAME}")


def _build_hf_model(directory: Path) -> nn.Module:
    try:
        import transformers
    except ImportError as e:  # pragma: no cover
        raise LmlabError("loading a Hugging Face model needs the transformers package") from e
    config = transformers.AutoConfig.from_pretrained(directory)
    return instantiate_hf_model(config)


def hf_model_class(config) -> type:
    """The transformers class for ``config``: its ``architectures`` entry, else the Auto class for
    seq2seq (T5), masked LM (BERT) or causal LM (GPT-2, Llama)."""
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type):
            return cls
    if getattr(config, "is_encoder_decoder", False):
        auto = transformers.AutoModelForSeq2SeqLM
    elif getattr(config, "model_type", "") in ("bert", "roberta", "distilbert", "albert", "electra"):
        auto = transformers.AutoModelForMaskedLM
    else:
        auto = transformers.AutoModelForCausalLM
    try:
        return auto._model_mapping[type(config)]
    except KeyError as e:
        raise LmlabError(f"no model class for config type {type(config).__name__}") from e


def instantiate_hf_model(config) -> nn.Module:
    cls = hf_model_class(config)
    return cls(config)


def load_quantized(
    directory: str | os.PathLike, model: nn.Module | None = None, device: str | torch.device = "cpu"
) -> nn.Module:
    """Load a directory written by :func:`save_quantized`; no quantization happens.

    For Hugging Face models the architecture comes from ``config.json``; for other models pass a
    float ``model`` of the same architecture (its quantized layers are replaced by the stored ones).
    Returns the model in eval mode.
    """
    from safetensors.torch import load_model

    directory = Path(directory)
    meta_path = directory / META_NAME
    weights = directory / WEIGHTS_NAME
    if not meta_path.is_file() or not weights.is_file():
        raise LmlabError(
            f"{directory}: not a quantized model directory (needs {META_NAME} and {WEIGHTS_NAME})"
        )
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT_VERSION:
        raise LmlabError(f"{meta_path}: unsupported format {meta.get('format')!r}")
    if model is None:
        if not (directory / "config.json").is_file():
            raise LmlabError(
                f"{directory}: no config.json; pass the float model to load_quantized(dir, model)"
            )
        model = _build_hf_model(directory)
    for name, layer_meta in meta["layers"].items():
        parent_name, _, attr = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
        except AttributeError as e:
            raise LmlabError(f"{directory}: the model has no module {name!r}") from e
        setattr(parent, attr, _shell(layer_meta))
    try:
        load_model(model, str(weights), strict=True, device=str(device))
    except RuntimeError as e:
        raise LmlabError(f"{weights}: does not match the model ({str(e).splitlines()[-1].strip()})") from e
    model.to(device)
    return model.eval()


def load_config(directory: str | os.PathLike) -> Config | None:
    meta = json.loads((Path(directory) / META_NAME).read_text(encoding="utf-8"))
    return None if meta.get("config") is None else config_from_json(meta["config"])
