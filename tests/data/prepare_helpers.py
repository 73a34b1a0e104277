"""Small corpora and directories for the ``prepare`` tests: generated, so they need no download."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = [
    "the",
    "sea",
    "ship",
    "whale",
    "captain",
    "harpoon",
    "ocean",
    "voyage",
    "sailor",
    "mast",
    "deck",
    "storm",
    "wind",
    "rope",
    "sail",
    "boat",
    "island",
    "harbour",
    "wave",
    "tide",
    "anchor",
    "crew",
    "cabin",
    "night",
    "morning",
    "star",
    "compass",
    "chart",
    "map",
    "north",
    "south",
    "east",
    "west",
    "long",
    "short",
    "old",
    "new",
    "great",
    "small",
    "white",
    "dark",
    "cold",
    "warm",
    "deep",
    "wide",
    "calm",
    "wild",
]


def english_docs(n: int, seed: int = 0, words: int = 40) -> list[str]:
    """``n`` documents of made-up English prose (a ~60-word vocabulary, punctuation, digits)."""
    r = random.Random(seed)
    docs = []
    for i in range(n):
        body = " ".join(r.choice(WORDS) for _ in range(r.randint(words // 2, words)))
        docs.append(f"{body.capitalize()}, day {i} of {r.randint(1, 999)}.")
    return docs


def write_corpus(path: Path, n: int, seed: int = 0, words: int = 40) -> Path:
    """A plain-text corpus of ``n`` documents separated by blank lines."""
    path.write_text("\n\n".join(english_docs(n, seed, words)) + "\n", encoding="utf-8")
    return path


def fake_run_dir(d: Path) -> Path:
    """What output_kind() calls a training run: a run config.json and a checkpoints/ directory."""
    (d / "checkpoints").mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"config": {"objective": "span"}, "resolved": {}}))
    (d / "metrics.csv").write_text("step,loss\n1,9.0\n")
    return d


def fake_model_dir(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"model_type": "t5"}))
    (d / "model.safetensors").write_bytes(b"\0" * 64)
    return d


def fake_quantized_dir(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "lmlab_quant.json").write_text(json.dumps({"method": "nf4"}))
    (d / "model.safetensors").write_bytes(b"\0" * 64)
    return d


def dead_pid() -> int:
    """A PID no process can have: above the kernel's limit."""
    limit = Path("/proc/sys/kernel/pid_max")
    return (int(limit.read_text()) if limit.exists() else 1 << 22) + 12345


def tree_entries(root: Path) -> list[str]:
    """Every path under ``root``, directories too (tree_hashes sees only files)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))
