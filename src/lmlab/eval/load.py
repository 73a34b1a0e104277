"""Any model a user has, loaded for evaluation or generation in one call: :func:`load_for_eval`.

MODEL is a run's ``final/``; a checkpoint ``RUN/checkpoints/step-N/`` (its weights and
``config.json``, as Hugging Face Trainer's ``checkpoint-N/``; its tokenizer is the run's, two levels
up); an ``lmlab quantize`` output or a transformers + bitsandbytes directory (loaded by
:func:`lmlab.quant.load_quantized`, never re-quantized); or any Hugging Face model directory that
``from_pretrained`` loads, including model types lmlab does not train (OPT, Qwen2, ...: the class
is :func:`lmlab.models.families.model_class`'s, the scoring rules
:func:`lmlab.models.families.scoring_family`'s).

Every way this can go wrong is one line (:class:`lmlab.errors.LmlabError`): a missing path, a
training run instead of a model in it, a directory holding no model, damaged weights (refused by
:func:`lmlab.models.presets.load_pretrained` / ``load_quantized``), a model without a
language-modelling head, a tokenizer with more ids than the model has embedding rows.

    from lmlab.eval.load import load_for_eval
    m = load_for_eval("runs/gpt/final", dtype="bfloat16")
    print(m.description)          # GPT2LMHeadModel (gpt2, 1.3 M parameters, bfloat16)
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError

__all__ = ["DTYPES", "Loaded", "load_for_eval", "resolve_device", "resolve_dtype"]

#: The ``dtype`` names :func:`load_for_eval` takes.
DTYPES = ("float32", "bfloat16", "float16")
_STEP = re.compile(r"step-\d+")


@dataclass
class Loaded:
    """A model ready to score or generate with.

    ``model``: in eval mode on its device; ``tokenizer``: a ``transformers`` tokenizer whose ids fit
    the model's embeddings; ``family``: :func:`~lmlab.models.families.scoring_family`'s answer, and
    ``kind`` its ``"decoder"`` / ``"encoder"`` / ``"encoder-decoder"``; ``quantized``: None, or the
    quantized layers' format (``"nf4"``, ``"fp4"``, ``"int4"``, ``"int8"``; several joined by ``+``);
    ``settings``: the run settings it was trained with (``seq_len``, ``objective``; {} when unknown);
    ``description``: one line for a report.
    """

    model: Any
    tokenizer: Any
    family: Any
    kind: str
    path: Path
    quantized: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    @property
    def device(self) -> Any:
        from lmlab.eval.scoring import model_device

        return model_device(self.model)

    @property
    def dtype(self) -> Any:
        """The dtype of the model's floating-point parameters (its embeddings' for a quantized model)."""
        return _float_dtype(self.model)


def resolve_device(device: Any = None) -> Any:
    """``device`` as a ``torch.device``: None is ``cuda`` when available, else ``cpu``; an unknown
    name or an absent accelerator is a one-line error."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise LmlabError(f"unknown device {device!r} (expected cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LmlabError(f"device {device!r}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LmlabError(
                f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise LmlabError(f"device {device!r}: MPS is not available on this machine")
    return dev


def resolve_dtype(dtype: Any, device: Any) -> Any:
    """The ``torch.dtype`` for ``dtype`` (a name of :data:`DTYPES`, a ``torch.dtype`` or None: keep
    the loaded one) on ``device``; float16 on a CPU is refused (its matmuls are slow or missing)."""
    import torch

    if dtype is None:
        return None
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise LmlabError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if name == "float16" and torch.device(device).type == "cpu":
        raise LmlabError(
            "dtype float16 needs a GPU (float16 on a CPU is slow or unsupported); use bfloat16 or float32"
        )
    return getattr(torch, name)


def load_for_eval(
    path: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | Any | None = None,
    device: Any = None,
    dtype: Any = None,
) -> Loaded:
    """Load the model at ``path`` and its tokenizer for evaluation.

    ``tokenizer``: a tokenizer directory or file (or a loaded ``transformers`` tokenizer); by default
    the model directory's, else (a checkpoint) the run's.  ``device``: None is CUDA when available,
    else the CPU.  ``dtype``: None keeps the dtype the model loads in (float32 on a CPU: a
    half-precision checkpoint is widened), or ``"float32"`` / ``"bfloat16"`` / ``"float16"``; a
    quantized model keeps its quantized layers, and only its other floating-point tensors follow
    ``dtype``.
    """
    import torch

    d = _model_dir(path)
    dev = resolve_device(device)
    want = resolve_dtype(dtype, dev)
    checkpoint = _is_checkpoint(d)
    if checkpoint:
        _verify_checkpoint_model(d)
    quantized_dir = (d / "lmlab_quant.json").is_file() or _has_quantization_config(d)
    if quantized_dir:
        from lmlab.quant import load_quantized

        model = load_quantized(d, device=dev)
    else:
        from lmlab.models.families import model_class
        from lmlab.models.presets import load_pretrained, read_hf_config

        model = load_pretrained(model_class(read_hf_config(d)), d)
    model.eval()
    _check_lm_head(model, d)
    if want is None and dev.type == "cpu":
        want = torch.float32
    if want is not None:
        cast_floats_(model, want)
    model.to(dev)

    tok = _load_tokenizer(d, tokenizer, checkpoint)
    _check_fits(tok, model, d)

    from lmlab.models.families import scoring_family
    from lmlab.train.state import model_settings

    family = scoring_family(model)
    settings = model_settings(d, model.config) or (_run_settings(d.parents[1]) if checkpoint else {})
    quant = quant_format(model)
    return Loaded(
        model=model,
        tokenizer=tok,
        family=family,
        kind=family.kind,
        path=d,
        quantized=quant,
        settings=settings,
        description=describe(model),
    )


# ------------------------------------------------------------------------------------ what is there


def _model_dir(path: str | os.PathLike) -> Path:
    from lmlab.io import output_kind

    d = Path(path)
    if not d.exists():
        raise LmlabError(f"{path} does not exist")
    if not d.is_dir():
        raise LmlabError(
            f"{path} is not a directory (pass a model directory: a run's final/, a checkpoint step-N/, ...)"
        )
    kind = output_kind(d)
    if kind == "run":
        raise LmlabError(f"{path} is a training run; pass RUN/final or RUN/checkpoints/step-N")
    if kind == "prepared":
        raise LmlabError(f"{path} is a prepared data directory, not a model")
    if kind is None:
        older = " (a checkpoint written before lmlab saved one)" if _is_checkpoint(d) else ""
        raise LmlabError(
            f"{path} holds no model: no config.json{older}; pass a run's final/, a checkpoint step-N/, "
            "an lmlab quantize output or a Hugging Face model directory"
        )
    return d


def _is_checkpoint(d: Path) -> bool:
    return d.parent.name == "checkpoints" and _STEP.fullmatch(d.name) is not None


def _verify_checkpoint_model(d: Path) -> None:
    """The checkpoint's weights and config against its manifest (when it has one): a checkpoint that
    was cut short or edited is refused before its tensors are read.  The optimizer state is not
    read, so it is not hashed."""
    from lmlab.io import sha256_file

    m = d / "manifest.json"
    if not m.is_file():
        return
    try:
        files = json.loads(m.read_text(encoding="utf-8"))["files"]
        entries = {
            n: (int(files[n]["bytes"]), str(files[n]["sha256"]))
            for n in ("model.safetensors", "config.json")
            if n in files
        }
    except (ValueError, KeyError, TypeError):
        raise LmlabError(f"{m} is unreadable") from None
    for name, (size, digest) in entries.items():
        p = d / name
        if not p.is_file():
            raise LmlabError(f"{d}: {name} is missing")
        if p.stat().st_size != size:
            raise LmlabError(f"{d}: {name} is truncated ({p.stat().st_size} of {size} bytes)")
        if sha256_file(p) != digest:
            raise LmlabError(f"{d}: {name} fails its checksum (manifest.json)")


def _has_quantization_config(d: Path) -> bool:
    from lmlab.io import read_json_object

    try:
        return bool(read_json_object(d / "config.json").get("quantization_config"))
    except FileNotFoundError:
        return False


def _run_settings(run_dir: Path) -> dict[str, Any]:
    """A checkpoint's training settings from its run's config.json ({} when unreadable)."""
    try:
        cfg = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
        out = {"seq_len": cfg["resolved"].get("seq_len"), "objective": cfg["config"].get("objective")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}
    return {k: v for k, v in out.items() if v is not None}


# ------------------------------------------------------------------------------------------ checks


def _check_lm_head(model: Any, d: Path) -> None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise LmlabError(
            f"{d}: {type(model).__name__} has no language-modelling head (save the model with its LM head: "
            "...ForCausalLM, ...ForMaskedLM or ...ForConditionalGeneration)"
        )


def _load_tokenizer(d: Path, tokenizer: Any, checkpoint: bool) -> Any:
    from lmlab.data import load_tokenizer
    from lmlab.data.tokenizer import HF_TOKENIZER_FILES

    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer  # already a tokenizer object
    if tokenizer is not None:
        if not Path(tokenizer).exists():
            raise LmlabError(f"tokenizer {tokenizer} does not exist")
        return load_tokenizer(tokenizer)
    places = [d] + ([d.parents[1]] if checkpoint else [])
    for p in places:
        if any((p / n).is_file() for n in HF_TOKENIZER_FILES) or (p / "tokenizer.model").is_file():
            return load_tokenizer(p)
    raise LmlabError(f"{d} has no tokenizer; pass --tokenizer DIR")


def _check_fits(tok: Any, model: Any, d: Path) -> None:
    emb = model.get_input_embeddings()
    rows = int(getattr(emb, "num_embeddings", 0) or emb.weight.shape[0])
    if len(tok) > rows:
        raise LmlabError(
            f"{d}: the tokenizer has {len(tok)} ids but the model's input embeddings have {rows} rows; "
            "pass the tokenizer the model was trained with (--tokenizer DIR)"
        )


# --------------------------------------------------------------------------------- dtype and naming


def _quantized_modules() -> tuple[type, ...]:
    from lmlab.quant.modules import Linear4bit, Linear8bit

    return (Linear4bit, Linear8bit)


def _keep_fp32_names(model: Any, dtype: Any) -> tuple[str, ...]:
    """Module names transformers keeps in float32 when it loads ``model`` in ``dtype``
    (``_keep_in_fp32_modules`` for float16, ``_keep_in_fp32_modules_strict`` for both half types:
    T5's ``wo``, whose activations overflow float16)."""
    import torch

    names: set[str] = set()
    if dtype == torch.float16:
        names |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    if dtype in (torch.float16, torch.bfloat16):
        names |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    return tuple(sorted(names))


def cast_floats_(model: Any, dtype: Any) -> Any:
    """Cast ``model``'s floating-point parameters and buffers to ``dtype`` in place, as loading it in
    ``dtype`` would: quantized layers (lmlab's ``Linear4bit`` / ``Linear8bit``) are left whole, and
    the modules transformers keeps in float32 for half types stay float32.  Returns ``model``."""
    import torch

    quantized = _quantized_modules()
    keep = _keep_fp32_names(model, dtype)
    for name, module in model.named_modules():
        if isinstance(module, quantized):  # its codes, scales and bias stay as quantized
            continue
        target = torch.float32 if keep and any(k in name.split(".") for k in keep) else dtype
        for p in module.parameters(recurse=False):
            if p.is_floating_point() and p.dtype != target:
                p.data = p.data.to(target)  # the same Parameter: tied weights stay tied
        for bname, b in list(module.named_buffers(recurse=False)):
            if b is not None and b.is_floating_point() and b.dtype != target:
                module._buffers[bname] = b.to(target)
    return model


def _float_dtype(model: Any) -> Any:
    import torch

    quantized = _quantized_modules()
    inside = {id(p) for m in model.modules() if isinstance(m, quantized) for p in m.parameters()}
    for p in model.parameters():
        if p.is_floating_point() and id(p) not in inside:
            return p.dtype
    return torch.get_default_dtype()


def quant_format(model: Any) -> str | None:
    """The format of ``model``'s quantized layers (``"nf4"``, ``"int8"``, ... joined by ``+``), or None."""
    from lmlab.quant.modules import Linear4bit, Linear8bit

    found: list[str] = []
    for m in model.modules():
        f = m.quant_type if isinstance(m, Linear4bit) else "int8" if isinstance(m, Linear8bit) else None
        if f is not None and f not in found:
            found.append(f)
    return "+".join(found) or None


def count_parameters(model: Any) -> int:
    """The model's weights, each counted once (tied ones too); a quantized layer counts its
    ``out × in`` weights (held as buffers), not its packed bytes."""
    quantized = _quantized_modules()
    n = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    return n + sum(
        int(m.in_features) * int(m.out_features) for m in model.modules() if isinstance(m, quantized)
    )


def human_count(n: int) -> str:
    """``1234567`` -> ``"1.2 M"``."""
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return str(n)


def describe(model: Any) -> str:
    """One line: ``"GPT2LMHeadModel (gpt2, 1.3 M parameters, float32)"``; a quantized model names its
    format first: ``"... NF4 + float32)"``."""
    dtype = str(_float_dtype(model)).removeprefix("torch.")
    quant = quant_format(model)
    what = f"{quant.upper()} + {dtype}" if quant else dtype
    mtype = getattr(model.config, "model_type", "?")
    return f"{type(model).__name__} ({mtype}, {human_count(count_parameters(model))} parameters, {what})"
