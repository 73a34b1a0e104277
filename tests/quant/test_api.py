"""quantize_(model, Config) on Hugging Face T5 / BERT / GPT-2 / Llama; reports; save and load."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from quant_helpers import logits, tiny_models
from torch import nn

from lmlab.errors import LmlabError
from lmlab.quant import (
    FP4Config,
    Int8Config,
    Linear4bit,
    Linear8bit,
    NF4Config,
    load_quantized,
    quantize_,
    save_quantized,
)


@pytest.fixture(scope="module")
def models():
    return {name: m.eval() for name, m in tiny_models().items()}


IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
HEADS = {"t5": "lm_head", "bert": "cls.predictions.decoder", "gpt2": "lm_head", "llama": "lm_head"}


@pytest.mark.parametrize("name", ["t5", "bert", "gpt2", "llama"])
@pytest.mark.parametrize(
    "config,tolerance", [(NF4Config(), 0.2), (FP4Config(double_quant=True), 0.25), (Int8Config(), 0.03)]
)
def test_quantized_models_stay_close_to_float(models, name, config, tolerance):
    model = models[name]
    ref = logits(model, IDS)
    qmodel = copy.deepcopy(model)
    report = quantize_(qmodel, config)
    out = logits(qmodel, IDS)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < tolerance, rel
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
    assert cos > 0.97
    layer_type = Linear8bit if isinstance(config, Int8Config) else Linear4bit
    assert report.layers and all(isinstance(qmodel.get_submodule(n), layer_type) for n in report.layers)
    assert HEADS[name] in report.skipped and not isinstance(qmodel.get_submodule(HEADS[name]), layer_type)
    assert report.bytes_after < report.bytes_before and report.model_bytes_after < report.model_bytes_before


def test_gpt2_conv1d_layers_are_quantized(models):
    qmodel = copy.deepcopy(models["gpt2"])
    report = quantize_(qmodel, NF4Config())
    assert {"transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj"} <= set(report.layers)
    layer = qmodel.get_submodule("transformer.h.0.attn.c_attn")
    assert (layer.in_features, layer.out_features) == (64, 192)


def test_t5_keeps_wo_in_float_like_transformers(models):
    # T5 casts the input of `wo` to wo.weight.dtype; transformers keeps it in fp32 for bitsandbytes.
    qmodel = copy.deepcopy(models["t5"])
    report = quantize_(qmodel, NF4Config())
    assert "encoder.block.0.layer.1.DenseReluDense.wo" in report.skipped
    assert "encoder.block.0.layer.1.DenseReluDense.wi" in report.layers


def test_report_fields_and_table(models):
    qmodel = copy.deepcopy(models["llama"])
    report = quantize_(qmodel, NF4Config(double_quant=False))
    assert report.params == sum(
        qmodel.get_submodule(n).in_features * qmodel.get_submodule(n).out_features for n in report.layers
    )
    assert report.bytes_before == 4 * report.params
    assert 4.5 <= report.bits_per_param < 4.6  # 4 + 32/64 plus a 64-byte code table per layer
    text = str(report)
    assert "bits/param" in text and "quantized layers" in text and "whole model" in text
    assert "lm_head" in text
    json.dumps(report.to_json())


def test_filter_fn_chooses_layers():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    report = quantize_(model, Int8Config(threshold=0.0), filter_fn=lambda m, name: name == "2")
    assert report.layers == ("2",) and report.skipped == ("0",)
    assert isinstance(model[0], nn.Linear) and isinstance(model[2], Linear8bit)


def test_configs_validate():
    with pytest.raises(LmlabError, match="block_size"):
        NF4Config(block_size=48)
    with pytest.raises(LmlabError, match="compute_dtype"):
        FP4Config(compute_dtype=torch.int8)
    with pytest.raises(LmlabError, match="threshold"):
        Int8Config(threshold=-1)
    with pytest.raises(LmlabError, match="threshold"):
        Int8Config(threshold=float("nan"))
    with pytest.raises(
        LmlabError, match=r"expected a config \(NF4Config, FP4Config, Int4Config, Int8Config\)"
    ):
        quantize_(nn.Linear(2, 2), "nf4")
    with pytest.raises(LmlabError, match=r"0\.weight contains Inf"):
        model = nn.Sequential(nn.Linear(8, 8))
        with torch.no_grad():
            model[0].weight[0, 0] = float("inf")
        quantize_(model, NF4Config())


@pytest.mark.parametrize("name", ["t5", "gpt2"])
@pytest.mark.parametrize("config", [NF4Config(double_quant=True), FP4Config(), Int8Config()])
def test_save_and_load_without_requantizing(models, name, config, tmp_path, monkeypatch):
    qmodel = copy.deepcopy(models[name])
    quantize_(qmodel, config)
    expected = logits(qmodel, IDS)
    out_dir = save_quantized(qmodel, tmp_path / "q", config)
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "config.json",
        "lmlab_quant.json",
        "manifest.json",
        "model.safetensors",
    ]

    import lmlab.quant.functional as bw
    import lmlab.quant.modules as mods

    def no_quantizing(*args, **kwargs):
        raise AssertionError("loading must not quantize")

    def no_pickle(*args, **kwargs):
        raise AssertionError("loading must not unpickle")

    monkeypatch.setattr(bw, "quantize_4bit", no_quantizing)
    monkeypatch.setattr(mods, "quantize_4bit", no_quantizing)
    monkeypatch.setattr(mods, "quantize_int8_weight", no_quantizing)
    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = load_quantized(out_dir)
    assert not loaded.training
    assert torch.equal(logits(loaded, IDS), expected)


def test_safetensors_keys_use_bitsandbytes_layout(models, tmp_path):
    from safetensors import safe_open

    qmodel = copy.deepcopy(models["gpt2"])
    quantize_(qmodel, NF4Config(double_quant=True))
    save_quantized(qmodel, tmp_path / "q")
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        blob = f.get_tensor("transformer.h.0.attn.c_attn.weight.quant_state.bitsandbytes__nf4")
    prefix = "transformer.h.0.attn.c_attn.weight"
    for suffix in ("", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map"):
        assert prefix + suffix in keys
    meta = json.loads(bytes(blob.tolist()).decode())
    assert meta["quant_type"] == "nf4" and meta["blocksize"] == 64 and meta["shape"] == [192, 64]
    assert meta["nested_blocksize"] == 256 and meta["dtype"] == "float32"


def test_plain_module_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8))
    quantize_(model, NF4Config())
    x = torch.randn(3, 64)
    save_quantized(model, tmp_path / "q")
    with pytest.raises(LmlabError, match="pass the float model"):
        load_quantized(tmp_path / "q")
    torch.manual_seed(1)
    fresh = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8))
    assert torch.equal(load_quantized(tmp_path / "q", fresh)(x), model(x))
    with pytest.raises(LmlabError, match="not a quantized model directory"):
        load_quantized(tmp_path)
    with pytest.raises(LmlabError, match="no quantized layers"):
        save_quantized(nn.Linear(2, 2), tmp_path / "x")


# -- dequantize_ and skip-module matching (issue 14) -------------------------------------------------


@pytest.mark.parametrize(
    "name,pattern,hit",
    [
        ("transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_attn", True),  # full name
        ("transformer.h.0.attn.c_attn", "transformer.h.0", True),  # sub-tree prefix
        ("transformer.h.0.attn.c_attn", "attn.c_attn", True),  # dotted suffix
        ("transformer.h.0.attn.c_attn", "c_attn", True),
        ("transformer.h.10.attn.c_attn", "transformer.h.1", False),  # module boundaries only
        ("transformer.h.0.attn.xc_attn", "c_attn", False),
        ("transformer.h.0.attn.c_attn", "h.0", False),  # a prefix starts at the root, as in transformers
    ],
)
def test_matches_module(name, pattern, hit):
    from lmlab.quant.api import matches_module

    assert matches_module(name, pattern) is hit


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("config", [NF4Config(double_quant=True), Int8Config()], ids=["nf4", "int8"])
def test_dequantize_gives_the_float_architecture_back(kind, config):
    import transformers

    from lmlab.quant import dequantize_
    from lmlab.quant.api import quantized_layers

    model = tiny_models()[kind].eval()
    float_types = {n: type(m) for n, m in model.named_modules()}
    quantize_(model, config)
    want = {n: m.dequantized_weight() for n, m in quantized_layers(model).items()}
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    model.config.quantization_config = {"quant_method": "bitsandbytes"}
    assert dequantize_(model) is model
    assert not quantized_layers(model) and not hasattr(model.config, "quantization_config")
    assert {n: type(m) for n, m in model.named_modules()} == float_types  # GPT-2 gets Conv1D back
    for n, w in want.items():
        layer = model.get_submodule(n)
        got = layer.weight.t() if isinstance(layer, transformers.pytorch_utils.Conv1D) else layer.weight
        assert torch.equal(got, w) and layer.weight.requires_grad
    model(ids)  # runs as the float model it now is
    with pytest.raises(LmlabError, match="no lmlab quantized layers"):
        dequantize_(model)
