"""The transformers + bitsandbytes boundary: every quantized format through ``from_pretrained``.

lmlab's outputs load with a plain ``AutoModelForCausalLM.from_pretrained(out)`` as bitsandbytes'
own (NF4 / FP4 with and without double quantization, int8) and give lmlab's outputs; what
bitsandbytes cannot hold (int4, block 128) and a load without bitsandbytes fail loudly; directories
transformers + bitsandbytes ``save_pretrained`` wrote load with ``lmlab.quant.load_quantized`` and
give transformers' outputs. bitsandbytes 0.50 runs on CPU.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from quant_helpers import logits

pytest.importorskip("bitsandbytes")
pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")

from lmlab.errors import LmlabError  # noqa: E402
from lmlab.quant import (  # noqa: E402
    FP4Config,
    Int4Config,
    Int8Config,
    Linear4bit,
    Linear8bit,
    NF4Config,
    bnb_kwargs,
    load_quantized,
    quantize_,
    save_quantized,
)
from lmlab.quant.hf import quantization_config_for  # noqa: E402
from lmlab.quant.serialization import load_config  # noqa: E402

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def _tiny(kind: str):
    torch.manual_seed(0)
    if kind == "gpt2":  # Conv1D layers
        config = transformers.GPT2Config(
            vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=32, bos_token_id=1, eos_token_id=2
        )
        return transformers.GPT2LMHeadModel(config).eval()
    config = transformers.LlamaConfig(  # nn.Linear layers, untied head
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def float_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("float")
    dirs = {}
    for kind in ("gpt2", "llama"):
        _tiny(kind).save_pretrained(root / kind)
        dirs[kind] = root / kind
    return dirs


def _hf_load(path, **kw):
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report and progress bars
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(path, **kw).eval()
    finally:
        hf_logging.set_verbosity(verbosity)


CONFIGS = {
    "nf4-dq": NF4Config(double_quant=True),
    "nf4": NF4Config(),
    "fp4": FP4Config(),
    "fp4-dq-bf16": FP4Config(double_quant=True, compute_dtype=torch.bfloat16),
    "int8": Int8Config(),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_quantization_config_is_bitsandbytes_config_to_dict(name):
    """Field for field what transformers writes: BitsAndBytesConfig(**bnb_kwargs(config)).to_dict()."""
    config = CONFIGS[name]
    skip = ["lm_head", "model.layers.0.mlp.up_proj"]
    kwargs = {**bnb_kwargs(config), "llm_int8_skip_modules": skip}
    if "bnb_4bit_compute_dtype" in kwargs:
        kwargs["bnb_4bit_compute_dtype"] = getattr(torch, kwargs["bnb_4bit_compute_dtype"])
    want = transformers.BitsAndBytesConfig(**kwargs).to_dict()
    assert quantization_config_for(config, skip) == want


@pytest.mark.parametrize(
    "kind,name",
    [("llama", "nf4-dq"), ("gpt2", "nf4"), ("gpt2", "fp4"), ("llama", "fp4-dq-bf16"), ("gpt2", "int8")],
)
def test_transformers_loads_lmlab_output_as_bitsandbytes(tmp_path, kind, name):
    import bitsandbytes as bnb

    config = CONFIGS[name]
    model = _tiny(kind)
    quantize_(model, config)
    out = save_quantized(model, tmp_path / "q", config)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["llm_int8_skip_modules"] == ["lm_head"]
    loaded = _hf_load(out)  # no quantization_config, no device_map: what config.json says
    layers = [n for n, m in loaded.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]
    ours = [n for n, m in model.named_modules() if isinstance(m, (Linear4bit, Linear8bit))]
    assert layers == ours and len(ours) == {"gpt2": 8, "llama": 14}[kind]
    a, b = logits(model, IDS), logits(loaded, IDS)
    if isinstance(config, Int8Config):  # same codes and scales; bitsandbytes' CPU product differs slightly
        assert _cos(a, b) > 0.9999
    else:  # the same bytes decoded by the same law: measured identical (max |diff| 0.0)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("config", [Int4Config(), NF4Config(block_size=128)], ids=["int4", "nf4-block128"])
def test_what_bitsandbytes_cannot_hold_fails_in_transformers(tmp_path, config):
    model = _tiny("gpt2")
    quantize_(model, config)
    out = save_quantized(model, tmp_path / "q", config)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "lmlab" and qc["method"] == config.method
    assert "load_in_4bit" not in qc and "load_in_8bit" not in qc  # never claims bitsandbytes
    with pytest.raises((RuntimeError, ValueError), match="mismatch"):
        _hf_load(out)  # transformers warns "Unknown quantization type, got lmlab", then refuses the sizes
    torch.testing.assert_close(logits(load_quantized(out), IDS), logits(model, IDS), atol=0, rtol=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_without_bitsandbytes_the_load_fails_loudly(tmp_path, monkeypatch, bits):
    import transformers.quantizers.quantizer_bnb_4bit as q4
    import transformers.quantizers.quantizer_bnb_8bit as q8

    config = NF4Config() if bits == 4 else Int8Config()
    model = _tiny("gpt2")
    quantize_(model, config)
    out = save_quantized(model, tmp_path / "q", config)
    monkeypatch.setattr(q4 if bits == 4 else q8, "is_bitsandbytes_available", lambda: False)
    with pytest.raises(ImportError, match="requires bitsandbytes"):
        _hf_load(out)


@pytest.fixture(scope="module")
def bnb_dirs(float_dirs, tmp_path_factory):
    """Directories written by transformers + bitsandbytes save_pretrained, and the models that wrote them."""
    root = tmp_path_factory.mktemp("bnb")
    settings = {
        "nf4-dq": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
        "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
        "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
        "int8": {"load_in_8bit": True},
    }
    out = {}
    for name, kw in settings.items():
        kind = "gpt2" if name in ("nf4", "int8") else "llama"
        model = _hf_load(float_dirs[kind], quantization_config=transformers.BitsAndBytesConfig(**kw))
        model.save_pretrained(root / name)
        out[name] = (root / name, model)
    return out


@pytest.mark.parametrize("name", ["nf4-dq", "nf4", "fp4", "int8"])
def test_load_quantized_reads_bitsandbytes_directories(bnb_dirs, name):
    directory, bnb_model = bnb_dirs[name]
    assert not (directory / "lmlab_quant.json").exists()
    model = load_quantized(directory)
    ours = {n: m for n, m in model.named_modules() if isinstance(m, (Linear4bit, Linear8bit))}
    assert len(ours) == (8 if name in ("nf4", "int8") else 14)
    # the tensors as bitsandbytes wrote them, key for key (weight_format is bitsandbytes' own tag)
    theirs = {k: v for k, v in bnb_model.state_dict().items() if not k.endswith("weight_format")}
    mine = model.state_dict()
    for key in ours:
        for k in [k for k in theirs if k.startswith(f"{key}.")]:
            assert torch.equal(mine[k].cpu(), theirs[k].cpu()), k
    a, b = logits(model, IDS), logits(bnb_model, IDS)
    if name == "int8":
        assert _cos(a, b) > 0.9999
    else:
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    config = load_config(directory)
    assert config.method == {"nf4-dq": "nf4", "nf4": "nf4", "fp4": "fp4", "int8": "int8"}[name]
    if name != "int8":
        assert config.double_quant == (name == "nf4-dq") and config.compute_dtype == torch.float32


@pytest.mark.parametrize("config", [NF4Config(double_quant=True), Int8Config()], ids=["nf4-dq", "int8"])
def test_bitsandbytes_holds_lmlab_tensors_as_written(tmp_path, config):
    """lmlab output -> transformers + bitsandbytes: its layers hold lmlab's tensors, key for key.
    (transformers 5.24 cannot save_pretrained a model it loaded pre-quantized, its own included:
    NotImplementedError in Bnb4bitDeserialize.reverse_op, so the state dict is compared instead.)"""
    model = _tiny("llama")
    quantize_(model, config)
    out = save_quantized(model, tmp_path / "q", config)
    theirs = _hf_load(out).state_dict()
    mine = model.state_dict()
    assert mine.keys() == theirs.keys()  # int8: weight, SCB and weight_format
    for k in mine:
        assert torch.equal(mine[k], theirs[k].to(mine[k].dtype)), k


def _with_quantization_config(src, dst, qc):
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = qc
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(
    "edit,message",
    [
        ({"quant_method": "gptq", "bits": 4, "load_in_4bit": False, "load_in_8bit": False}, "is gptq"),
        ({"bnb_4bit_quant_storage": "bfloat16"}, "quant_storage"),
        ({"bnb_4bit_quant_type": "fp4"}, "is nf4 with double quantization, but quantization_config says fp4"),
        (
            {"load_in_4bit": False, "load_in_8bit": True, "_load_in_4bit": False, "_load_in_8bit": True},
            "4-bit quant states",
        ),
        ({"llm_int8_skip_modules": "lm_head"}, "list of names"),
    ],
)
def test_unreadable_quantization_config_is_one_line(bnb_dirs, tmp_path, edit, message):
    directory, _ = bnb_dirs["nf4-dq"]
    qc = {**json.loads((directory / "config.json").read_text())["quantization_config"], **edit}
    bad = _with_quantization_config(directory, tmp_path / "bad", qc)
    with pytest.raises(LmlabError, match=message) as e:
        load_quantized(bad)
    assert "\n" not in str(e.value)


def test_damaged_config_json_is_one_line(bnb_dirs, tmp_path):
    import shutil

    directory, _ = bnb_dirs["int8"]
    shutil.copytree(directory, tmp_path / "bad")
    (tmp_path / "bad" / "config.json").write_text('{"quantization_config": {"load_in_8bit": tr')
    with pytest.raises(LmlabError, match="not valid JSON") as e:
        load_quantized(tmp_path / "bad")
    assert "\n" not in str(e.value)
