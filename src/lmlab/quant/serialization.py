"""Save a quantized model to safetensors and load it back without quantizing again.

A saved directory holds

* ``model.safetensors`` -- the whole state dict; 4-bit layers in bitsandbytes' key layout
  (``weight``, ``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``,
  ``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``), int8 layers as
  ``weight`` (int8) and ``SCB``. Tied weights are stored once.
* ``lmlab_quant.json`` -- the method, its settings, and every quantized layer with its shape.
* ``config.json`` -- for Hugging Face models, so the architecture can be rebuilt, with the
  ``quantization_config`` transformers + bitsandbytes write (:mod:`lmlab.quant.hf`): NF4 / FP4 at
  block size 64 and int8 outputs load with ``AutoModel*.from_pretrained(dir)`` as bitsandbytes'
  own; what bitsandbytes cannot hold (int4, other block sizes) says ``"quant_method": "lmlab"``,
  which transformers refuses.
* ``manifest.json`` -- the SHA-256 and size of every other file, written last and checked on load.

Nothing is pickled, so loading never executes code from the directory. Directories are written
atomically (:func:`lmlab.io.atomic_dir`).

:func:`load_quantized` also reads what transformers + bitsandbytes ``save_pretrained`` write (no
``lmlab_quant.json``): the ``quantization_config`` gives the method, each tensor's bitsandbytes quant
state (4-bit) or ``SCB`` (int8) the layers, and the weights load straight into lmlab's layers.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from lmlab.errors import LmlabError
from lmlab.io import atomic_dir, check_output_dir, read_json_object, sha256_file
from lmlab.quant.api import (
    Config,
    config_for,
    config_from_json,
    float_linear_names,
    mark_quantized,
    quantized_layers,
)
from lmlab.quant.formats import (
    FLOAT_DTYPE_NAMES,
    INT8_METHOD,
    NESTED_BLOCK_SIZE,
    check_block_size,
    check_quant_type,
)
from lmlab.quant.hf import LMLAB_METHOD, quantization_config_for, read_bnb_config
from lmlab.quant.modules import Linear4bit, Linear8bit
from lmlab.quant.state import _dtype_from_name, _dtype_name, _read_quant_state

WEIGHTS_NAME = "model.safetensors"
META_NAME = "lmlab_quant.json"
MANIFEST_NAME = "manifest.json"
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


def _state_nbytes(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in model.state_dict().values():
        if t.data_ptr() in seen and t.numel():
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def save_quantized(
    model: nn.Module,
    directory: str | os.PathLike,
    config: Config | None = None,
    extra_files: Iterable[str | os.PathLike] = (),
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (already passed through :func:`quantize_`) to ``directory``, atomically.

    ``directory`` must be new or empty, or (with ``overwrite=True``) an earlier quantized model;
    anything else is refused, never replaced. ``extra_files`` (e.g. tokenizer files) are copied in
    as they are; a directory among them (a sentence-transformers model's ``1_Pooling/``) is copied
    whole, following symbolic links, and a link loop or a broken link in it is refused in one line. A ``manifest.json`` with the SHA-256 and size of every file is written last and
    checked by :func:`load_quantized`.
    """
    layers = quantized_layers(model)
    if not layers:
        raise LmlabError("save_quantized: the model has no quantized layers; run quantize_ first")
    directory = Path(directory)
    try:
        check_output_dir(directory, "quantized", overwrite=overwrite, flag="save_quantized: directory")
    except LmlabError as e:
        raise LmlabError(str(e).replace("pass --overwrite", "pass overwrite=True")) from None
    meta = {
        "format": FORMAT_VERSION,
        "config": config.to_json() if config is not None else None,
        "model_class": type(model).__name__,
        "layers": {name: _layer_meta(m) for name, m in layers.items()},
    }
    extra = [Path(f) for f in extra_files if Path(f).name not in (META_NAME, MANIFEST_NAME)]
    plan = [item for f in extra for item in _copy_plan(f, Path(f.name))]
    expected = _state_nbytes(model) + sum(src.stat().st_size for src, _ in plan)
    try:
        _write(model, directory, meta, plan, expected)
    except OSError as e:  # a full disk is already an LmlabError (atomic_dir); this is the rest
        raise LmlabError(f"cannot write {directory}: {e.strerror or e} ({e.filename or directory})") from None
    return directory


def _copy_plan(src: Path, rel: Path, seen: frozenset[Path] = frozenset()) -> list[tuple[Path, Path]]:
    """(file, its path relative to the output) for ``src`` and, if it is a directory, everything in
    it; symbolic links are followed (a Hugging Face cache snapshot is made of them), a loop or a
    dangling link is a one-line :class:`LmlabError`."""
    if src.is_file():
        return [(src, rel)]
    if not src.is_dir():
        raise LmlabError(
            f"{src}: a broken symbolic link, a link loop or not a regular file; refusing to copy it"
        )
    real = src.resolve()
    if real in seen:
        raise LmlabError(f"{src}: a symbolic link loop (it leads back to {real}); refusing to copy it")
    out: list[tuple[Path, Path]] = []
    for entry in sorted(src.iterdir()):
        out += _copy_plan(entry, rel / entry.name, seen | {real})
    return out


def _write(
    model: nn.Module, directory: Path, meta: dict, plan: list[tuple[Path, Path]], expected: int
) -> None:
    from safetensors.torch import _remove_duplicate_names, save_file

    state = model.state_dict()
    # Tied weights are stored once, as safetensors' save_model does; its alias map goes into the
    # header's metadata, whose order varies from run to run, so the same model would not give the
    # same bytes. load_model re-ties from the model itself and needs no alias map.
    for aliases in _remove_duplicate_names(state).values():
        for name in aliases:
            del state[name]
    state = {k: v.contiguous() for k, v in state.items()}
    with atomic_dir(directory, expected_bytes=expected) as tmp:
        hf_config = getattr(model, "config", None)
        config_bytes = None
        if hf_config is not None and hasattr(hf_config, "save_pretrained"):
            scratch = tmp / ".config"
            hf_config.save_pretrained(scratch)
            config_bytes = _with_quantization_config((scratch / "config.json").read_bytes(), model)
            shutil.rmtree(scratch)
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        for src, rel in plan:
            if not (tmp / rel).exists() and not (config_bytes is not None and str(rel) == "config.json"):
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)  # what lmlab writes itself wins
                shutil.copy2(src, tmp / rel)
        meta_bytes = (json.dumps(meta, indent=2) + "\n").encode("utf-8")
        files = {
            p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(tmp.iterdir())
            if p.is_file()
        }
        written = (
            {META_NAME: meta_bytes}
            if config_bytes is None
            else {"config.json": config_bytes, META_NAME: meta_bytes}
        )
        for name, data in written.items():
            files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        files = dict(sorted(files.items()))
        # The manifest before config.json: config.json's quantization_config would make a directory
        # killed here look like transformers' own; with the manifest already there it reads as an
        # incomplete lmlab output (load_quantized refuses it).
        (tmp / MANIFEST_NAME).write_text(json.dumps({"files": files}, indent=2) + "\n", encoding="utf-8")
        if config_bytes is not None:
            (tmp / "config.json").write_bytes(config_bytes)
        # lmlab_quant.json last: it marks a quantized directory, so a directory that has it is complete
        # (whatever kills the writer, the temporary directory lacks it until everything else is there).
        (tmp / META_NAME).write_bytes(meta_bytes)


def _layers_config(model: nn.Module) -> Config | None:
    """The one :class:`Config` all quantized layers of ``model`` agree on (their own settings, not
    what the caller says), with the compute dtype of None resolved; None if they differ."""
    settings = set()
    for m in quantized_layers(model).values():
        if isinstance(m, Linear4bit):
            settings.add((m.quant_type, m.block_size, m.double_quant, m.compute_dtype, m.weight_dtype))
        else:
            settings.add((INT8_METHOD, m.threshold))
    if len(settings) != 1:
        return None
    (method, *rest) = settings.pop()
    if method == INT8_METHOD:
        return config_for(INT8_METHOD)(threshold=rest[0], skip_modules=())
    block_size, double_quant, compute, weight_dtype = rest
    return config_for(method)(
        block_size=block_size,
        double_quant=double_quant,
        compute_dtype=compute or weight_dtype,
        skip_modules=(),
    )


def _with_quantization_config(config_json: bytes, model: nn.Module) -> bytes:
    """``config.json`` (as ``save_pretrained`` wrote it) with transformers' ``quantization_config``
    added, in transformers' layout (sorted keys, indent 2)."""
    config = _layers_config(model)
    if config is None:  # layers of several settings: nothing transformers could rebuild
        qc = {"quant_method": LMLAB_METHOD, "method": "mixed", "load_with": "lmlab.quant.load_quantized"}
    else:
        qc = quantization_config_for(config, float_linear_names(model))
    data = json.loads(config_json.decode("utf-8"))
    data["quantization_config"] = qc
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")


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


def instantiate_hf_model(config) -> nn.Module:
    from lmlab.models.families import model_class  # the one rule for which class loads a directory

    return model_class(config)(config)


_HEX = frozenset("0123456789abcdef")


def verify_manifest(directory: str | os.PathLike) -> bool:
    """Check every file of a quantized directory against its ``manifest.json``.

    Returns False (after a warning) for a directory written before lmlab wrote manifests; a
    manifest that is unreadable, has the wrong JSON types, does not list the weights, the layer
    list and ``config.json``, or disagrees with a file raises a one-line :class:`LmlabError`.
    """
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        warnings.warn(
            f"{directory} has no {MANIFEST_NAME} (written by an older lmlab); its files cannot be "
            "checked for damage",
            stacklevel=3,
        )
        return False
    files = read_json_object(path).get("files")
    if not isinstance(files, dict):
        raise LmlabError(f'{path}: must be a JSON object with a "files" object')
    required = [WEIGHTS_NAME, META_NAME] + (["config.json"] if (directory / "config.json").is_file() else [])
    for name in required:
        if name not in files:
            raise LmlabError(f"{path}: does not list {name}; the directory cannot be verified")
    for name, want in files.items():
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            raise LmlabError(f"{path}: bad file name {name!r}")
        sha, size = (want.get("sha256"), want.get("bytes")) if isinstance(want, dict) else (None, None)
        if not (isinstance(sha, str) and len(sha) == 64 and set(sha) <= _HEX):
            raise LmlabError(f'{path}: the entry for {name} needs a 64-digit hex "sha256"')
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise LmlabError(f'{path}: the entry for {name} needs an integer "bytes"')
        p = directory / name
        if not p.is_file():
            raise LmlabError(f"{p}: is missing (listed in {MANIFEST_NAME})")
        actual = p.stat().st_size
        if actual != size:
            raise LmlabError(f"{p}: has {actual:,} bytes, {MANIFEST_NAME} says {size:,}; the file is damaged")
        if sha256_file(p) != sha:
            raise LmlabError(f"{p}: fails its SHA-256 checksum in {MANIFEST_NAME}; the file is damaged")
    return True


def _check_layer_meta(path: Path, name: str, lm: object) -> None:
    """One layer's entry of ``lmlab_quant.json``; the format and block size by the registry's checks."""
    if not isinstance(lm, dict):
        raise LmlabError(f"{path}: layer {name}: must be an object")

    def bad(field: str, what: str) -> LmlabError:
        return LmlabError(f"{path}: layer {name}: {field!r} must be {what}, got {lm.get(field)!r}")

    for field in ("in_features", "out_features"):
        v = lm.get(field)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise bad(field, "a positive integer")
    if not isinstance(lm.get("bias"), bool):
        raise bad("bias", "true or false")
    if lm.get("weight_dtype", "float32") not in FLOAT_DTYPE_NAMES:
        raise bad("weight_dtype", f"one of {', '.join(FLOAT_DTYPE_NAMES)}")
    kind = lm.get("kind")
    if kind == "linear4bit":
        check_quant_type(lm.get("quant_type"), f"{path}: layer {name}")
        check_block_size(lm.get("block_size"), f"{path}: layer {name}")
        if not isinstance(lm.get("double_quant"), bool):
            raise bad("double_quant", "true or false")
        if lm.get("compute_dtype") is not None and lm.get("compute_dtype") not in FLOAT_DTYPE_NAMES:
            raise bad("compute_dtype", f"null or one of {', '.join(FLOAT_DTYPE_NAMES)}")
    elif kind == "linear8bit":
        t = lm.get("threshold")
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise bad("threshold", "a finite number >= 0")
    else:
        raise bad("kind", "linear4bit or linear8bit")


def _read_meta(directory: Path) -> dict:
    """``lmlab_quant.json``, every field checked: a hand-edited file is a one-line error."""
    path = directory / META_NAME
    meta = read_json_object(path)
    if meta.get("format") != FORMAT_VERSION:
        raise LmlabError(f"{path}: unsupported format {meta.get('format')!r}")
    layers = meta.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise LmlabError(f'{path}: "layers" must be a non-empty object')
    for name, lm in layers.items():
        _check_layer_meta(path, name, lm)
    if meta.get("config") is not None and not isinstance(meta["config"], dict):
        raise LmlabError(f'{path}: "config" must be an object or null')
    return meta


# safetensors' header dtype names
_ST_DTYPE = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.bool: "BOOL",
}
_ST_FLOATS = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


def _check_layer_tensors(
    weights: Path,
    get_tensor,
    header: dict,
    name: str,
    lm: dict,
    shell: nn.Module,
    described_by: str = META_NAME,
) -> None:
    """Every tensor of one quantized layer present, of the dtype and size its shape and settings
    give; the stored bitsandbytes quant state agrees with the layer's entry (``described_by``)."""
    expected = shell.state_dict(prefix=f"{name}.")
    for key, ref in expected.items():
        if key not in header:
            raise LmlabError(f"{weights}: tensor {key} is missing")
        dtype, shape = header[key]
        if dtype != _ST_DTYPE.get(ref.dtype):
            raise LmlabError(f"{weights}: tensor {key} is {dtype}, expected {_ST_DTYPE.get(ref.dtype)}")
        blob = ".quant_state.bitsandbytes__" in key
        if (len(shape) != 1) if blob else (list(shape) != list(ref.shape)):
            want = "1-D" if blob else str(list(ref.shape))
            raise LmlabError(f"{weights}: tensor {key} has shape {list(shape)}, expected {want}")
    stray = [k for k in header if k.startswith(f"{name}.weight.") and k not in expected]
    if stray:
        raise LmlabError(
            f"{weights}: tensor {stray[0]} does not belong to layer {name} as {described_by} describes it"
        )
    if lm["kind"] != "linear4bit":
        return
    key = f"{name}.weight.quant_state.bitsandbytes__{lm['quant_type']}"
    state = _read_quant_state(get_tensor(key), f"{weights}: tensor {key}")
    stored = {
        "quant_type": state["quant_type"],
        "block_size": state["blocksize"],
        "shape": state["shape"],
        "weight_dtype": _dtype_name(state["dtype"]),
        "double_quant": "nested_offset" in state,
    }
    described = {
        "quant_type": lm["quant_type"],
        "block_size": lm["block_size"],
        "shape": [lm["out_features"], lm["in_features"]],
        "weight_dtype": lm.get("weight_dtype", "float32"),
        "double_quant": lm["double_quant"],
    }
    for field, want in described.items():
        if stored[field] != want:
            raise LmlabError(
                f"{weights}: tensor {key} says {field} {stored[field]!r} but {described_by} says {want!r}"
            )
    if state.get("nested_blocksize", NESTED_BLOCK_SIZE) != NESTED_BLOCK_SIZE:
        raise LmlabError(
            f"{weights}: tensor {key} has nested_blocksize {state['nested_blocksize']}, expected 256"
        )


def _build_quantized_shell(directory: Path, layers: dict[str, dict], model: nn.Module | None) -> tuple:
    """The model to load into: ``model`` (or one built from ``config.json``), its layers named in
    ``layers`` (name -> layer entry, :func:`_check_layer_meta`'s format) replaced by empty quantized
    shells. Returns ``(model, {name: shell})``. The one place a quantized directory's model is built."""
    if model is None:
        if not (directory / "config.json").is_file():
            raise LmlabError(
                f"{directory}: no config.json; pass the float model to load_quantized(dir, model)"
            )
        model = _build_hf_model(directory)
    shells = {}
    for name, layer_meta in layers.items():
        parent_name, _, attr = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
        except AttributeError:
            raise LmlabError(f"{directory}: the model has no module {name!r}") from None
        if not hasattr(parent, attr):
            raise LmlabError(f"{directory}: the model has no module {name!r}")
        shells[name] = _shell(layer_meta)
        setattr(parent, attr, shells[name])
    return model, shells


def _check_float_tensors(weights: Path, model: nn.Module, header: dict, shells: dict) -> None:
    """Every tensor of the float part of the model stored in a dtype it can take."""
    quantized_keys = {k for name in shells for k in header if k.startswith(f"{name}.")}
    for key, ref in model.state_dict().items():
        if key in quantized_keys or key not in header:
            continue  # a missing or unexpected key is reported by the strict load
        dtype = header[key][0]
        if (dtype not in _ST_FLOATS) if ref.is_floating_point() else (dtype != _ST_DTYPE.get(ref.dtype)):
            raise LmlabError(
                f"{weights}: tensor {key} is {dtype}, expected {_ST_DTYPE.get(ref.dtype, ref.dtype)}"
            )


def _check_scales(weights: Path, shells: dict) -> None:
    for name, layer in shells.items():
        if isinstance(layer, Linear8bit) and not bool((torch.isfinite(layer.SCB) & (layer.SCB >= 0)).all()):
            raise LmlabError(f"{weights}: tensor {name}.SCB holds a NaN, Inf or negative scale")


def load_quantized(
    directory: str | os.PathLike, model: nn.Module | None = None, device: str | torch.device = "cpu"
) -> nn.Module:
    """Load a quantized directory; no quantization happens.

    Reads what :func:`save_quantized` writes and what transformers + bitsandbytes ``save_pretrained``
    write (NF4 / FP4 with or without double quantization, int8; no ``lmlab_quant.json``: the
    ``quantization_config`` of ``config.json`` and the stored quant states say everything).
    For Hugging Face models the architecture comes from ``config.json``; for other models pass a
    float ``model`` of the same architecture (its quantized layers are replaced by the stored ones).
    lmlab's directories are checked against ``manifest.json`` (a directory without one, from an older
    lmlab, loads with a warning); every tensor's presence, dtype and size is checked against the
    layer it belongs to before anything is used: a damaged or tampered directory is a one-line
    :class:`LmlabError`. Returns the model in eval mode.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_model

    directory = Path(directory)
    meta_path = directory / META_NAME
    weights = directory / WEIGHTS_NAME
    if not meta_path.is_file():
        qc = _read_quantization_config(directory)
        if qc is None:
            raise LmlabError(
                f"{directory}: not a quantized model directory (needs {META_NAME}, or a config.json with "
                "the quantization_config of transformers + bitsandbytes)"
            )
        return _load_transformers_dir(directory, qc, model, device)
    if not weights.is_file():
        raise LmlabError(
            f"{directory}: not a quantized model directory (needs {META_NAME} and {WEIGHTS_NAME})"
        )
    verify_manifest(directory)
    meta = _read_meta(directory)
    if model is None and (directory / "config.json").is_file():
        # No float model first: a meta-device skeleton, each layer filled as its tensors are read.
        from lmlab.models.presets import read_hf_config
        from lmlab.quant.streaming import load_quantized_model

        model = load_quantized_model(read_hf_config(directory), [weights], meta["layers"], device=device)
        return mark_quantized(model)
    model, shells = _build_quantized_shell(directory, meta["layers"], model)
    try:
        with safe_open(str(weights), "pt") as f:
            header = {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not iterable)
            for name, layer_meta in meta["layers"].items():
                _check_layer_tensors(weights, f.get_tensor, header, name, layer_meta, shells[name])
    except SafetensorError as e:
        raise LmlabError(f"{weights}: damaged or not a safetensors file ({e})") from None
    _check_float_tensors(weights, model, header, shells)
    try:
        load_model(model, str(weights), strict=True, device=str(device))
    except (RuntimeError, SafetensorError) as e:
        raise LmlabError(f"{weights}: does not match the model ({str(e).splitlines()[-1].strip()})") from None
    _check_scales(weights, shells)
    model.to(device)
    return mark_quantized(model.eval())


# ------------------------------------------------------------------ transformers + bitsandbytes dirs


def _read_quantization_config(directory: Path) -> dict | None:
    """The ``quantization_config`` of ``directory/config.json`` (None if there is none)."""
    path = directory / "config.json"
    if not path.is_file():
        return None
    qc = read_json_object(path).get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise LmlabError(f"{path}: quantization_config must be a JSON object, got {type(qc).__name__}")
    if qc.get("quant_method") == LMLAB_METHOD or (directory / MANIFEST_NAME).is_file():
        raise LmlabError(
            f"{directory}: written by lmlab quantize but {META_NAME} is missing; the directory is incomplete"
        )
    return qc


def _weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a ``save_pretrained`` directory, one or the shards its index names."""
    single = directory / WEIGHTS_NAME
    index = directory / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise LmlabError(f'{index}: must hold a "weight_map" object of file names')
        names = sorted(set(weight_map.values()))
        for n in names:
            if "/" in n or "\\" in n or n in ("", ".", "..") or not (directory / n).is_file():
                raise LmlabError(f"{index}: names the shard {n!r}, which is not a file of {directory}")
        return [directory / n for n in names]
    if any((directory / n).is_file() for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise LmlabError(
            f"{directory}: lmlab reads safetensors weights only (pickled pytorch_model.bin can run code)"
        )
    raise LmlabError(f"{directory}: no {WEIGHTS_NAME} (nor a sharded model.safetensors.index.json)")


_QUANT_STATE = ".weight.quant_state.bitsandbytes__"


def _config_dtype(directory: Path) -> str:
    cfg = read_json_object(directory / "config.json")
    name = cfg.get("dtype", cfg.get("torch_dtype"))
    return name if name in FLOAT_DTYPE_NAMES else "float32"


def _bnb_layers(directory: Path, settings: dict, header: dict, get_tensor) -> dict[str, dict]:
    """Layer entries (the format of ``lmlab_quant.json``) of the quantized layers in a transformers +
    bitsandbytes checkpoint: 4-bit layers by their quant-state tensor, int8 ones by ``SCB``."""
    where = f"{directory}/config.json"
    method = settings["method"]
    four = {k.split(_QUANT_STATE)[0] for k in header if _QUANT_STATE in k}
    eight = {k.removesuffix(".SCB") for k in header if k.endswith(".SCB")}
    found, other = (eight, four) if method == INT8_METHOD else (four, eight)
    if other:
        kind = "4-bit quant states" if method == INT8_METHOD else "int8 SCB scales"
        raise LmlabError(
            f"{where}: quantization_config says {method} but the weights hold {kind} ({sorted(other)[0]})"
        )
    if not found:
        raise LmlabError(
            f"{where}: quantization_config says {method} but the weights hold no quantized layer"
        )
    layers = {}
    for name in sorted(found):
        bias = f"{name}.bias" in header
        if method == INT8_METHOD:
            dtype, shape = header.get(f"{name}.weight", (None, None))
            if dtype != "I8" or len(shape) != 2:
                raise LmlabError(
                    f"{directory}: tensor {name}.weight must be a 2-D int8 weight beside {name}.SCB"
                )
            bias_dtype = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(
                header.get(f"{name}.bias", ("",))[0]
            )
            layers[name] = {
                "kind": "linear8bit",
                "in_features": shape[1],
                "out_features": shape[0],
                "bias": bias,
                "weight_dtype": bias_dtype or _config_dtype(directory),
                "threshold": settings["threshold"],
            }
            continue
        keys = [k for k in header if k.startswith(f"{name}{_QUANT_STATE}")]
        state = _read_quant_state(get_tensor(keys[0]), f"{directory}: tensor {keys[0]}")
        if len(state["shape"]) != 2:
            raise LmlabError(
                f"{directory}: tensor {keys[0]}: a linear weight has 2 dimensions, got {state['shape']}"
            )
        if state["quant_type"] != method or ("nested_offset" in state) != settings["double_quant"]:
            dq = "with" if "nested_offset" in state else "without"
            raise LmlabError(
                f"{directory}: tensor {keys[0]} is {state['quant_type']} {dq} double quantization, but "
                f"quantization_config says {method}, bnb_4bit_use_double_quant {str(settings['double_quant']).lower()}"
            )
        layers[name] = {
            "kind": "linear4bit",
            "in_features": state["shape"][1],
            "out_features": state["shape"][0],
            "bias": bias,
            "weight_dtype": _dtype_name(state["dtype"]),
            "quant_type": state["quant_type"],
            "block_size": state["blocksize"],
            "double_quant": "nested_offset" in state,
            "compute_dtype": settings["compute_dtype"],
        }
    return layers


def _open_headers(stack, files: list[Path]) -> tuple[dict, dict]:
    from safetensors import safe_open

    header, handles = {}, {}
    for path in files:
        f = stack.enter_context(safe_open(str(path), "pt"))
        for k in f.keys():  # noqa: SIM118 (not iterable)
            if k in header:
                raise LmlabError(f"{path}: tensor {k} is stored twice (also in {handles[k][0]})")
            header[k] = (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape())
            handles[k] = (path, f)
    return header, handles


def _load_transformers_dir(directory: Path, qc: dict, model: nn.Module | None, device) -> nn.Module:
    """:func:`load_quantized` of a directory transformers + bitsandbytes ``save_pretrained`` wrote."""
    import contextlib

    from safetensors import SafetensorError
    from safetensors.torch import _remove_duplicate_names

    settings = read_bnb_config(qc, f"{directory}/config.json")
    files = _weight_files(directory)
    try:
        with contextlib.ExitStack() as stack:
            header, handles = _open_headers(stack, files)

            def get_tensor(key: str) -> torch.Tensor:
                return handles[key][1].get_tensor(key)

            layers = _bnb_layers(directory, settings, header, get_tensor)
            for name, lm in layers.items():
                _check_layer_meta(directory / "config.json", name, lm)
            if model is None:
                stack.close()
                return _load_transformers_streaming(directory, qc, files, layers, device)
            model, shells = _build_quantized_shell(directory, layers, model)
            for name, lm in layers.items():
                where = handles.get(f"{name}.weight", (files[0],))[0]
                _check_layer_tensors(where, get_tensor, header, name, lm, shells[name], "its quant state")
            _check_float_tensors(files[0], model, header, shells)
            state = {k: get_tensor(k) for k in header}
    except SafetensorError as e:
        raise LmlabError(f"{directory}: damaged or not a safetensors file ({e})") from None
    expected = model.state_dict()
    aliases = {
        a for group in _remove_duplicate_names(expected, preferred_names=list(state)).values() for a in group
    }
    for key, t in state.items():  # load_state_dict's own message is many lines
        ref = expected.get(key)
        if ref is not None and ref.is_floating_point() and tuple(t.shape) != tuple(ref.shape):
            raise LmlabError(
                f"{directory}: tensor {key} has shape {list(t.shape)}, the model expects {list(ref.shape)}"
            )
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in aliases]
    if missing or unexpected:
        what = f"lacks {missing[0]}" if missing else f"has {unexpected[0]}, which the model does not"
        n = len(missing) + len(unexpected)
        raise LmlabError(f"{directory}: the weights do not match the model ({what}; {n} key(s) in all)")
    if getattr(model, "config", None) is not None and hasattr(model.config, "quantization_config"):
        model.config.quantization_config = qc
    _check_scales(files[0], shells)
    model.to(device)
    return mark_quantized(model.eval())


def _load_transformers_streaming(
    directory: Path, qc: dict, files: list[Path], layers: dict, device
) -> nn.Module:
    """A transformers + bitsandbytes directory into a meta-device skeleton, layer by layer."""
    from lmlab.models.presets import read_hf_config
    from lmlab.quant.streaming import load_quantized_model

    model = load_quantized_model(
        read_hf_config(directory), files, layers, device=device, described_by="its quant state"
    )
    if getattr(model, "config", None) is not None and hasattr(model.config, "quantization_config"):
        model.config.quantization_config = qc
    return mark_quantized(model)


def load_config(directory: str | os.PathLike) -> Config | None:
    """The :class:`Config` a quantized directory was written with (None if it was not recorded); for a
    transformers + bitsandbytes directory, the one its ``quantization_config`` describes."""
    directory = Path(directory)
    path = directory / META_NAME
    if not path.is_file() and (qc := _read_quantization_config(directory)) is not None:
        s = read_bnb_config(qc, f"{directory}/config.json")
        skip = tuple(s["skip_modules"]) if s["skip_modules"] is not None else ("lm_head",)
        if s["method"] == INT8_METHOD:
            return config_for(INT8_METHOD)(threshold=s["threshold"], skip_modules=skip)
        compute = None if s["compute_dtype"] is None else getattr(torch, s["compute_dtype"])
        return config_for(s["method"])(
            double_quant=s["double_quant"], compute_dtype=compute, skip_modules=skip
        )
    meta = _read_meta(directory)
    if meta.get("config") is None:
        return None
    try:
        return config_from_json(meta["config"])
    except (TypeError, ValueError, AttributeError) as e:
        raise LmlabError(
            f'{path}: bad "config" ({str(e).splitlines()[0] if str(e) else type(e).__name__})'
        ) from None
