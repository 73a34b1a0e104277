"""Linear4bit / Linear8bit: from_linear, buffers, bias, input gradients, state dicts, Conv1D."""

from __future__ import annotations

import copy

import pytest
import torch
from quant_helpers import bits, bnb_functional
from torch import nn

from lmlab.errors import LmlabError
from lmlab.quant import Linear4bit, Linear8bit, dequantize_4bit, quantize_4bit


def _linear(in_f=96, out_f=40, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_linear4bit_matches_dequantized_float_layer(quant_type, double_quant):
    lin = _linear()
    layer = Linear4bit.from_linear(lin, quant_type, 64, double_quant)
    x = torch.randn(3, 5, 96)
    w = dequantize_4bit(quantize_4bit(lin.weight.detach(), quant_type, 64, double_quant))
    torch.testing.assert_close(layer(x), x @ w.t() + lin.bias.detach())
    assert ((layer(x) - lin(x)).norm() / lin(x).norm()) < 0.15
    assert layer.weight.dtype == torch.uint8 and layer.weight.shape == (96 * 40 // 2, 1)
    assert torch.equal(lin.weight, _linear().weight)  # the source layer is untouched


def test_linear4bit_compute_dtype_and_input_dtype():
    lin = _linear()
    layer = Linear4bit.from_linear(lin, compute_dtype=torch.bfloat16)
    x = torch.randn(4, 96)
    y = layer(x)
    assert y.dtype == torch.float32
    assert layer(x.to(torch.bfloat16)).dtype == torch.bfloat16
    torch.testing.assert_close(y, Linear4bit.from_linear(lin)(x), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_gradients_flow_to_inputs_and_forward_is_pure(kind):
    lin = _linear(bias=False)
    layer = Linear4bit.from_linear(lin) if kind == "4bit" else Linear8bit.from_linear(lin, threshold=6.0)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(6, 96, requires_grad=True)
    x.data[:, 7] = 9.0  # an outlier column for LLM.int8()
    layer(x).pow(2).sum().backward()
    w = layer.dequantized_weight(torch.float32)
    x2 = x.detach().clone().requires_grad_(True)
    (x2 @ w.t()).pow(2).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert ((x.grad - x2.grad).norm() / x2.grad.norm()) < 0.02
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k  # forward changed nothing
    assert not any(p.requires_grad for p in layer.parameters())


def test_linear8bit_matches_llm_int8_and_float():
    lin = _linear(in_f=128, out_f=64)
    layer = Linear8bit.from_linear(lin, threshold=6.0)
    assert layer.weight.dtype == torch.int8 and layer.SCB.shape == (64,)
    x = torch.randn(10, 128)
    x[:, 3] *= 30
    ref = lin(x)
    assert ((layer(x) - ref).norm() / ref.norm()) < 0.02
    assert set(layer.state_dict()) == {"weight", "SCB", "bias", "weight_format"}  # bitsandbytes' keys


def test_conv1d_weight_is_transposed():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(1)
    conv = Conv1D(48, 48)  # square: a missing transpose would not fail on shapes
    nn.init.normal_(conv.weight)
    nn.init.normal_(conv.bias)
    x = torch.randn(4, 48)
    for layer in (Linear4bit.from_linear(conv), Linear8bit.from_linear(conv)):
        assert (layer.in_features, layer.out_features) == (48, 48)
        assert ((layer(x) - conv(x)).norm() / conv(x).norm()) < 0.15


def test_buffers_move_copy_and_reload():
    layer = Linear4bit.from_linear(_linear(), "nf4", 64, double_quant=True)
    x = torch.randn(2, 96)
    y = layer(x)
    clone = copy.deepcopy(layer)
    assert torch.equal(clone(x), y)
    moved = copy.deepcopy(layer).to(torch.device("cpu"))
    assert torch.equal(moved(x), y)
    keys = set(layer.state_dict())
    assert keys == {
        "weight",
        "weight.absmax",
        "weight.quant_map",
        "weight.nested_absmax",
        "weight.nested_quant_map",
        "weight.quant_state.bitsandbytes__nf4",
        "bias",
    }
    # a shell with the wrong double-quant setting still loads: the state carries its own format
    shell = Linear4bit(96, 40, bias=True, quant_type="nf4", double_quant=False)
    shell.load_state_dict(layer.state_dict(), strict=True)
    assert torch.equal(shell(x), y)
    with pytest.raises(RuntimeError, match="Missing"):
        Linear4bit(96, 40).load_state_dict({"weight": layer.weight, "bias": layer.bias})
    with pytest.raises(RuntimeError, match="checkpoint shape"):
        Linear4bit(40, 96).load_state_dict(layer.state_dict())


@pytest.mark.peer
def test_loads_a_bitsandbytes_linear4bit_state_dict():
    pytest.importorskip("bitsandbytes")
    bnb_functional()
    import bitsandbytes as bnb

    lin = _linear(in_f=128, out_f=64)
    theirs = bnb.nn.Linear4bit(128, 64, bias=True, compress_statistics=True, quant_type="nf4")
    theirs.load_state_dict(lin.state_dict())
    theirs = theirs.to("cpu")  # bitsandbytes quantizes on .to(); CPU is a valid device in 0.50
    sd = theirs.state_dict()
    ours = Linear4bit(128, 64, bias=True, quant_type="nf4", double_quant=True)
    ours.load_state_dict(sd)
    expected = Linear4bit.from_linear(lin, "nf4", 64, double_quant=True)
    assert torch.equal(bits(ours.dequantized_weight()), bits(expected.dequantized_weight()))
    assert set(sd) == set(expected.state_dict())


def test_bad_layer_settings():
    with pytest.raises(LmlabError, match="quant_type must be one of nf4, fp4, int4"):
        Linear4bit(8, 8, quant_type="nf3")
    with pytest.raises(LmlabError, match="impl must be one of"):
        Linear4bit(8, 8, impl="turbo")
    with pytest.raises(LmlabError, match="block_size"):
        Linear4bit(8, 8, block_size=100)
    with pytest.raises(LmlabError, match="threshold"):
        Linear8bit(8, 8, threshold=-1.0)
    lin = _linear()
    with torch.no_grad():
        lin.weight[2, 3] = float("nan")
    with pytest.raises(LmlabError, match=r"blocks\.0\.fc\.weight contains NaN"):
        Linear4bit.from_linear(lin, name="blocks.0.fc.weight")
    with pytest.raises(LmlabError, match=r"blocks\.0\.fc\.weight contains NaN"):
        Linear8bit.from_linear(lin, name="blocks.0.fc.weight")
