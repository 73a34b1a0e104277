"""Data parallelism: two gloo processes under torchrun train exactly what one process does."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from lmlab_train_fixtures import write_prepared  # noqa: E402

pytestmark = pytest.mark.slow
# `python -m lmlab pretrain` / `torchrun -m lmlab pretrain` run the same configure/run pair.
ENTRY = str(Path(__file__).parent / "pretrain_entry.py")


def _losses(run_dir: Path) -> list[tuple[int, float, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [(int(r["step"]), float(r["loss"]), r["val_loss"]) for r in csv.DictReader(f)]


@pytest.mark.parametrize(
    "objective,model,engine",
    [
        ("span", "t5-tiny", "ddp"),
        ("causal", "gpt-tiny", "ddp"),
        ("span", "t5-tiny", "fsdp"),
        ("causal", "llama-tiny", "fsdp"),
    ],
)
def test_two_processes_match_one(tmp_path, objective, model, engine):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    data = write_prepared(tmp_path / "data")
    args = ["--data", str(data), "--objective", objective, "--model", model, "--steps", "4",
            "--batch-size", "8", "--seq-len", "32", "--eval-every", "2", "--eval-batches", "2",
            "--save-every", "2", "--workers", "0", "--precision", "fp32", "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, ENTRY, *args, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         ENTRY, *args, "--out", str(tmp_path / "two"), *(["--fsdp"] if engine == "fsdp" else [])],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [s for s, _, _ in a] == [s for s, _, _ in b] == [1, 2, 3, 4]
    for (_, la, va), (_, lb, vb) in zip(a, b, strict=True):
        assert la == pytest.approx(lb, rel=1e-4)
        assert (va == "") == (vb == "") and (va == "" or float(va) == pytest.approx(float(vb), rel=1e-4))
    assert (tmp_path / "two" / "final" / "model.safetensors").is_file()
    # Each rank's dropout generator is saved (seeded per rank, so they differ) for a resume to continue.
    import torch

    state = torch.load(tmp_path / "two" / "checkpoints" / "step-00000002" / "state.pt", weights_only=True)
    ranks = state["rng_ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["cpu"], ranks[1]["cpu"])
