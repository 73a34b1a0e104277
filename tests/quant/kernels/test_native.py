"""The compiled CPU 4-bit kernel (lmlab.quant.kernels.native) against the torch fast path and the reference.

Bit for bit: codes, absmax and decoded values, for every format, block size, input and output dtype and
thread count, on sizes that are not a multiple of the kernel's chunk, with all-zero, -0.0, subnormal,
tie, NaN and inf blocks. Skipped where the library is not built (no C compiler at install time).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmlab.quant.blockwise import dequantize_4bit_reference, quantize_4bit_reference
from lmlab.quant.codebooks import _grid_tables, _pair_table, _slot_byte_to_code_byte, _sorted_tables, codebook
from lmlab.quant.formats import BLOCK_SIZES, QUANT_TYPES
from lmlab.quant.kernels import cpu, native

pytestmark = pytest.mark.skipif(not native.available(), reason="the compiled CPU 4-bit kernel is not built")

CPU = torch.device("cpu")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (threads, plain): the AVX2 loops on 1, 2 and 3 threads, and the plain-C loops that other CPUs run
RUNS = ((1, False), (2, False), (3, False), (2, True))
# 64 Ki values is the kernel's quantize chunk: 2.5 chunks plus a few blocks, so chunks end mid-way
ODD_NUMEL = 5 * (1 << 15) + 4096 * 3


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # The expected values come from torch ops, whose OpenMP regions stall when other processes hold
    # the cores; one thread keeps this file quick on a busy machine. The kernel gets its own count.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def tables(quant_type: str):
    k, low, mid = _grid_tables(quant_type, CPU)
    identity = _sorted_tables(quant_type, CPU)[2]
    return k, low, mid, None if identity else _slot_byte_to_code_byte(quant_type, CPU)


def native_quantize(
    w2d: torch.Tensor, quant_type: str, threads: int, plain: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    blocks, block_size = w2d.shape
    packed = torch.full((blocks * block_size // 2,), 0xAB, dtype=torch.uint8)
    absmax = torch.full((blocks,), -1.0)
    assert native.quantize_4bit_blocks(w2d, *tables(quant_type), packed, absmax, threads, plain=plain)
    return packed, absmax


def torch_quantize(w2d: torch.Tensor, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    absmax = cpu._fast_absmax(w2d)
    packed = torch.empty(w2d.numel() // 2, dtype=torch.uint8)
    cpu._quantize_full_blocks_fast(w2d, absmax, quant_type, packed)
    return packed, absmax


def native_dequantize(packed, absmax, quant_type, block_size, dtype, threads, plain=False) -> torch.Tensor:
    out = torch.full((absmax.numel() * block_size,), 7.0, dtype=dtype)
    assert native.dequantize_4bit_blocks(
        packed, absmax, _pair_table(quant_type, CPU), block_size, out, threads, plain=plain
    )
    return out


def torch_dequantize(packed, absmax, quant_type, block_size, dtype) -> torch.Tensor:
    out = torch.empty(absmax.numel() * block_size, dtype=dtype)
    cpu._dequantize_full_blocks_fast(packed, absmax, quant_type, block_size, out)
    return out


def special_weight(numel: int, block_size: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """(numel // block_size, block_size): normal blocks over a wide range of scales, and hard ones."""
    g = torch.Generator().manual_seed(seed)
    blocks = numel // block_size
    lo, hi = (-6.0, 4.0) if dtype == torch.float16 else (-30.0, 30.0)
    scale = 10.0 ** (lo + (hi - lo) * torch.rand(blocks, 1, generator=g))
    w = torch.randn(blocks, block_size, generator=g) * scale
    w[0] = 0.0  # all-zero: absmax +0.0, never NaN
    w[1] = -0.0
    w[2, ::3] = -0.0
    tiny = {torch.float32: 1e-40, torch.float16: 3e-6, torch.bfloat16: 1e-39}[dtype]
    w[3] = torch.randn(block_size, generator=g) * tiny  # subnormals of the input dtype
    # scaled values exactly on midpoints and code values (absmax 1): the ties go to the lower code
    values = torch.sort(codebook("nf4", CPU)).values
    ties = torch.cat([values, (values[:-1] + values[1:]) / 2, -values])
    w[4] = ties.repeat(block_size // ties.numel() + 1)[:block_size]
    w[4, 0] = 1.0
    return w.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_quantize_matches_torch_fast_path_and_reference(quant_type, block_size, dtype):
    numel = max(ODD_NUMEL - ODD_NUMEL % block_size, 8 * block_size)
    w2d = special_weight(numel, block_size, dtype, seed=block_size)
    expect_packed, expect_absmax = torch_quantize(w2d, quant_type)
    ref_packed, ref_absmax = quantize_4bit_reference(w2d, quant_type, block_size)
    assert torch.equal(expect_packed, ref_packed.reshape(-1))
    assert torch.equal(bits(expect_absmax), bits(ref_absmax))
    for threads, plain in RUNS:
        packed, absmax = native_quantize(w2d, quant_type, threads, plain)
        assert torch.equal(packed, expect_packed), (threads, plain)
        assert torch.equal(bits(absmax), bits(expect_absmax)), (threads, plain)
    assert bits(absmax[:2]).tolist() == [0, 0]  # +0.0 for the all-zero and the -0.0 block


@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_dequantize_matches_torch_fast_path_and_reference(quant_type, block_size, out_dtype):
    numel = max(ODD_NUMEL - ODD_NUMEL % block_size, 8 * block_size)
    blocks = numel // block_size
    g = torch.Generator().manual_seed(block_size)
    packed = torch.randint(0, 256, (numel // 2,), dtype=torch.uint8, generator=g)
    # scales from float32 subnormals to near its maximum: fp16 subnormals and overflow to inf,
    # bf16 rounding at every exponent
    absmax = 10.0 ** (-40 + 78 * torch.rand(blocks, generator=g))
    absmax[:4] = torch.tensor([0.0, 6e-5, 65504.0, 3.4e38])
    # exact ties of bf16 and fp16 rounding (code +-1.0 decodes to absmax itself), to even either way
    absmax[4:8] = torch.tensor([0x3F808000, 0x3F818000, 0x3F801000, 0x3F803000], dtype=torch.int32).view(
        torch.float32
    )
    packed[4 * block_size // 2 : 8 * block_size // 2] = 0x0F  # nf4: -1.0, 1.0
    expect = torch_dequantize(packed, absmax, quant_type, block_size, out_dtype)
    ref = dequantize_4bit_reference(packed, absmax, quant_type, block_size, (numel,), out_dtype)
    assert torch.equal(bits(expect), bits(ref))
    for threads, plain in RUNS:
        assert torch.equal(
            bits(native_dequantize(packed, absmax, quant_type, block_size, out_dtype, threads, plain)),
            bits(expect),
        )


def test_round_trip_of_a_large_weight_across_huge_pages():
    quant_type = "nf4"
    # 16 MiB of float32 output: the kernel cuts it at 2 MiB huge-page boundaries
    w2d = torch.randn(4096, 1024, generator=torch.Generator().manual_seed(1)).view(-1, 64)
    packed, absmax = native_quantize(w2d, quant_type, 2)
    expect_packed, expect_absmax = torch_quantize(w2d, quant_type)
    assert torch.equal(packed, expect_packed) and torch.equal(absmax, expect_absmax)
    for dtype in (torch.float32, torch.bfloat16):
        out = native_dequantize(packed, absmax, quant_type, 64, dtype, 2)
        assert torch.equal(bits(out), bits(torch_dequantize(packed, absmax, quant_type, 64, dtype)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_and_inf_blocks_give_nan_and_inf_absmax(dtype):
    w2d = special_weight(64 * 40, 64, dtype)
    bad = w2d.clone()
    bad[10, 5] = float("nan")
    bad[11, 7] = float("inf")
    bad[12, 0] = -float("inf")
    bad[13, 1], bad[13, 2] = float("inf"), float("nan")
    packed, absmax = native_quantize(bad, "nf4", 2)
    assert torch.isnan(absmax[[10, 13]]).all()
    assert torch.isposinf(absmax[[11, 12]]).all()
    expect = cpu._fast_absmax(bad)
    assert torch.equal(torch.isnan(absmax), torch.isnan(expect))
    good = torch.ones(40, dtype=torch.bool)
    good[10:14] = False
    assert torch.equal(bits(absmax[good]), bits(expect[good]))
    clean_packed, _ = native_quantize(w2d, "nf4", 2)
    assert torch.equal(packed.view(40, 32)[good], clean_packed.view(40, 32)[good])


def test_inputs_it_cannot_run_return_false_and_write_nothing():
    k, low, mid, _ = tables("nf4")
    w2d = torch.randn(8, 64)
    packed = torch.zeros(256, dtype=torch.uint8)
    absmax = torch.zeros(8)
    bad_calls = [
        (w2d.double(), k, low, mid, None, packed, absmax),
        (w2d.t(), k, low, mid, None, packed, absmax),  # not contiguous
        (w2d.view(-1, 1), k, low, mid, None, torch.zeros(256, dtype=torch.uint8), torch.zeros(512)),  # odd B
        (w2d, k, low[:-1], mid, None, packed, absmax),
        (w2d, k, low, mid, torch.zeros(255, dtype=torch.uint8), packed, absmax),
        (w2d, k, low, mid, None, packed[:-1], absmax),
        (w2d, k, low, mid, None, packed, absmax.double()),
    ]
    for args in bad_calls:
        assert native.quantize_4bit_blocks(*args, 2) is False
    assert not packed.any() and not absmax.any()
    table = _pair_table("nf4", CPU)
    out = torch.zeros(512)
    for args in [
        (packed, absmax, table, 64, out.double()),
        (packed, absmax, table[:-1], 64, out),
        (packed, absmax, table, 32, out),
        (packed, absmax.half(), table, 64, out),
        (packed, absmax, table, 64, torch.zeros(1024)[::2]),
    ]:
        assert native.dequantize_4bit_blocks(*args, 2) is False
    assert not out.any()


@settings(max_examples=25, deadline=None)
@given(
    blocks=st.integers(1, 300),
    block_size=st.sampled_from(BLOCK_SIZES[:5]),
    quant_type=st.sampled_from(QUANT_TYPES),
    dtype=st.sampled_from(DTYPES),
    threads=st.integers(1, 4),
    plain=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_any_shape_round_trips_like_the_reference(
    blocks, block_size, quant_type, dtype, threads, plain, seed
):
    g = torch.Generator().manual_seed(seed)
    w2d = (torch.randn(blocks, block_size, generator=g) * 3).to(dtype)
    packed, absmax = native_quantize(w2d, quant_type, threads, plain)
    ref_packed, ref_absmax = quantize_4bit_reference(w2d, quant_type, block_size)
    assert torch.equal(packed, ref_packed.reshape(-1)) and torch.equal(absmax, ref_absmax)
    out = native_dequantize(packed, absmax, quant_type, block_size, dtype, threads, plain)
    ref = dequantize_4bit_reference(
        ref_packed, ref_absmax, quant_type, block_size, (blocks * block_size,), dtype
    )
    assert torch.equal(bits(out), bits(ref))


def test_all_finite_sees_every_nan_and_inf():
    x = torch.linspace(-1, 1, 1000) * 3.4e38  # up to near the float32 maximum
    assert native.all_finite(x) is True
    assert native.all_finite(torch.zeros(0)) is True
    for bad in (float("nan"), float("inf"), -float("inf")):
        for i in (0, 517, 999):
            y = x.clone()
            y[i] = bad
            assert native.all_finite(y) is False
    assert native.all_finite(x.double()) is None
    assert native.all_finite(x[::2]) is None
