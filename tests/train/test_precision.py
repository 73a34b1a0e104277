"""lmlab.train.precision: which precision a run resolves to, and its autocast."""

from __future__ import annotations

import pytest
import torch

from lmlab.errors import LmlabError
from lmlab.train import PretrainConfig


def test_auto_precision_is_fp32_or_native_bf16(monkeypatch):
    from lmlab import runtime
    from lmlab.train import precision as loop

    cpu = torch.device("cpu")
    assert loop.resolve_precision("fp32", cpu) == "fp32" and loop.resolve_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr(runtime, "cpu_native_bf16", lambda: False)
    assert loop.resolve_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(runtime, "cpu_native_bf16", lambda: True)
    assert loop.resolve_precision("auto", cpu) == "bf16"
    with pytest.raises(LmlabError, match="unknown precision"):
        PretrainConfig(data=["x"], out="y", precision="fp16")


def test_autocast_is_bf16_only_when_asked():
    from lmlab.train.precision import autocast

    x = torch.randn(3, 4)
    with autocast(torch.device("cpu"), "bf16"):
        assert (x @ x.T).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), "fp32"):
        assert (x @ x.T).dtype == torch.float32
