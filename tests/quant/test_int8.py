"""LLM.int8() (Dettmers et al. 2022 §3): vector-wise int8, exact integer accumulation, outliers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from quant_helpers import bnb_functional

from lmlab.errors import LmlabError
from lmlab.quant import int8_matmul, int8_vectorwise
from lmlab.quant.int8 import int8_dequantize, int8_matmul_reference, outlier_columns


def test_vectorwise_golden_round_half_to_even():
    x = torch.tensor([[127.0, 0.5, 1.5, -2.5, -127.0], [0.0, 0.0, 0.0, 0.0, 0.0], [2.0, -1.0, 0.0, 0.0, 0.0]])
    q, scale = int8_vectorwise(x)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert q[0].tolist() == [127, 0, 2, -2, -127]  # 0.5 -> 0, 1.5 -> 2, -2.5 -> -2
    assert q[1].tolist() == [0] * 5 and scale[1] == 0  # a zero row: zeros, no NaN
    assert q[2].tolist() == [127, -64, 0, 0, 0]  # -63.5 -> -64 (even)
    assert scale.tolist() == [127.0, 0.0, 2.0]


def test_vectorwise_round_trip_error_bound():
    x = torch.randn(64, 300, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    q, scale = int8_vectorwise(x)
    assert q.shape == x.shape and scale.shape == (64,)
    err = (int8_dequantize(q, scale) - x.float()).abs()
    assert bool((err <= scale[:, None] / 127 / 2 + 1e-6).all())


@pytest.mark.peer
def test_vectorwise_matches_bitsandbytes():
    bnb_functional()
    x = torch.randn(32, 96, generator=torch.Generator().manual_seed(1)) * 3
    q_b, s_b, _ = torch.ops.bitsandbytes.int8_vectorwise_quant.default(x.clone(), 0.0)
    q, s = int8_vectorwise(x)
    assert torch.equal(q, q_b) and torch.equal(s, s_b)


def test_matmul_is_exact_integer_arithmetic():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 7, 64, generator=g)
    x[..., 3] *= 20  # outlier column
    w = torch.randn(48, 64, generator=g)
    w_q, w_scale = int8_vectorwise(w)
    for threshold in (0.0, 6.0):
        out = int8_matmul(x, w_q, w_scale, threshold)
        ref = int8_matmul_reference(x, w_q, w_scale, threshold)
        assert out.shape == (5, 7, 48) and out.dtype == x.dtype
        torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 9),
    k=st.integers(1, 70),
    n=st.integers(1, 20),
    threshold=st.sampled_from([0.0, 1.0, 6.0]),
    outliers=st.floats(1.0, 50.0),
    seed=st.integers(0, 2**16),
)
def test_matmul_equals_reference_for_any_shape(m, k, n, threshold, outliers, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, :: max(1, k // 3)] *= outliers
    w_q, w_scale = int8_vectorwise(torch.randn(n, k, generator=g))
    out = int8_matmul(x, w_q, w_scale, threshold)
    torch.testing.assert_close(
        out.double(), int8_matmul_reference(x, w_q, w_scale, threshold), atol=1e-3, rtol=1e-5
    )


def test_int32_accumulation_does_not_lose_integers():
    # Partial sums of 127 * 127 (odd) pass float32's 2**24 after ~1040 terms: a float32
    # accumulation would round them. Here x = 1 (int8 127, scale 1) and W = 127 (int8 127, scale 127).
    k = 4096
    x = torch.full((2, k), 1.0)
    w_q = torch.full((3, k), 127, dtype=torch.int8)
    w_scale = torch.full((3,), 127.0)
    out = int8_matmul(x, w_q, w_scale, threshold=0.0)
    assert torch.equal(out, torch.full((2, 3), 127.0 * k))


def _outlier_problem(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 256, generator=g)
    w = torch.randn(128, 256, generator=g) / 16
    xo = x.clone()
    xo[:, [5, 77, 200]] *= 25  # systematic outlier features (LLM.int8() §4), |x| >> 6
    return x, xo, w


def test_close_to_float_with_and_without_outliers():
    x, xo, w = _outlier_problem()
    w_q, w_scale = int8_vectorwise(w)
    for inp in (x, xo):
        ref = inp @ w.t()
        out = int8_matmul(inp, w_q, w_scale, threshold=6.0)
        assert ((out - ref).norm() / ref.norm()) < 0.02
    assert outlier_columns(xo, 6.0).tolist() == [5, 77, 200]
    assert outlier_columns(x, 6.0).numel() == 0


def test_plain_int8_is_visibly_worse_with_outliers():
    _, xo, w = _outlier_problem()
    w_q, w_scale = int8_vectorwise(w)
    ref = xo @ w.t()
    mixed = ((int8_matmul(xo, w_q, w_scale, 6.0) - ref).norm() / ref.norm()).item()
    plain = ((int8_matmul(xo, w_q, w_scale, 0.0) - ref).norm() / ref.norm()).item()
    assert plain > 3 * mixed
    assert plain > 0.02


def test_bad_input():
    w_q, w_scale = int8_vectorwise(torch.randn(4, 8))
    with pytest.raises(LmlabError, match="features"):
        int8_matmul(torch.randn(2, 9), w_q, w_scale)
    with pytest.raises(LmlabError, match="int8"):
        int8_matmul(torch.randn(2, 8), w_q.float(), w_scale)
    with pytest.raises(LmlabError, match="floating-point"):
        int8_vectorwise(torch.ones(3, dtype=torch.int32))
