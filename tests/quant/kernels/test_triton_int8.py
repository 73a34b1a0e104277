"""The Triton kernels of LLM.int8() (lmlab.quant.kernels.triton_int8) against the reference
(lmlab.quant.int8): the int8 part bit for bit, the float32 outlier part to its summation order.

On CPU they run under Triton's interpreter (the conftest sets ``TRITON_INTERPRET=1``), which
truncates float32 -> bfloat16 instead of rounding, and converts subnormal bfloat16 wrongly: bfloat16
outputs are held to one ulp there, and the tiny-scale rows are tested in float32 / float16. The
``gpu`` tests run the large shapes on a CUDA device only.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from quant_helpers import bits

from lmlab.quant.int8 import (
    int8_linear_reference,
    int8_vectorwise,
    int_mm_reference,
    outlier_columns,
    quantize_int8_weight,
)

pytest.importorskip("triton")
from lmlab.quant.kernels import triton_int8  # noqa: E402  (after the conftest chose the interpreter)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ON_GPU = torch.cuda.is_available()
THRESHOLD = 6.0


def _weight(n: int, k: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    w[1 % n] = 0.0  # an all-zero weight row: SCB 0
    w_q, w_scale = quantize_int8_weight(w)
    return w_q.to(device), w_scale.to(device)


def _activations(m: int, k: int, device: str, dtype=torch.float32, seed: int = 1, outliers: int = 2):
    """``(m, k)`` N(0, 2) activations with ``outliers`` columns scaled past the threshold in one row."""
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * 2
    for c in range(outliers):
        x[(3 * c) % m, (7 * c + 3) % k] = 9.0 + c  # a single element makes the whole column an outlier
    return x.to(dtype).to(device)


def _assert_like_reference(got: torch.Tensor, ref: torch.Tensor, exact: bool) -> None:
    """``exact``: no outlier column, so the whole output is the int8 part and its epilogue."""
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert torch.equal(got.isnan(), ref.isnan())
    keep = ~ref.isnan()
    got, ref = got[keep], ref[keep]
    truncating = got.dtype == torch.bfloat16 and not ON_GPU
    if exact and not truncating:
        assert torch.equal(bits(got), bits(ref))
    elif exact:  # the interpreter truncates to bfloat16: one ulp, towards zero
        assert int((bits(got).int() - bits(ref).int()).abs().max()) <= 1
    else:
        rtol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}[got.dtype]
        atol = rtol * float(ref.float().abs().max())
        torch.testing.assert_close(got.float(), ref.float(), rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------------- int8_mm


@pytest.mark.parametrize(
    ("m", "k", "n"), [(1, 64, 48), (3, 200, 100), (17, 200, 48), (40, 64, 100), (5, 7, 3)]
)
def test_int8_mm_is_exact_for_ragged_shapes(triton_device, m, k, n):
    g = torch.Generator().manual_seed(m * k * n)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    got = triton_int8.int8_mm(a.to(triton_device), b.to(triton_device))
    assert got.dtype == torch.int32 and torch.equal(got.cpu(), int_mm_reference(a, b))


def test_int8_mm_extremes_strides_and_empty(triton_device):
    a = torch.full((20, 130), -128, dtype=torch.int8)
    b = torch.full((9, 130), -128, dtype=torch.int8)
    got = triton_int8.int8_mm(a.to(triton_device), b.to(triton_device))
    assert bool((got == 130 * 128 * 128).all())
    g = torch.Generator().manual_seed(3)
    at = torch.randint(-128, 128, (70, 19), dtype=torch.int8, generator=g).t()  # (19, 70), strides (1, 19)
    bt = torch.randint(-128, 128, (70, 33), dtype=torch.int8, generator=g).t()
    got = triton_int8.int8_mm(at.to(triton_device), bt.to(triton_device))
    assert torch.equal(got.cpu(), int_mm_reference(at, bt))
    empty = triton_int8.int8_mm(a[:0].to(triton_device), b.to(triton_device))
    assert empty.shape == (0, 9) and empty.dtype == torch.int32


# ------------------------------------------------------------------------------------- quantize_rows


def _reference_rows(x2d: torch.Tensor, threshold: float):
    xf = x2d.float()
    cols = outlier_columns(xf, threshold)
    codes, scale = int8_vectorwise(xf.index_fill(1, cols, 0.0) if cols.numel() else xf)
    return codes, scale, cols


@pytest.mark.parametrize(
    ("m", "k", "dtype"),
    [(1, 64, torch.float32), (17, 200, torch.bfloat16), (40, 64, torch.float16), (40, 200, torch.float32)],
)
@pytest.mark.parametrize("threshold", [THRESHOLD, 0.0])
def test_quantize_rows_is_bit_identical(triton_device, dtype, m, k, threshold):
    x = _activations(m, k, "cpu", dtype, outliers=3)
    if m > 2:
        x[m // 2] = 0.0  # a zero row: scale 0, codes 0
        x[m - 1, 5] = float("nan")  # a NaN row: scale NaN; its column is no outlier column
        x[0, 5] = 50.0  # ... not even with an outlier value beside the NaN
    codes, scale, outlier = triton_int8.quantize_rows(x.to(triton_device), threshold)
    ref_codes, ref_scale, ref_cols = _reference_rows(x, threshold)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32 and outlier.dtype == torch.bool
    assert torch.equal(codes.cpu(), ref_codes)
    torch.testing.assert_close(scale.cpu(), ref_scale, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(outlier.nonzero().view(-1).cpu(), ref_cols)
    assert (ref_cols.numel() > 0) == (threshold > 0)


def test_quantize_rows_tiny_scale_and_ties(triton_device):
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(4))
    x[0] *= 1e-38  # 127 / scale overflows float32: the reference's division route
    x[1, :4] = torch.tensor([127.0, 0.5, 1.5, -2.5])  # scale 127, factor 1.0: ties go to even
    x[1, 4:] = 0.0
    codes, scale, _ = triton_int8.quantize_rows(x.to(triton_device), 0.0)
    ref_codes, ref_scale, _ = _reference_rows(x, 0.0)
    assert torch.equal(codes.cpu(), ref_codes) and torch.equal(bits(scale.cpu()), bits(ref_scale))
    assert codes[1, :4].tolist() == [127, 0, 2, -2]
    assert int(codes[0].abs().max()) == 127


# ------------------------------------------------------------------------------------- int8_linear


LINEAR_CASES = [  # (M, K, N, dtype): the GEMV path up to M = 16, ragged K and N, every dtype on both paths
    (1, 64, 48, torch.float32),
    (1, 200, 100, torch.bfloat16),
    (3, 200, 100, torch.float16),
    (16, 64, 100, torch.bfloat16),
    (17, 200, 48, torch.float32),
    (17, 64, 100, torch.float16),
    (40, 64, 48, torch.bfloat16),
]


@pytest.mark.parametrize(("m", "k", "n", "dtype"), LINEAR_CASES)
@pytest.mark.parametrize("threshold", [THRESHOLD, 0.0])
def test_int8_linear_matches_the_reference(triton_device, dtype, m, k, n, threshold):
    x = _activations(m, k, "cpu", dtype)
    w_q, w_scale = _weight(n, k, "cpu")
    got = triton_int8.int8_linear(
        x.to(triton_device), w_q.to(triton_device), w_scale.to(triton_device), threshold
    )
    ref = int8_linear_reference(x, w_q, w_scale, threshold)
    _assert_like_reference(got.cpu(), ref, exact=threshold <= 0)


@pytest.mark.parametrize(
    ("m", "k", "n", "dtype"), [(1, 200, 100, torch.bfloat16), (16, 64, 100, torch.float16)]
)
@pytest.mark.parametrize("threshold", [THRESHOLD, 0.0])
def test_gemv_parallel_prepass_matches_the_reference(triton_device, monkeypatch, m, k, n, dtype, threshold):
    monkeypatch.setattr(triton_int8, "ONE_PROGRAM_PREPASS", 0)
    x = _activations(m, k, "cpu", dtype)
    w_q, w_scale = _weight(n, k, "cpu")
    got = triton_int8.int8_linear(
        x.to(triton_device), w_q.to(triton_device), w_scale.to(triton_device), threshold
    )
    _assert_like_reference(got.cpu(), int8_linear_reference(x, w_q, w_scale, threshold), exact=threshold <= 0)


@pytest.mark.parametrize(("m", "route"), [(3, "one-program"), (3, "parallel"), (20, "gemm")])
def test_zero_nan_and_tiny_rows(triton_device, monkeypatch, m, route):
    if route == "parallel":
        monkeypatch.setattr(triton_int8, "ONE_PROGRAM_PREPASS", 0)
    k, n = 64, 48
    x = _activations(m, k, "cpu")
    x[1] = 0.0
    x[2, 10] = float("nan")
    x[0] = x[0] * 1e-38  # a tiny row: 127 / scale overflows float32
    x[2, 20] = 9.0  # an outlier column beside the NaN
    w_q, w_scale = _weight(n, k, "cpu")
    for dtype, threshold in ((torch.float32, THRESHOLD), (torch.float32, 0.0), (torch.float16, THRESHOLD)):
        xd = x.to(dtype)
        got = triton_int8.int8_linear(
            xd.to(triton_device), w_q.to(triton_device), w_scale.to(triton_device), threshold
        )
        ref = int8_linear_reference(xd, w_q, w_scale, threshold)
        assert bool(got[2].isnan().all()) and not bool(got[[0, 1]].isnan().any())
        assert bool((got[1] == 0).all())
        _assert_like_reference(got.cpu(), ref, exact=threshold <= 0)


@pytest.mark.parametrize("lead", [(2, 3), (2, 10)])
def test_3d_and_strided_inputs(triton_device, lead):
    k, n = 64, 48
    x = _activations(lead[0] * lead[1], k, "cpu").reshape(*lead, k)
    w_q, w_scale = _weight(n, k, "cpu")
    dev = (w_q.to(triton_device), w_scale.to(triton_device))
    got = triton_int8.int8_linear(x.to(triton_device), *dev, THRESHOLD)
    assert got.shape == (*lead, n)
    _assert_like_reference(got.cpu(), int8_linear_reference(x, w_q, w_scale, THRESHOLD), exact=False)
    xt = x.reshape(-1, k).to(triton_device).t().contiguous().t()  # the same values, column-major
    assert xt.stride() == (1, lead[0] * lead[1])
    got_t = triton_int8.int8_linear(xt, *dev, THRESHOLD)
    assert torch.equal(got_t.cpu(), got.reshape(-1, n).cpu())


def test_empty_inputs(triton_device):
    w_q, w_scale = _weight(48, 64, triton_device)
    for shape in ((0, 64), (2, 0, 64)):
        x = torch.randn(shape, dtype=torch.bfloat16, device=triton_device)
        out = triton_int8.int8_linear(x, w_q, w_scale, THRESHOLD)
        assert out.shape == (*shape[:-1], 48) and out.dtype == torch.bfloat16


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    m=st.integers(1, 40),
    k=st.integers(1, 130),
    n=st.integers(1, 70),
    outliers=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_int8_linear_any_shape(triton_device, m, k, n, outliers, seed):
    x = _activations(m, k, "cpu", seed=seed, outliers=outliers)
    w_q, w_scale = _weight(n, k, "cpu", seed=seed)
    got = triton_int8.int8_linear(
        x.to(triton_device), w_q.to(triton_device), w_scale.to(triton_device), THRESHOLD
    )
    ref = int8_linear_reference(x, w_q, w_scale, THRESHOLD)
    _assert_like_reference(got.cpu(), ref, exact=outlier_columns(x, THRESHOLD).numel() == 0)


# ------------------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 4096])
@pytest.mark.parametrize("outliers", [0, 4])
def test_gpu_4096_square_matches_the_reference(m, outliers):
    k = n = 4096
    x = _activations(m, k, "cuda", torch.bfloat16, outliers=outliers)
    w_q, w_scale = _weight(n, k, "cuda")
    got = triton_int8.int8_linear(x, w_q, w_scale, THRESHOLD)
    ref = int8_linear_reference(x, w_q, w_scale, THRESHOLD)
    _assert_like_reference(got, ref, exact=outliers == 0)
    codes, scale, outlier = triton_int8.quantize_rows(x, THRESHOLD)
    ref_codes, ref_scale, ref_cols = _reference_rows(x, THRESHOLD)
    assert torch.equal(codes, ref_codes) and torch.equal(bits(scale), bits(ref_scale))
    assert torch.equal(outlier.nonzero().view(-1), ref_cols) and ref_cols.numel() == outliers


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("m", "k", "n"), [(1, 4096, 4096), (16, 4096, 4096), (4096, 4096, 4096), (33, 1000, 77)]
)
def test_gpu_int8_mm_exact(m, k, n):
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda", generator=g)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8, device="cuda", generator=g)
    assert torch.equal(triton_int8.int8_mm(a, b), int_mm_reference(a, b))


@pytest.mark.gpu
@pytest.mark.peer
@pytest.mark.parametrize("m", [1, 16, 4096])
def test_gpu_against_bitsandbytes(m):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as F

    k = n = 4096
    x = _activations(m, k, "cuda", torch.float16, outliers=4)
    w_q, w_scale = _weight(n, k, "cuda")
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda")
    assert torch.equal(triton_int8.int8_mm(a, w_q), F.int8_linear_matmul(a, w_q))
    # bitsandbytes' layer semantics differ below the int8 step (fp16 activations, element-wise
    # outlier zeroing in the scales): hold both to the float product, ours at least as close.
    ours = triton_int8.int8_linear(x, w_q, w_scale, THRESHOLD).float()
    import bitsandbytes as bnb

    state = bnb.MatmulLtState()
    state.threshold, state.has_fp16_weights, state.is_training = THRESHOLD, False, False
    state.CB, state.SCB = w_q, w_scale
    theirs = bnb.matmul(x, w_q, state=state).float()
    exact = x.float() @ (w_q.float() * (w_scale[:, None] / 127.0)).t()
    err_ours = (ours - exact).abs().mean()
    err_theirs = (theirs - exact).abs().mean()
    assert err_ours <= 1.5 * err_theirs + 1e-3
