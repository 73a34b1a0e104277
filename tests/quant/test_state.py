"""Quantized4bit (lmlab.quant.state): its state dict in bitsandbytes' layout, both ways."""

from __future__ import annotations

import pytest
import torch
from quant_helpers import bits, bnb_functional

from lmlab.quant import Quantized4bit, dequantize_4bit, quantize_4bit


@pytest.mark.peer
def test_state_dict_interoperates_with_bitsandbytes_quant_state():
    F = bnb_functional()
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    for double_quant in (False, True):
        packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
        theirs = {"weight": packed} | {f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}
        ours = quantize_4bit(w, "nf4", 64, double_quant).state_dict("weight")
        assert sorted(ours) == sorted(theirs)
        for k in ours:
            assert torch.equal(ours[k], theirs[k]), k  # same bytes, JSON blob included
        # theirs -> ours -> decode; ours -> theirs -> decode
        q = Quantized4bit.from_state_dict(theirs, "weight")
        assert torch.equal(bits(dequantize_4bit(q)), bits(F.dequantize_4bit(packed, state)))
        back = F.QuantState.from_dict(
            {k[len("weight.") :]: v for k, v in ours.items() if k != "weight"}, "cpu"
        )
        assert torch.equal(bits(F.dequantize_4bit(ours["weight"], back)), bits(dequantize_4bit(q)))


def test_state_dict_layout_and_round_trip():
    w = torch.randn(40, 24)
    for double_quant in (False, True):
        q = quantize_4bit(w, "fp4", 128, double_quant)
        sd = q.state_dict("weight")
        expected = {"weight", "weight.absmax", "weight.quant_map", "weight.quant_state.bitsandbytes__fp4"}
        if double_quant:
            expected |= {"weight.nested_absmax", "weight.nested_quant_map"}
        assert set(sd) == expected
        back = Quantized4bit.from_state_dict(sd, "weight")
        assert back.shape == q.shape and back.block_size == 128 and back.double_quant == double_quant
        assert torch.equal(bits(dequantize_4bit(back)), bits(dequantize_4bit(q)))
