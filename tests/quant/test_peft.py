"""The peft boundary: QLoRA (LoRA adapters beside lmlab's frozen 4-bit / int8 layers) trained, saved
and reloaded exactly as users do it with bitsandbytes, and the adapters loaded onto bitsandbytes."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
T = pytest.importorskip("transformers")

from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training  # noqa: E402

from lmlab.errors import LmlabError  # noqa: E402
from lmlab.quant import Int8Config, Linear4bit, Linear8bit, NF4Config, quantize_  # noqa: E402
from lmlab.quant.peft import LoraLinear4bit, LoraLinear8bit, register_lora_layers  # noqa: E402

LLAMA = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
GPT2 = dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2)
GPT2.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # deterministic losses and logits
PROJ = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # Conv1D in the float model: lmlab stores them (out, in)
}
PER_BLOCK = {"llama": 7, "gpt2": 4}  # GPT-2 has a c_proj in attn and in mlp
IDS = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
CASES = [
    pytest.param("gpt2", NF4Config(double_quant=True), LoraLinear4bit, id="gpt2-nf4-dq"),
    pytest.param("llama", Int8Config(), LoraLinear8bit, id="llama-int8"),
]


def float_model(arch: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    if arch == "llama":
        model = T.LlamaForCausalLM(T.LlamaConfig(**LLAMA))
    else:
        model = T.GPT2LMHeadModel(T.GPT2Config(**GPT2))
    return model.to(dtype).eval()


def quantized(arch: str, config, dtype: torch.dtype = torch.float32) -> nn.Module:
    model = float_model(arch, dtype)
    quantize_(model, config)
    return model


def lora(arch: str, **kwargs) -> LoraConfig:
    return register_lora_layers(LoraConfig(r=8, target_modules=PROJ[arch], task_type="CAUSAL_LM", **kwargs))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def base_key(peft_key: str) -> str:
    """``base_model.model.x.base_layer.weight`` -> ``x.weight``: the key the base model had."""
    return peft_key.removeprefix("base_model.model.").replace(".base_layer", "")


def randomize_adapters_(model: nn.Module, seed: int = 1) -> None:
    """lora_B starts at zero (a no-op adapter); give every adapter a visible, fixed delta."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "qconfig", "lora_cls"), CASES)
def test_qlora_trains_saves_and_reloads(tmp_path, arch, qconfig, lora_cls):
    model = quantized(arch, qconfig)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, lora(arch))
    targets = [n for n, m in model.named_modules() if isinstance(m, lora_cls)]
    assert len(targets) == PER_BLOCK[arch] * 2  # every projection of both blocks
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(10):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses

    # the quantized base (and every other base tensor) is frozen and bit-for-bit unchanged
    after = {base_key(k): v for k, v in model.state_dict().items() if "lora_" not in k}
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)

    model.eval()
    expected = logits(model)
    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    names = [n.removeprefix("base_model.model.") for n in targets]
    assert keys == {f"base_model.model.{n}.lora_{ab}.weight" for n in names for ab in "AB"}

    config = register_lora_layers(LoraConfig.from_pretrained(tmp_path))
    reloaded = PeftModel.from_pretrained(quantized(arch, qconfig), tmp_path, config=config)
    assert all(isinstance(reloaded.get_submodule(n), lora_cls) for n in targets)
    assert torch.equal(logits(reloaded), expected)


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "qconfig", "lora_cls"), CASES)
def test_merge_and_unload_dequantizes_and_merges(arch, qconfig, lora_cls):
    model = get_peft_model(quantized(arch, qconfig), lora(arch))
    randomize_adapters_(model)
    adapted = logits(model)
    base = logits(quantized(arch, qconfig))
    assert not torch.allclose(base, adapted, atol=1e-2)  # the adapters do something
    quant_cls = Linear4bit if lora_cls is LoraLinear4bit else Linear8bit
    conv1d = arch == "gpt2"  # quantize_ recorded it, so the merge gives a Conv1D back
    merged = model.merge_and_unload()
    assert not any(isinstance(m, (lora_cls, quant_cls)) for m in merged.modules())
    float_cls = T.pytorch_utils.Conv1D if conv1d else nn.Linear
    layers = [m for n, m in merged.named_modules() if n.split(".")[-1] in PROJ[arch]]
    assert len(layers) == PER_BLOCK[arch] * 2 and all(type(m) is float_cls for m in layers)
    # int8: the adapted model also rounds its activations (LLM.int8()); the merged one does not
    tol = 2e-2 if quant_cls is Linear8bit else 1e-4
    torch.testing.assert_close(logits(merged), adapted, rtol=tol, atol=tol)


def test_merge_then_unmerge_restores_the_quantized_layer():
    model = get_peft_model(quantized("llama", NF4Config(double_quant=True)), lora("llama"))
    randomize_adapters_(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    quant = layer.get_base_layer()
    state = {k: v.clone() for k, v in quant.state_dict().items()}
    want = quant.dequantized_weight(torch.float32) + layer.get_delta_weight("default")
    adapted = logits(model)
    model.merge_adapter()
    assert type(layer.get_base_layer()) is nn.Linear
    assert torch.equal(layer.get_base_layer().weight, want)
    assert "_quantized_base" not in "".join(model.state_dict())  # the stash is not a submodule
    torch.testing.assert_close(logits(model), adapted, rtol=1e-4, atol=1e-4)
    model.unmerge_adapter()
    assert layer.get_base_layer() is quant
    assert all(torch.equal(v, state[k]) for k, v in quant.state_dict().items())
    assert torch.equal(logits(model), adapted)


def test_refuses_what_reads_the_quantized_weight():
    with pytest.raises(LmlabError, match="use_dora.*not supported"):
        get_peft_model(quantized("llama", NF4Config()), lora("llama", use_dora=True))
    with pytest.raises(LmlabError, match="reads the base weight"):
        get_peft_model(quantized("llama", Int8Config()), lora("llama", init_lora_weights="pissa"))
    with pytest.raises(LmlabError, match="expected a peft LoraConfig"):
        register_lora_layers({"r": 8})


def test_prepare_model_for_kbit_training_freezes_and_casts_to_fp32():
    model = quantized("llama", NF4Config(compute_dtype=torch.bfloat16), dtype=torch.bfloat16)
    packed = {k: v.clone() for k, v in model.state_dict().items() if v.dtype == torch.uint8}
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    assert not any(p.requires_grad for p in model.parameters())
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # norms, embeddings, biases, head
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in packed.items())
    model = get_peft_model(model, lora("llama"))
    a = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert a.dtype == torch.float32  # peft's autocast_adapter_dtype, as for bitsandbytes


def test_quantize_marks_the_model_as_transformers_marks_a_bitsandbytes_model():
    assert quantized("llama", NF4Config()).is_loaded_in_4bit is True
    assert quantized("llama", Int8Config()).is_loaded_in_8bit is True


def test_prepare_model_for_kbit_training_enables_gradient_checkpointing():
    model = prepare_model_for_kbit_training(quantized("llama", NF4Config()), use_gradient_checkpointing=True)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    emb = model.get_input_embeddings()(IDS)
    assert emb.requires_grad  # enable_input_require_grads, so reentrant checkpoints reach the adapters


def test_quantized_layers_remember_conv1d():
    assert Linear8bit.from_linear(T.pytorch_utils.Conv1D(8, 64)).conv1d is True
    assert Linear4bit.from_linear(nn.Linear(64, 8)).conv1d is False
    model = quantized("gpt2", NF4Config())
    assert model.transformer.h[0].attn.c_attn.conv1d is True


@pytest.mark.parametrize("qconfig", [NF4Config(), Int8Config()], ids=["nf4", "int8"])
def test_all_linear_adapts_the_quantized_layers_not_the_head(qconfig):
    config = register_lora_layers(LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    model = get_peft_model(quantized("llama", qconfig), config)
    want = {f"model.layers.{i}.{p}.{n}" for i in range(2) for p, ns in _LLAMA_BLOCK.items() for n in ns}
    assert set(model.peft_config["default"].target_modules) == want
    lora_cls = LoraLinear4bit if isinstance(qconfig, NF4Config) else LoraLinear8bit
    adapted = {
        n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, lora_cls)
    }
    assert adapted == want
    head = model.get_output_embeddings()
    assert type(head) is nn.Linear  # the float head: neither quantized nor adapted


_LLAMA_BLOCK = {
    "self_attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
}


@pytest.mark.slow
def test_adapters_trained_on_lmlab_load_onto_bitsandbytes(tmp_path):
    pytest.importorskip("bitsandbytes")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    float_model("llama").save_pretrained(tmp_path / "float")
    model = get_peft_model(quantized("llama", NF4Config(double_quant=True)), lora("llama"))
    randomize_adapters_(model)
    model.save_pretrained(tmp_path / "adapter")
    bnb_config = T.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    theirs = T.AutoModelForCausalLM.from_pretrained(
        tmp_path / "float", quantization_config=bnb_config, device_map="cpu"
    )
    theirs = PeftModel.from_pretrained(theirs, tmp_path / "adapter")  # peft's own bnb LoRA layers
    assert type(theirs.base_model.model.model.layers[0].self_attn.q_proj).__module__ == "peft.tuners.lora.bnb"
    torch.testing.assert_close(logits(theirs), logits(model), rtol=1e-5, atol=1e-5)
