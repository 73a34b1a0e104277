"""Codebooks: the NF4 construction (QLoRA §3), bitsandbytes' FP4 table, quantile quantization."""

from __future__ import annotations

import pytest
import torch
from quant_helpers import bits, bnb_functional

from lmlab.errors import LmlabError
from lmlab.quant import codebook, dynamic_map, quantile_codebook

# The NF4 values as published (QLoRA appendix E / bitsandbytes), index = 4-bit code.
NF4_PUBLISHED = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]


def test_nf4_construction_equals_the_published_table():
    nf4 = codebook("nf4")
    assert nf4.dtype == torch.float32 and nf4.shape == (16,)
    torch.testing.assert_close(
        nf4.double(), torch.tensor(NF4_PUBLISHED, dtype=torch.float64), atol=1e-7, rtol=0
    )
    # 7 negative values, an exact zero, 8 positive ones; normalised to [-1, 1]
    assert (nf4 < 0).sum() == 7 and (nf4 == 0).sum() == 1 and (nf4 > 0).sum() == 8
    assert nf4.min() == -1 and nf4.max() == 1 and bool((nf4.diff() > 0).all())


def test_fp4_and_int4_tables_in_bit_pattern_order():
    fp4 = codebook("fp4")
    expected = torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3]) / 12
    assert torch.equal(fp4[:8], expected)
    assert torch.equal(fp4[8:], -expected + 0.0)  # bit 3 is the sign; pattern 0b1000 is a plain zero
    assert not torch.signbit(fp4[8])
    int4 = codebook("int4")
    assert torch.equal(int4[:8], torch.arange(7, -1, -1.0) / 7)
    assert set(int4.mul(7).round().tolist()) == set(range(-7, 8))


def test_codebook_returns_a_copy_and_rejects_unknown_names():
    a = codebook("nf4")
    a[0] = 5.0
    assert codebook("nf4")[0] == -1.0
    with pytest.raises(LmlabError, match="unknown codebook"):
        codebook("nf5")


@pytest.mark.peer
def test_tables_are_bit_identical_to_bitsandbytes():
    F = bnb_functional()
    for name in ("nf4", "fp4"):
        assert torch.equal(bits(codebook(name)), bits(F.get_4bit_type(name, device="cpu")))
    assert torch.equal(bits(dynamic_map()), bits(F.create_dynamic_map()))


def test_dynamic_map_shape():
    code = dynamic_map()
    assert code.shape == (256,) and bool((code.diff() > 0).all())
    assert code.max() == 1.0 and code.min() > -1.0 and (code == 0).sum() == 1


def test_quantile_codebook_is_equal_mass():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100_000, generator=g) * 2 + 1
    for bits_ in (2, 3, 4):
        q = quantile_codebook(x, bits_)
        n = 2**bits_
        assert q.shape == (n,) and bool((q.diff() > 0).all())
        # q_i lies between the quantiles i/(n+1) and (i+1)/(n+1): each value owns 1/(n+1) of the data
        lo = torch.quantile(x, torch.arange(n) / (n + 1))
        hi = torch.quantile(x, (torch.arange(n) + 1) / (n + 1))
        assert bool(((q >= lo) & (q <= hi)).all())
        between = ((x[None, :] >= lo[:, None]) & (x[None, :] < hi[:, None])).float().mean(1)
        torch.testing.assert_close(between, torch.full((n,), 1 / (n + 1)), atol=2e-3, rtol=0)


def test_quantile_codebook_of_a_normal_matches_theory():
    # QLoRA eq. (4) on N(0, 1): q_i = (ndtri(i/17) + ndtri((i+1)/17)) / 2. q_0 involves the sample
    # minimum (the estimator's known outlier problem, QLoRA §3), so compare the other 15.
    x = torch.randn(400_000, generator=torch.Generator().manual_seed(1))
    q = quantile_codebook(x, 4)
    p = torch.arange(1, 17, dtype=torch.float64) / 17
    theory = (torch.special.ndtri(p[:-1]) + torch.special.ndtri(p[1:])) / 2
    torch.testing.assert_close(q[1:].double(), theory, atol=0.02, rtol=0)
    assert q[0] < q[1]


def test_quantile_codebook_rejects_bad_input():
    with pytest.raises(LmlabError, match="bits"):
        quantile_codebook(torch.randn(10), 0)
    with pytest.raises(LmlabError, match="NaN"):
        quantile_codebook(torch.tensor([1.0, float("nan")]), 2)
    with pytest.raises(LmlabError, match="empty"):
        quantile_codebook(torch.empty(0), 2)
