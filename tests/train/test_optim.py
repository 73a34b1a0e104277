"""lmlab's learning-rate schedules against transformers' ``get_*_schedule_with_warmup``: the exact
relation (see :mod:`lmlab.train.optim` for why lmlab keeps its own)."""

from __future__ import annotations

import pytest
import torch

from lmlab.train.optim import lr_lambda

transformers = pytest.importorskip("transformers")


def _hf(fn, **kw):
    p = torch.nn.Parameter(torch.zeros(1))
    return fn(torch.optim.SGD([p], lr=1.0), **kw).lr_lambdas[0]


@pytest.mark.parametrize(("warmup", "total"), [(4, 20), (1, 7), (10, 11), (0, 5)])
def test_cosine_is_hf_min_lr_cosine_with_warmup_shifted_by_one(warmup, total):
    f = lr_lambda("cosine", warmup, total, 0.1)
    g = _hf(transformers.get_cosine_with_min_lr_schedule_with_warmup, num_warmup_steps=warmup,
            num_training_steps=total, min_lr_rate=0.1)  # fmt: skip
    for s in range(total + 1):
        want = g(s + 1) if s < warmup else g(s)
        assert f(s) == pytest.approx(want, rel=1e-12, abs=1e-15), s
    # Past the last step (a resume that extends --steps) lmlab stays at the floor; HF's cosine climbs back.
    assert f(total + 1) == f(total + 5) == pytest.approx(0.1)
    assert g(total + 1) > 0.1
    if warmup:
        assert g(0) == 0.0 and f(0) == 1 / warmup  # HF's first update has lr 0, lmlab's lr / W
        assert f(warmup - 1) == f(warmup) == 1.0  # the peak, held for two updates


def test_constant_is_hf_constant_with_warmup_shifted_by_one_in_the_warmup():
    f = lr_lambda("constant", 5, 30, 0.0)
    g = _hf(transformers.get_constant_schedule_with_warmup, num_warmup_steps=5)
    assert [f(s) for s in range(30)] == [g(s + 1) if s < 5 else g(s) for s in range(30)]
    # Equally: the linear-decay schedule's warmup is the same ramp.
    lin = _hf(transformers.get_linear_schedule_with_warmup, num_warmup_steps=5, num_training_steps=30)
    assert [f(s) for s in range(5)] == [lin(s + 1) for s in range(5)]


@pytest.mark.parametrize("warmup", [1, 4, 100])
def test_inverse_sqrt_is_hf_inverse_sqrt_shifted_by_one(warmup):
    f = lr_lambda("inverse-sqrt", warmup, 10**6, 0.0)
    g = _hf(transformers.get_inverse_sqrt_schedule, num_warmup_steps=warmup, timescale=warmup)
    for s in [*range(3 * warmup), 10**4, 10**6 - 1]:
        assert f(s) == pytest.approx(g(s + 1), rel=1e-12), s
