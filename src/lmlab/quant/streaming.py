"""Quantize and load models bigger than memory: a meta-device skeleton, safetensors shards streamed in.

    from lmlab.quant import NF4Config
    from lmlab.quant.streaming import quantize_pretrained, load_quantized_streaming
    model, report = quantize_pretrained("llama-7b/", NF4Config())   # peak RSS ~ the NF4 model's size
    model = load_quantized_streaming("llama-7b-nf4/")                # no float model built first

``cls.from_pretrained(dir)`` then :func:`lmlab.quant.quantize_` holds the whole float model (28 GB
for a 7B model in fp32) before the first layer is quantized. :func:`quantize_pretrained` builds the
model's skeleton with its parameters on the ``meta`` device (accelerate's
``init_empty_weights(include_buffers=False)``: buffers such as RoPE's ``inv_freq`` are computed as
the model's ``__init__`` computes them), asks :func:`quantize_` which layers it would quantize (its
own selection rules, through its ``filter_fn`` hook, quantizing nothing), then reads the
checkpoint (``model.safetensors`` or the shards of ``model.safetensors.index.json``, through
``safetensors.safe_open``) one tensor at a time: a quantized layer's weight is quantized as soon as
it arrives and its float copy dropped; every other tensor is put in place, cast as
``from_pretrained`` casts it. Each tensor is read with ``pread`` into memory of its own
(safetensors' ``backend="pread"``) rather than viewed in a memory map: a mapped shard's touched
pages count as resident until the shard is closed, which made the peak the quantized model plus a
whole shard (plus the embedding twice, view and copy); read this way it is the quantized model plus
the tensor in hand (bench/quant_memory.py measures it). The result is
bit-identical to ``quantize_(cls.from_pretrained(dir), config)``: state dict, tied weights,
non-persistent buffers, forward (tests/quant/test_streaming.py).

:func:`load_quantized_streaming` does the same for a directory written by
:func:`lmlab.quant.save_quantized`: every quantized layer is built from its stored tensors
(assigned, not copied into a randomly initialised float layer first), with the checks of
:func:`lmlab.quant.load_quantized`.

The dtype rule is ``from_pretrained``'s default (transformers 5: ``dtype="auto"``, the config's
``dtype``, else the first floating tensor's; transformers 4: the torch default), so a float16
checkpoint is quantized from float16 as ``lmlab quantize`` does today. Checkpoints in pickle
(``pytorch_model.bin``) cannot be read a tensor at a time (nor safely) and are refused in one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from lmlab.errors import LmlabError
from lmlab.quant import api
from lmlab.quant.api import Config, FilterFn, QuantReport, model_nbytes, quantize_
from lmlab.quant.modules import linear_weight

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"


# -------------------------------------------------------------------------------- the checkpoint


def checkpoint_files(model_dir: str | os.PathLike) -> list[Path]:
    """The safetensors files of a ``save_pretrained`` directory, in the order to read them: the single
    ``model.safetensors``, or the shards its ``model.safetensors.index.json`` names (sorted)."""
    d = Path(model_dir)
    index = d / SAFE_INDEX_NAME
    if index.is_file():
        from lmlab.io import read_json_object

        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise LmlabError(f'{index}: must be a JSON object with a non-empty "weight_map"')
        names = sorted(set(weight_map.values()))
        for name in names:
            if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", ".."):
                raise LmlabError(f"{index}: bad shard name {name!r}")
            if not (d / name).is_file():
                raise LmlabError(f"{d / name}: is missing (named in {SAFE_INDEX_NAME})")
        return [d / name for name in names]
    if (d / SAFE_WEIGHTS_NAME).is_file():
        return [d / SAFE_WEIGHTS_NAME]
    if any(d.glob("pytorch_model*.bin")):
        raise LmlabError(
            f"{d}: has only pickled weights (pytorch_model.bin); streaming needs safetensors "
            "(re-save the model with save_pretrained, or quantize it without streaming)"
        )
    raise LmlabError(f"{d}: no {SAFE_WEIGHTS_NAME} or {SAFE_INDEX_NAME}")


@contextlib.contextmanager
def _open_shard(path: Path) -> Iterator[tuple[object, bool]]:
    """``(safe_open(path), whether its tensors own their memory)``.

    safetensors >= 0.6 can read each tensor with ``pread`` into memory of its own
    (``backend="pread"``): the shard is then never mapped into this process, its pages stay in the
    page cache (not resident memory), and a tensor's memory goes with the tensor. Older versions
    memory-map the file and hand out views of it; the shard's touched pages then count until it
    closes, and a tensor the model keeps must be copied out."""
    from safetensors import SafetensorError, safe_open

    try:
        try:
            handle, owned = safe_open(str(path), framework="pt", device="cpu", backend="pread"), True
        except TypeError:  # no backend= before safetensors 0.6
            handle, owned = safe_open(str(path), framework="pt", device="cpu"), False
        with handle as f:
            yield f, owned
    except SafetensorError as e:
        raise LmlabError(f"{path}: damaged or not a safetensors file ({e})") from None


def _first_float_dtype(files: list[Path]) -> torch.dtype | None:
    """transformers' ``get_state_dict_dtype`` on the first file: its first floating tensor's dtype."""
    names = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    with _open_shard(files[0]) as (f, _):
        for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            dtype = names.get(f.get_slice(key).get_dtype())
            if dtype is not None:
                return dtype
    return None


def default_dtype(config, files: list[Path]) -> torch.dtype:
    """The dtype ``cls.from_pretrained(dir)`` gives with no ``dtype`` argument (see the module docstring)."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        return torch.get_default_dtype()
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return _first_float_dtype(files) or torch.get_default_dtype()


# -------------------------------------------------------------------------------- the skeleton


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    was = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(was)


def empty_model(config, dtype: torch.dtype | None = None) -> nn.Module:
    """The model of ``config`` (:func:`lmlab.models.families.model_class`, the class every lmlab load
    uses) with its parameters on the ``meta`` device and its buffers computed on the CPU, as the
    model's ``__init__`` computes them; floats in ``dtype`` (default: torch's default dtype).
    Tied weights are tied (the meta parameters are shared)."""
    try:
        from accelerate import init_empty_weights
    except ImportError:  # pragma: no cover
        raise LmlabError("streaming a model needs the accelerate package (pip install accelerate)") from None
    from lmlab.models.families import model_class

    cls = model_class(config)
    with init_empty_weights(include_buffers=False), _default_dtype(dtype or torch.get_default_dtype()):
        model = cls(config)
    # init_empty_weights re-wraps every parameter it sees registered, which unties tied weights; tie
    # them again as from_pretrained does last.
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


# -------------------------------------------------------------------------------- streaming tensors in


def _split(name: str) -> tuple[str, str]:
    module, _, attr = name.rpartition(".")
    return module, attr


class _Targets:
    """Where each checkpoint key goes: the model's parameter and persistent-buffer names, the
    names that share one tensor (tied weights), and the dtype ``from_pretrained`` casts to."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, exclude: frozenset[str] = frozenset()) -> None:
        self.model = model
        self.prefix = getattr(model, "base_model_prefix", "") or ""
        # the tensors of the modules in ``exclude`` (quantized layers loaded whole) are not targets
        self.tensors: dict[str, torch.Tensor] = {
            k: v for k, v in model.state_dict(keep_vars=True).items() if _split(k)[0] not in exclude
        }
        by_id: dict[int, list[str]] = {}
        for name, t in self.tensors.items():
            by_id.setdefault(id(t), []).append(name)
        self.aliases = {name: by_id[id(t)] for name, t in self.tensors.items()}
        self.dtype_of = _dtype_plan(model, dtype)
        self.filled: set[str] = set()

    def resolve(self, key: str) -> str | None:
        """The model's name for checkpoint ``key`` (base-model prefix added or removed as
        ``from_pretrained`` does), or None for a key the model does not have."""
        if key in self.tensors:
            return key
        p = self.prefix
        if p and f"{p}.{key}" in self.tensors:
            return f"{p}.{key}"
        if p and key.startswith(f"{p}.") and key[len(p) + 1 :] in self.tensors:
            return key[len(p) + 1 :]
        return None

    def cast(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """``t`` in the dtype the model holds ``name`` in (floats only; integers are kept)."""
        ref = self.tensors[name]
        if not t.is_floating_point() or not ref.is_floating_point():
            return t
        return t.to(self.dtype_of(name, ref.dtype))

    def put(self, names: list[str], value: torch.Tensor) -> None:
        """Set every one of ``names`` (one tensor and its ties) to ``value``, a copy (not a view of the file)."""
        ref = self.tensors[names[0]]
        if isinstance(ref, nn.Parameter):
            value = nn.Parameter(value, requires_grad=ref.requires_grad and value.is_floating_point())
            value._is_hf_initialized = True  # as from_pretrained marks what it loaded
        for name in names:
            module_name, attr = _split(name)
            module = self.model.get_submodule(module_name)
            if isinstance(value, nn.Parameter):
                module._parameters[attr] = value
            else:
                module._buffers[attr] = value
            self.filled.add(name)

    def missing(self) -> list[str]:
        return sorted(n for n, t in self.tensors.items() if n not in self.filled and t.is_meta)


def _dtype_plan(model: nn.Module, dtype: torch.dtype):
    """``(name, dtype of the skeleton's tensor) -> dtype to load it in``: the skeleton's dtype, except
    where transformers' ``_keep_in_fp32_modules`` plan keeps a module in float32 (T5's ``wo`` in fp16)."""
    plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}
    if not plan:
        return lambda name, ref_dtype: ref_dtype
    from transformers.core_model_loading import build_glob_alternation

    alt, by_group, _ = build_glob_alternation(list(plan))

    def dtype_of(name: str, ref_dtype: torch.dtype) -> torch.dtype:
        m = alt.search(name)
        return plan[by_group[m.lastgroup]] if m is not None else ref_dtype

    return dtype_of


def _check_finite(model_dir: Path, name: str, t: torch.Tensor, kind: str) -> None:
    from lmlab.quant.kernels.cpu import all_finite  # float32: one pass, no (n,) bool temporary

    if t.is_floating_point() and not all_finite(t.reshape(-1) if t.is_contiguous() else t):
        bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
        raise LmlabError(f"{model_dir}: {kind} {name} contains {bad}; refusing to quantize a damaged model")


# -------------------------------------------------------------------------------- quantize


def _plan(model: nn.Module, config: Config, filter_fn: FilterFn | None) -> tuple[list[str], QuantReport]:
    """The layers :func:`quantize_` would quantize in ``model``, asked through its ``filter_fn`` hook
    with nothing quantized (its iteration, its default filter), and its report (for ``skipped``)."""
    if filter_fn is None:
        keep_float = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
        filter_fn = api._default_filter(config, api._output_head_names(model), keep_float)
    chosen: list[str] = []

    def record(module: nn.Module, name: str) -> bool:
        if filter_fn(module, name):
            chosen.append(name)
        return False

    dry = quantize_(model, config, record)
    return chosen, dry


def _float_nbytes(model: nn.Module, dtype_of) -> int:
    """:func:`lmlab.quant.api.model_nbytes` of the float model ``from_pretrained`` would build, from
    its skeleton: each tensor in the dtype it is loaded in (``dtype_of``), tied ones once (meta
    tensors have no storage to tell them apart by; shared tensor objects are the same test)."""
    seen: set[int] = set()
    total = 0
    named = list(model.named_parameters(remove_duplicate=False)) + list(
        model.named_buffers(remove_duplicate=False)
    )
    for name, t in named:
        if id(t) not in seen:
            seen.add(id(t))
            dtype = dtype_of(name, t.dtype) if t.is_floating_point() else t.dtype
            total += t.numel() * dtype.itemsize
    return total


def quantize_pretrained(
    model_dir: str | os.PathLike,
    config: Config,
    filter_fn: FilterFn | None = None,
    *,
    dtype: torch.dtype | None = None,
    check_finite: bool = True,
    inspect: Callable[[nn.Module], None] | None = None,
) -> tuple[nn.Module, QuantReport]:
    """``quantize_(cls.from_pretrained(model_dir), config, filter_fn)`` without ever holding the float model.

    ``model_dir``: a ``save_pretrained`` directory with safetensors weights (one file or shards).
    ``dtype``: the float dtype to load in (default: ``from_pretrained``'s rule, see the module
    docstring). ``check_finite``: refuse a NaN or Inf in any weight, in one line (as ``lmlab
    quantize`` does). ``inspect(skeleton)`` is called with the float model on the meta device before
    any tensor is read, to refuse early what needs only the architecture (``--skip-modules`` that
    match no layer: :func:`lmlab.quant.api.unmatched_skip_modules`). A weight the checkpoint lacks, or of the wrong shape, is a one-line
    :class:`LmlabError`, never a random fill. Returns ``(model in eval mode, report)``, both equal to
    what the non-streaming path gives.
    """
    from lmlab.models.presets import check_not_quantized, read_hf_config

    model_dir = Path(model_dir)
    check_not_quantized(model_dir)
    hf_config = read_hf_config(model_dir)
    files = checkpoint_files(model_dir)
    dtype = dtype or default_dtype(hf_config, files)
    hf_config.dtype = dtype  # what from_pretrained records
    model = empty_model(hf_config, dtype)
    if inspect is not None:
        inspect(model)
    builder = api._builder(config)
    chosen, dry = _plan(model, config, filter_fn)
    layers = {name: model.get_submodule(name) for name in chosen}
    targets = _Targets(model, dtype)
    float_bytes = _float_nbytes(model, targets.dtype_of)
    params = sum(linear_weight(m).numel() for m in layers.values())
    bytes_before = sum(
        m.weight.numel() * targets.dtype_of(f"{n}.weight", m.weight.dtype).itemsize for n, m in layers.items()
    )
    param_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    needs = {n: {a for a in ("weight", "bias") if getattr(m, a, None) is not None} for n, m in layers.items()}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    bytes_after = 0

    def quantize_layer(name: str) -> int:
        module = layers.pop(name)
        for attr, t in pending.pop(name).items():
            # the float module only lives until the builder has read it
            module._parameters[attr] = nn.Parameter(t, requires_grad=False)
        new = builder(module, config, f"{name}.weight")
        parent_name, attr = _split(name)
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
        return new.quantized_nbytes

    for path in files:
        with _open_shard(path) as (f, owned):
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                name = targets.resolve(key)
                if name is None or name in targets.filled:
                    continue  # a key the model does not have (from_pretrained ignores it too), or a tie
                raw = f.get_tensor(key)  # a view of the memory-mapped file
                ref = targets.tensors[name]
                if tuple(raw.shape) != tuple(ref.shape):
                    raise LmlabError(
                        f"{model_dir}: tensor {key} has shape {list(raw.shape)}, the model expects {list(ref.shape)}"
                    )
                if check_finite:
                    _check_finite(model_dir, name, raw, "weight" if name in param_names else "buffer")
                dtype = targets.dtype_of(name, ref.dtype) if ref.is_floating_point() else ref.dtype
                float_names = []
                for alias in targets.aliases[name]:
                    module_name, attr = _split(alias)
                    if module_name in layers and attr in ("weight", "bias"):
                        got = pending.setdefault(module_name, {})
                        got[attr] = raw.to(dtype)
                        targets.filled.add(alias)
                        if needs[module_name] <= got.keys():
                            bytes_after += quantize_layer(module_name)
                    else:
                        float_names.append(alias)
                if float_names:
                    kept = raw.to(dtype)
                    # a view of a mapped file is copied: the model must not keep the shard mapped
                    targets.put(
                        float_names, kept if owned or kept.data_ptr() != raw.data_ptr() else kept.clone()
                    )
                del raw
    missing = targets.missing()
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise LmlabError(
            f"{model_dir}: the weights lack {len(missing)} tensor(s) the model needs "
            f"({', '.join(missing[:3])}{more}); refusing to fill them with random values"
        )
    _load_generation_config(model, model_dir)
    report = dataclasses.replace(
        dry,
        layers=tuple(chosen),
        params=params,
        bytes_before=bytes_before,
        bytes_after=bytes_after,
        model_bytes_before=float_bytes,
        model_bytes_after=model_nbytes(model),
        skipped=tuple(n for n in dry.skipped if n not in set(chosen)),
    )
    return model.eval(), report


def _load_generation_config(model: nn.Module, model_dir: Path) -> None:
    """``generation_config.json`` as from_pretrained reads it (models that generate)."""
    if not (model_dir / "generation_config.json").is_file() or not hasattr(model, "generation_config"):
        return
    from transformers import GenerationConfig

    with contextlib.suppress(OSError, ValueError, json.JSONDecodeError):
        model.generation_config = GenerationConfig.from_pretrained(model_dir)


# -------------------------------------------------------------------------------- load


def _layer_keys(header_keys: list[str], layers: dict[str, dict]) -> dict[str, str]:
    """checkpoint key -> the quantized layer it belongs to (the longest layer name it starts with)."""
    owner: dict[str, str] = {}
    for key in header_keys:
        parts = key.split(".")
        for i in range(len(parts) - 1, 0, -1):
            name = ".".join(parts[:i])
            if name in layers:
                owner[key] = name
                break
    return owner


def load_quantized_model(
    hf_config,
    files: list[Path],
    layers: dict[str, dict],
    *,
    device: str | torch.device = "cpu",
    described_by: str = "lmlab_quant.json",
) -> nn.Module:
    """The model-building step of :func:`lmlab.quant.load_quantized`, without a float model first.

    ``hf_config``: the model's ``transformers`` config; ``files``: its safetensors files (one, or
    the shards); ``layers``: name -> the quantized layer's entry (``lmlab_quant.json``'s format,
    already checked; for a transformers + bitsandbytes directory, the entries its quant states give).
    The skeleton is built on the meta device (:func:`empty_model`, floats in torch's default dtype,
    as ``load_quantized`` builds the model); each quantized layer is built just before its tensors
    are read, checked as ``load_quantized`` checks them, and given them by assignment; every other
    tensor is put in place (tied weights re-tied), each read into memory of its own
    (:func:`_open_shard`). A missing, unexpected, mistyped or mis-shaped tensor is a
    one-line :class:`LmlabError`. Returns the model in eval mode on ``device``.
    """
    from lmlab.quant.serialization import _check_float_tensors, _check_layer_tensors, _check_scales, _shell

    files = [Path(p) for p in files]
    model = empty_model(hf_config)
    for name in layers:
        parent_name, attr = _split(name)
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
        except AttributeError:
            parent = None
        if parent is None or not hasattr(parent, attr):
            raise LmlabError(f"{files[0].parent}: the model has no module {name!r}")
    targets = _Targets(model, torch.get_default_dtype(), exclude=frozenset(layers))
    with contextlib.ExitStack() as stack:
        header, handles = _open_all(stack, files)

        def get_tensor(key: str) -> torch.Tensor:
            return handles[key][1].get_tensor(key)

        owner = _layer_keys(list(header), layers)
        _check_float_tensors(files[0], model, header, layers)
        shells = {}
        for name, layer_meta in layers.items():
            shell = _shell(layer_meta)  # built just before its tensors arrive: one layer's zeros at a time
            where = handles.get(f"{name}.weight", (files[0],))[0]
            _check_layer_tensors(where, get_tensor, header, name, layer_meta, shell, described_by)
            state = {k[len(name) + 1 :]: get_tensor(k) for k in header if owner.get(k) == name}
            _drop_row_format(state, shell, files[0].parent, name)
            try:
                shell.load_state_dict(state, strict=True, assign=True)
            except RuntimeError as e:
                msg = str(e).splitlines()[-1].strip()
                raise LmlabError(f"{where}: layer {name} does not match its tensors ({msg})") from None
            parent_name, attr = _split(name)
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, shell)
            shells[name] = shell
            del state
        for key, (_, shape) in header.items():
            if key in owner:
                continue
            name = targets.resolve(key)
            if name is None:
                raise LmlabError(f"{handles[key][0]}: does not match the model (unexpected tensor {key})")
            if name in targets.filled:
                continue  # a tied weight stored twice
            ref = targets.tensors[name]
            if list(shape) != list(ref.shape):
                raise LmlabError(
                    f"{handles[key][0]}: tensor {key} has shape {list(shape)}, the model expects {list(ref.shape)}"
                )
            targets.put(targets.aliases[name], targets.cast(name, get_tensor(key)))
    missing = targets.missing()
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise LmlabError(
            f"{files[0].parent}: the weights do not match the model (lacks {', '.join(missing[:3])}{more})"
        )
    _check_scales(files[0], shells)
    return model.to(device).eval()


def _open_all(stack: contextlib.ExitStack, files: list[Path]) -> tuple[dict, dict]:
    """(key -> (safetensors dtype, shape), key -> (file, its open handle)) over every file."""
    header: dict[str, tuple[str, list[int]]] = {}
    handles: dict[str, tuple[Path, object]] = {}
    for path in files:
        f, _ = stack.enter_context(_open_shard(path))
        for k in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            if k in handles:
                raise LmlabError(f"{path}: tensor {k} is stored twice (also in {handles[k][0]})")
            handles[k] = (path, f)
            header[k] = (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape())
    return header, handles


def _drop_row_format(state: dict[str, torch.Tensor], shell: nn.Module, directory: Path, name: str) -> None:
    """bitsandbytes' ``weight_format`` tag (0 = row, the only layout it writes for inference), where
    the layer does not keep one."""
    if "weight_format" in state and "weight_format" not in shell.state_dict():
        t = state.pop("weight_format")
        if t.numel() != 1 or int(t.reshape(-1)[0]) != 0:
            raise LmlabError(f"{directory}: tensor {name}.weight_format is not bitsandbytes' row format (0)")


def load_quantized_streaming(directory: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """:func:`lmlab.quant.load_quantized` for a Hugging Face model directory (one with a
    ``config.json``), with :func:`load_quantized_model` as the model-building step: the same files
    verified (``manifest.json``, ``lmlab_quant.json``), the same model, no float model built first."""
    from lmlab.quant.serialization import META_NAME, WEIGHTS_NAME, _read_meta, verify_manifest

    directory = Path(directory)
    if not (directory / META_NAME).is_file() or not (directory / WEIGHTS_NAME).is_file():
        raise LmlabError(
            f"{directory}: not a quantized model directory (needs {META_NAME} and {WEIGHTS_NAME})"
        )
    verify_manifest(directory)
    meta = _read_meta(directory)
    if not (directory / "config.json").is_file():
        raise LmlabError(f"{directory}: no config.json; pass the float model to load_quantized(dir, model)")
    from lmlab.models.presets import read_hf_config

    return load_quantized_model(
        read_hf_config(directory), [directory / WEIGHTS_NAME], meta["layers"], device=device
    )
