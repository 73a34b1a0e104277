"""Shared fixtures: real text from ../shared/corpora when present, and the always-present default corpus."""

from __future__ import annotations

from pathlib import Path

import pytest

CORPORA = Path(__file__).resolve().parents[2] / "shared" / "corpora"


@pytest.fixture(scope="session")
def corpus_file():
    """``corpus_file(name)``: a file of the shared public-domain corpora, or a clean skip without it."""

    def get(name: str) -> Path:
        p = CORPORA / name
        if not p.is_file():
            pytest.skip(f"{p} not present (the shared corpora are optional)")
        return p

    return get


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Never write into the user's ~/.cache from tests; one cache per session keeps it fast.
    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path_factory.getbasetemp() / "lmlab-cache"))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip cleanly on a machine without CUDA (CI, laptops)."""
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in gpu_items:
        item.add_marker(skip)
