"""The format registry (lmlab.quant.formats): every reader takes its list from it, and every
registered format (int4 included) quantizes, saves, loads and decodes end to end."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from quant_helpers import bits, bnb_functional, logits, tiny_gpt2
from torch import nn

from lmlab.errors import LmlabError
from lmlab.quant import (
    Linear4bit,
    codebook,
    dequantize_4bit,
    load_quantized,
    quantize_,
    quantize_4bit,
    save_quantized,
)
from lmlab.quant.api import FourBitConfig, Int4Config, config_for, config_from_json
from lmlab.quant.formats import (
    BLOCK_SIZES,
    FORMATS,
    METHODS,
    QUANT_TYPES,
    check_block_size,
    check_quant_type,
)
from lmlab.quant.serialization import load_config


def test_every_reader_lists_the_registry():
    assert QUANT_TYPES == tuple(FORMATS) == ("nf4", "fp4", "int4")
    assert (*QUANT_TYPES, "int8") == METHODS
    for name, fmt in FORMATS.items():
        assert fmt.name == name and fmt.bits == 4
        values = codebook(name)
        assert values.shape == (16,) and values.dtype == torch.float32
        assert values.abs().max() == 1.0 and len(set(values.tolist())) >= 15  # fp4, int4: two zeros
        cls = config_for(name)
        assert issubclass(cls, FourBitConfig) and cls.quant_type == name
    from lmlab.cli import build_parser

    quantize = build_parser()._subparsers._group_actions[0].choices["quantize"]
    method = next(a for a in quantize._actions if a.dest == "method")
    assert tuple(method.choices) == METHODS


def test_the_registry_imports_no_torch():
    code = "import sys, lmlab.quant.formats; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_one_check_per_concept():
    for bad in ("nf3", "NF4", None, 4):
        with pytest.raises(LmlabError, match=r"^where: quant_type must be one of nf4, fp4, int4"):
            check_quant_type(bad, "where")
    for bad in (0, 16, 48, 8192, True, "64", 64.0 + 0.5):
        with pytest.raises(LmlabError, match=r"^where: block_size must be one of"):
            check_block_size(bad, "where")
    assert [check_block_size(b, "x") for b in BLOCK_SIZES] == list(BLOCK_SIZES)
    # the configs, the layer and the functions all raise the same check's message
    for build in (
        lambda: Int4Config(block_size=48),
        lambda: Linear4bit(8, 8, block_size=48),
        lambda: quantize_4bit(torch.ones(64), block_size=48),
        lambda: config_from_json({"method": "int4", "block_size": 48}),
    ):
        with pytest.raises(LmlabError, match="block_size must be one of 32, 64"):
            build()
    with pytest.raises(LmlabError, match="unknown quantization method 'nf5'"):
        config_from_json({"method": "nf5"})
    with pytest.raises(LmlabError, match="skip_modules"):
        Int4Config(skip_modules="lm_head")


@pytest.mark.peer
def test_bitsandbytes_flag_says_which_formats_it_reads():
    F = bnb_functional()
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    for name, fmt in FORMATS.items():
        if fmt.bitsandbytes:
            packed, state = F.quantize_4bit(w, blocksize=64, quant_type=name)
            assert torch.equal(packed, quantize_4bit(w, name, 64).packed)
            assert torch.equal(state.code, codebook(name))


@pytest.mark.parametrize("double_quant", [False, True])
def test_int4_layer_builds_saves_and_loads(double_quant, tmp_path):
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    layer = Linear4bit.from_linear(lin, "int4", 64, double_quant)
    shell = Linear4bit(96, 40, quant_type="int4", double_quant=double_quant)  # the one constructor
    shell.load_state_dict(layer.state_dict(), strict=True)
    x = torch.randn(3, 96)
    assert torch.equal(shell(x), layer(x))
    assert "weight.quant_state.bitsandbytes__int4" in layer.state_dict()
    q = quantize_4bit(lin.weight.detach(), "int4", 64, double_quant)
    assert torch.equal(bits(layer.dequantized_weight()), bits(dequantize_4bit(q)))


def test_int4_model_round_trip_through_save_and_load(tmp_path):
    model = tiny_gpt2()
    config = Int4Config(double_quant=True)
    quantize_(model, config)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    expected = logits(model, ids)
    out = save_quantized(model, tmp_path / "q", config)
    loaded = load_quantized(out)
    assert torch.equal(logits(loaded, ids), expected)
    assert load_config(out) == config
    assert {m.quant_type for m in loaded.modules() if isinstance(m, Linear4bit)} == {"int4"}
