"""lmlab.models.onednn: oneDNN's fp32 linear against ``F.linear`` (the reference), and when it steps aside."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lmlab import runtime
from lmlab.errors import LmlabError
from lmlab.models import onednn


@pytest.fixture(autouse=True)
def _route_on_any_x86():
    """The path itself is tested wherever the op exists, not only on the CPUs it is on by default for."""
    with runtime.onednn_policy("on"):
        yield


needs_onednn = pytest.mark.skipif(not onednn._probe(), reason="no oneDNN fp32 linear in this torch build")


def _grads(fn, *leaves):
    out = fn()
    g = torch.Generator().manual_seed(7)
    readout = torch.randn(out.shape, generator=g).to(out.dtype)  # the same numbers for fp32 and fp64
    return out, torch.autograd.grad((out * readout).sum(), leaves)


@needs_onednn
@settings(max_examples=40, deadline=None)
@given(
    lead=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    k=st.integers(1, 300),
    n=st.integers(1, 300),
    bias=st.booleans(),
    strided=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_linear_equals_f_linear_forward_and_gradients(lead, k, n, bias, strided, seed):
    g = torch.Generator().manual_seed(seed)
    if strided:  # a transposed view as the input, as attention's merged heads can be
        x = torch.randn(*lead[:-1], k, lead[-1], generator=g).transpose(-1, -2).requires_grad_()
    else:
        x = torch.randn(*lead, k, generator=g, requires_grad=True)
    w = torch.randn(n, k, generator=g, requires_grad=True)
    b = torch.randn(n, generator=g, requires_grad=True) if bias else None
    leaves = [t for t in (x, w, b) if t is not None]
    got, got_g = _grads(lambda: onednn.linear(x, w, b), *leaves)
    assert got.grad_fn is not None and type(got.grad_fn).__name__ == "_LinearBackward"
    # The reference in fp64: both fp32 paths are within rounding of it.
    ref, ref_g = _grads(
        lambda: F.linear(*(t.double() for t in leaves[:2]), b.double() if bias else None), *leaves
    )
    scale = k**0.5
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5 * scale)
    for a, r in zip(got_g, ref_g, strict=True):
        assert a.shape == r.shape and a.dtype == torch.float32
        torch.testing.assert_close(a.double(), r.double(), rtol=1e-5, atol=1e-4 * scale * max(lead) ** 0.5)


@needs_onednn
@pytest.mark.parametrize("k,n", [(16, 96), (96, 16)])
def test_weight_gradient_in_both_orientations(k, n):
    """∂W is formed as x ᵀ∂y or ∂yᵀ x depending on which side is smaller; both equal autograd's."""
    torch.manual_seed(0)
    x = torch.randn(50, k, requires_grad=True)
    w = torch.randn(n, k, requires_grad=True)
    _, got = _grads(lambda: onednn.linear(x, w), x, w)
    _, ref = _grads(lambda: F.linear(x, w), x, w)
    assert got[1].is_contiguous()
    for a, r in zip(got, ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_only_the_gradients_asked_for():
    x = torch.randn(4, 8)
    w = torch.randn(3, 8, requires_grad=True)
    (gw,) = torch.autograd.grad(onednn.linear(x, w).sum(), [w])
    torch.testing.assert_close(gw, torch.ones(4, 3).t() @ x)


@pytest.mark.parametrize("case", ["bf16", "fp64", "autocast", "empty"])
def test_steps_aside_to_f_linear(case):
    """Outside fp32-on-CPU the result is F.linear's own, bit for bit."""
    torch.manual_seed(0)
    dtype = {"bf16": torch.bfloat16, "fp64": torch.float64}.get(case, torch.float32)
    x = torch.randn(0 if case == "empty" else 5, 6, dtype=dtype, requires_grad=True)
    w = torch.randn(4, 6, dtype=dtype, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        assert not onednn.applies(x, w)
        got, ref = onednn.linear(x, w), F.linear(x, w)
    assert type(got.grad_fn).__name__ != "_LinearBackward"
    assert got.dtype == ref.dtype and torch.equal(got, ref)


@pytest.mark.parametrize("off", ["off", "reference", "0"])
def test_the_off_policy_turns_it_off(off):
    x, w = torch.randn(5, 6), torch.randn(4, 6, requires_grad=True)
    with runtime.onednn_policy(off):
        assert not onednn.available() and not onednn.applies(x, w)
        assert torch.equal(onednn.linear(x, w), F.linear(x, w))
    assert onednn.available() == onednn._probe()  # the fixture's "on" again after the context
    assert not onednn.available("off") and onednn.available("fast") == onednn._probe()


def test_the_environment_variable_is_not_read_by_the_library(monkeypatch):
    """LMLAB_ONEDNN is the command line's (lmlab.cli passes it down), not a switch of library calls."""
    monkeypatch.setenv("LMLAB_ONEDNN", "0")
    assert onednn.available() == onednn._probe()  # the fixture's "on" policy, whatever the environment
    with pytest.raises(LmlabError, match="unknown oneDNN policy"):
        runtime.check_onednn_policy("sometimes")


@needs_onednn
def test_no_double_backward():
    x = torch.randn(5, 6, requires_grad=True)
    w = torch.randn(4, 6, requires_grad=True)
    (gx,) = torch.autograd.grad(onednn.linear(x, w).square().sum(), [x], create_graph=True)
    with pytest.raises(RuntimeError):
        gx.sum().backward()


@needs_onednn
def test_routing_sends_a_models_linear_layers_through_onednn():
    """nn.Linear (F.linear) and GPT-2's Conv1D (torch.addmm) inside ``routing()``: oneDNN, same values."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layers = [torch.nn.Linear(8, 5), torch.nn.Linear(8, 5, bias=False), Conv1D(5, 8)]
    x = torch.randn(3, 4, 8, requires_grad=True)
    for layer in layers:
        params = [x, *layer.parameters()]
        with onednn.routing():
            got, got_g = _grads(lambda layer=layer: layer(x), *params)
        ref, ref_g = _grads(lambda layer=layer: layer(x), *params)
        nodes = [got.grad_fn, *(f for f, _ in got.grad_fn.next_functions if f is not None)]
        assert "_LinearBackward" in {type(f).__name__ for f in nodes}
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        for a, r in zip(got_g, ref_g, strict=True):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_routing_is_a_no_op_where_it_does_not_apply():
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 5)
    x = torch.randn(4, 8)
    with onednn.routing(enabled=False):
        assert type(layer(x).grad_fn).__name__ == "AddmmBackward0"
    with torch.autocast("cpu", dtype=torch.bfloat16), onednn.routing():
        assert layer(x).dtype == torch.bfloat16
    with onednn.routing():  # fp64 takes torch's own kernel
        assert type(layer.double()(x.double()).grad_fn).__name__ == "AddmmBackward0"


def test_auto_follows_the_cpu(monkeypatch):
    """``auto`` routes exactly where MKL leaves AVX-512 idle (AMD with AVX-512) and the op works."""
    want = runtime.mkl_leaves_avx512_idle() and onednn._probe()
    assert onednn.available("auto") == want
    with runtime.onednn_policy(None):  # None is auto, as an unset LMLAB_ONEDNN is
        assert onednn.available() == want
    monkeypatch.setattr(runtime, "mkl_leaves_avx512_idle", lambda: True)
    assert onednn.available("auto") == onednn._probe()
