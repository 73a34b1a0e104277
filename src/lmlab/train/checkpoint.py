"""Checkpoints that survive a kill: atomic, checksummed, loaded without running pickled code.

``RUN_DIR/checkpoints/step-00000100/`` holds

    model.safetensors   the model's state dict (tied tensors stored once per name)
    optimizer.pt        the optimizer's state dict       (torch.load(weights_only=True))
    state.pt            scheduler state and RNG states   (torch.load(weights_only=True))
    trainer.json        step, tokens seen, loss, the data position
    config.json         the model's ``transformers`` config, as ``save_pretrained`` writes it
    generation_config.json   its generation config, where the model generates (not BERT)
    manifest.json       sha256 and size of every file above, written last

With ``config.json`` beside ``model.safetensors`` a checkpoint loads as Hugging Face Trainer's
``checkpoint-N/`` does: ``AutoModelForSeq2SeqLM.from_pretrained("runs/r/checkpoints/step-00000100")``.
Checkpoints written before lmlab saved it have no ``config.json``; they still verify and resume
(the manifest lists what each one holds, and :data:`FILES` names only what every one must hold).

The directory is built under a temporary name and renamed into place (:func:`lmlab.io.atomic_dir`),
so a killed writer leaves either the previous checkpoint set or a complete new one.  A checkpoint
whose manifest is missing or whose files do not match it is reported by name and skipped in
favour of the one before it.  The last ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from lmlab.errors import LmlabError
from lmlab.io import atomic_dir, sha256_file

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
# Every checkpoint holds these; a manifest that leaves one out (``"files": {}``) does not verify.
FILES = ("model.safetensors", "optimizer.pt", "state.pt", "trainer.json")
_NAME = re.compile(r"^step-(\d{8,})$")


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every checkpoint directory, oldest first (temporary dirs excluded)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def _plain_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (tied embeddings); give each name its own copy.
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        v = v.detach().cpu()
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone().contiguous() if ptr in seen or not v.is_contiguous() else v
        seen.add(ptr)
    return out


def hf_config_files(model: torch.nn.Module) -> dict[str, str]:
    """``{"config.json": ..., "generation_config.json": ...}``: the texts ``model.save_pretrained``
    writes beside the weights (the config with ``architectures`` and ``dtype`` filled in as it
    fills them; the generation config only for a model that generates).  The model is left as it is."""
    import copy

    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__.removeprefix("FSDP")]
    p = next(model.parameters(), None)
    if p is not None:
        config.dtype = str(p.dtype).split(".")[1]
    files = {"config.json": config.to_json_string(use_diff=True)}
    gen = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", lambda: False)
    if gen is not None and can_generate():
        files["generation_config.json"] = gen.to_json_string(use_diff=True)
    return files


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    extra_state: dict[str, Any],
    trainer: dict[str, Any],
    keep: int,
    hf_files: dict[str, str] | None = None,
) -> Path:
    """Write the checkpoint of ``step`` atomically, then delete all but the newest ``keep``.

    ``hf_files`` (from :func:`hf_config_files`) are written beside the weights and checksummed
    with the rest, so that the directory loads with ``from_pretrained``.
    """
    from safetensors.torch import save_file

    path = checkpoint_dir(run_dir, step)
    with atomic_dir(path) as tmp:
        # metadata {"format": "pt"}: what save_pretrained writes and from_pretrained checks for.
        save_file(_plain_state_dict(model_state), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name, text in (hf_files or {}).items():
            (tmp / name).write_text(text)
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(extra_state, tmp / "state.pt")
        # finite: the loop checked the loss and the weights before this save (lmlab.train.loop).
        trainer = {"step": step, **trainer, "finite": True}
        (tmp / "trainer.json").write_text(json.dumps(trainer, indent=2) + "\n")
        files = sorted(p.name for p in tmp.iterdir())
        manifest = {
            name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size} for name in files
        }
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": manifest}, indent=2) + "\n")
    for _, old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def verify_checkpoint(path: Path) -> str | None:
    """None when every file matches the manifest, else what is wrong, in a few words.

    The manifest must list every file of :data:`FILES` with an integer size and a hex digest, and
    ``trainer.json`` must hold an integer step: a hand-edited or foreign manifest is never "good".
    """
    m = path / MANIFEST
    if not m.is_file():
        return f"{MANIFEST} is missing"
    try:
        manifest = json.loads(m.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        return f"{MANIFEST} is unreadable"
    if not isinstance(manifest, dict):
        return f"{MANIFEST} is unreadable (its files entry is not an object)"
    for name in FILES:
        if name not in manifest:
            return f"{MANIFEST} does not list {name}"
    for name, want in manifest.items():
        ok = (
            isinstance(want, dict)
            and isinstance(want.get("bytes"), int)
            and isinstance(want.get("sha256"), str)
        )
        if not ok or "/" in name or name.startswith("."):
            return f"{MANIFEST} has a malformed entry for {name!r}"
        p = path / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != want["bytes"]:
            return f"{name} is truncated ({p.stat().st_size} of {want['bytes']} bytes)"
        if sha256_file(p) != want["sha256"]:
            return f"{name} fails its checksum"
    try:
        trainer = json.loads((path / "trainer.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "trainer.json is unreadable"
    if not isinstance(trainer, dict) or not isinstance(trainer.get("step"), int):
        return "trainer.json has no integer step"
    loss = trainer.get("loss")
    if isinstance(loss, int | float) and not math.isfinite(loss):
        return f"its training loss is {loss}"
    return None


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The parts of a verified checkpoint: ``model``, ``optimizer``, ``state``, ``trainer``."""
    from safetensors.torch import load_file

    return {
        "model": load_file(str(path / "model.safetensors"), device=str(map_location)),
        "optimizer": torch.load(path / "optimizer.pt", map_location=map_location, weights_only=True),
        "state": torch.load(path / "state.pt", map_location="cpu", weights_only=True),
        "trainer": json.loads((path / "trainer.json").read_text()),
        "path": path,
    }


def latest_checkpoint(run_dir: str | Path, log=None) -> Path | None:
    """The newest checkpoint that verifies; a corrupt newer one is named and skipped."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    found = list_checkpoints(run_dir)
    for _, path in reversed(found):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        log(f"lmlab pretrain: checkpoint {path} is corrupt ({problem}); falling back to the one before it")
    if found:
        raise LmlabError(f"no usable checkpoint in {Path(run_dir) / CHECKPOINTS}: every one is corrupt")
    return None


def last_checked(run_dir: str | Path) -> Path | None:
    """The newest checkpoint whose weights and loss were checked finite before it was saved."""
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            if json.loads((path / "trainer.json").read_text()).get("finite") is True:
                return path
        except (OSError, ValueError, AttributeError):
            continue
    return None
