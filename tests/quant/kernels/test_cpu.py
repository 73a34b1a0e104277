"""The CPU kernels of the 4-bit ops (lmlab.quant.kernels.cpu): the chunked torch path on its own
(the compiled kernel switched off), chunk boundaries, partial blocks and NaN / Inf blocks, bit for
bit against the reference."""

from __future__ import annotations

import pytest
import torch
from quant_helpers import bits

from lmlab.quant.blockwise import dequantize_4bit_reference, quantize_4bit_reference
from lmlab.quant.kernels import cpu, native

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(params=["native-if-built", "torch"])
def route(request, monkeypatch):
    """Both routes of the kernel: the compiled one where built, and the chunked torch path."""
    if request.param == "torch":
        monkeypatch.setattr(native, "quantize_4bit_blocks", lambda *a, **k: False)
        monkeypatch.setattr(native, "dequantize_4bit_blocks", lambda *a, **k: False)
    return request.param


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_many_chunks_and_a_partial_block_equal_the_reference(route, monkeypatch, quant_type, dtype):
    monkeypatch.setattr(cpu, "CHUNK_ELEMENTS", 256)  # many chunks, a ragged last one
    w = (torch.randn(37, 129, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    w[4] = 0.0  # all-zero blocks
    packed, absmax = cpu.quantize_4bit(w, quant_type, 32)
    ref_packed, ref_absmax = quantize_4bit_reference(w, quant_type, 32)
    assert torch.equal(packed, ref_packed) and torch.equal(bits(absmax), bits(ref_absmax))
    for out_dtype in DTYPES:
        got = cpu.dequantize_4bit(packed, absmax, quant_type, 32, [37, 129], out_dtype)
        ref = dequantize_4bit_reference(ref_packed, ref_absmax, quant_type, 32, (37, 129), out_dtype)
        assert torch.equal(bits(got), bits(ref))
        out = torch.empty(37, 129, dtype=out_dtype)
        cpu.dequantize_4bit_into(packed, absmax, quant_type, 32, out)
        assert torch.equal(bits(out), bits(ref))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_nan_or_inf_block_shows_in_absmax_and_breaks_nothing(route, bad):
    w = torch.randn(4, 64)
    w[2, 5] = bad
    packed, absmax = cpu.quantize_4bit(w, "nf4", 64)  # never an out-of-range table index
    assert packed.shape == (128, 1)
    assert not bool(torch.isfinite(absmax[2])) and bool(torch.isfinite(absmax[[0, 1, 3]]).all())


def test_fewer_elements_than_a_block_is_the_reference():
    w = torch.randn(5)
    assert all(
        torch.equal(a, b)
        for a, b in zip(cpu.quantize_4bit(w, "fp4", 64), quantize_4bit_reference(w, "fp4", 64), strict=True)
    )
