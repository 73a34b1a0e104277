"""Streaming quantization and loading (lmlab.quant.streaming) equal the paths that hold the float model.

``quantize_pretrained(dir, config)`` must give, bit for bit, what ``quantize_(cls.from_pretrained(dir),
config)`` gives -- state dict, non-persistent buffers (Llama's RoPE ``inv_freq``), tied weights,
forward, report -- for one-file and sharded checkpoints, float32 and float16; and
``load_quantized_streaming(dir)`` what ``load_quantized(dir)`` gives. Peak memory is measured by
``bench/quant_memory.py``, not here (RSS of a tiny model is noise); what is tested is the property
that makes it low: each float weight is freed once its layer is quantized.
"""

from __future__ import annotations

import weakref
from pathlib import Path

import pytest
import torch
from quant_helpers import bits

from lmlab.errors import LmlabError
from lmlab.quant import api
from lmlab.quant.api import FP4Config, Int8Config, NF4Config, quantize_
from lmlab.quant.serialization import load_quantized, save_quantized
from lmlab.quant.streaming import (
    checkpoint_files,
    load_quantized_model,
    load_quantized_streaming,
    quantize_pretrained,
)

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

VOCAB = 160
IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))


def _gpt2():
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=32, bos_token_id=1, eos_token_id=2
    )
    return transformers.GPT2LMHeadModel(config)


def _llama():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    return transformers.LlamaForCausalLM(config)


def _t5():
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, decoder_start_token_id=0
    )
    return transformers.T5ForConditionalGeneration(config)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """gpt2: one file, tied head; llama: 6+ shards; llama16: float16 (config.json dtype float16);
    t5_16: float16 with transformers' _keep_in_fp32_modules (``wo`` loads in float32), tied head."""
    root = tmp_path_factory.mktemp("streaming")
    torch.manual_seed(0)
    _gpt2().save_pretrained(root / "gpt2")
    llama = _llama()
    llama.save_pretrained(root / "llama", max_shard_size="60KB")
    llama.half().save_pretrained(root / "llama16")
    _t5().half().save_pretrained(root / "t5_16")
    return {p.name: p for p in root.iterdir()}


def _from_pretrained(directory: Path):
    from lmlab.models.families import model_class
    from lmlab.models.presets import load_pretrained, read_hf_config

    return load_pretrained(model_class(read_hf_config(directory)), directory).eval()


def _assert_same_model(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        assert torch.equal(bits(sa[k]), bits(sb[k])), k
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())  # non-persistent ones too
    assert list(ba) == list(bb)
    for k in ba:
        assert ba[k].dtype == bb[k].dtype and torch.equal(ba[k], bb[k]), k
    tied = a.get_output_embeddings().weight is a.get_input_embeddings().weight
    assert tied == (b.get_output_embeddings().weight is b.get_input_embeddings().weight)
    assert [type(m).__name__ for m in a.modules()] == [type(m).__name__ for m in b.modules()]
    assert not b.training
    kw = {"input_ids": IDS}
    if a.config.is_encoder_decoder:
        kw["decoder_input_ids"] = IDS[:, :4]
    with torch.no_grad():
        assert torch.equal(a(**kw).logits, b(**kw).logits)


CASES = [
    ("gpt2", NF4Config()),
    ("gpt2", Int8Config()),
    ("llama", NF4Config(double_quant=True)),
    ("llama", FP4Config(block_size=128)),
    ("llama16", NF4Config(double_quant=True, compute_dtype=torch.float32)),
    ("llama16", Int8Config(threshold=0.0)),
]


@pytest.mark.parametrize(("name", "config"), CASES, ids=[f"{n}-{c.method}" for n, c in CASES])
def test_quantize_pretrained_is_bit_identical_to_quantizing_the_loaded_model(checkpoints, name, config):
    ref = _from_pretrained(checkpoints[name])
    ref_report = quantize_(ref, config)
    model, report = quantize_pretrained(checkpoints[name], config)
    _assert_same_model(ref, model)
    assert report == ref_report
    assert model.dtype == ref.dtype == (torch.float16 if name == "llama16" else torch.float32)
    assert model.config.to_dict() == ref.config.to_dict()


def test_sharded_checkpoint_is_read_shard_by_shard(checkpoints):
    files = checkpoint_files(checkpoints["llama"])
    assert len(files) > 5 and [f.name for f in files] == sorted(f.name for f in files)
    assert checkpoint_files(checkpoints["gpt2"]) == [checkpoints["gpt2"] / "model.safetensors"]


def test_a_filter_and_a_tied_quantized_head_follow_quantize_(checkpoints):
    # quantizing GPT-2's tied head unties it in quantize_; the stream must feed wte's tensor to both
    def keep(module, name):
        return "mlp" in name or name == "lm_head"

    ref = _from_pretrained(checkpoints["gpt2"])
    ref_report = quantize_(ref, NF4Config(), keep)
    model, report = quantize_pretrained(checkpoints["gpt2"], NF4Config(), keep)
    assert report == ref_report and "lm_head" in report.layers
    _assert_same_model(ref, model)


def test_keep_in_fp32_modules_and_an_all_layers_filter_on_t5_float16(checkpoints):
    # wo is loaded in float32 by from_pretrained; with this filter it is quantized from float32
    def everything(module, name):
        return True

    ref = _from_pretrained(checkpoints["t5_16"])
    assert ref.decoder.block[0].layer[2].DenseReluDense.wo.weight.dtype == torch.float32
    ref_report = quantize_(ref, NF4Config(), everything)
    model, report = quantize_pretrained(checkpoints["t5_16"], NF4Config(), everything)
    assert report == ref_report and "lm_head" in report.layers
    _assert_same_model(ref, model)


def test_each_float_weight_is_freed_once_its_layer_is_quantized(checkpoints, monkeypatch):
    made = api._make_4bit
    handed: list[weakref.ref] = []
    alive_at_each_call: list[int] = []

    def spy(module, config, name):
        alive_at_each_call.append(sum(r() is not None for r in handed))
        handed.append(weakref.ref(module.weight))
        return made(module, config, name)

    monkeypatch.setattr(api, "_make_4bit", spy)
    _, report = quantize_pretrained(checkpoints["llama"], NF4Config())
    assert len(handed) == len(report.layers) == 14
    assert alive_at_each_call == [0] * 14


@pytest.mark.parametrize(
    ("name", "config"),
    [("gpt2", NF4Config(double_quant=True)), ("llama16", Int8Config()), ("llama", FP4Config())],
    ids=["gpt2-nf4", "llama16-int8", "llama-fp4"],
)
def test_load_quantized_streaming_equals_load_quantized(checkpoints, tmp_path, name, config):
    model, _ = quantize_pretrained(checkpoints[name], config)
    save_quantized(model, tmp_path / "q", config)
    _assert_same_model(load_quantized(tmp_path / "q"), load_quantized_streaming(tmp_path / "q"))


# -------------------------------------------------------------------------------- refusals


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """A copy of the one-file checkpoint ``src`` with its tensors passed through ``edit(dict)``."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(src / "model.safetensors")
    save_file(edit(state), str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _drop_first_mlp(state):
    del state["transformer.h.0.mlp.c_fc.weight"]
    return state


def _nan(state):
    state["transformer.h.1.attn.c_proj.bias"][3] = float("nan")
    return state


def _wrong_shape(state):
    state["transformer.h.0.ln_1.weight"] = torch.ones(3)
    return state


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_drop_first_mlp, "lack 1 tensor.*h.0.mlp.c_fc.weight.*random"),
        (_nan, "h.1.attn.c_proj.bias contains NaN"),
        (_wrong_shape, r"h.0.ln_1.weight has shape \[3\]"),
    ],
    ids=["missing", "nan", "shape"],
)
def test_damaged_checkpoints_are_refused_in_one_line(checkpoints, tmp_path, edit, message):
    bad = _rewrite(checkpoints["gpt2"], tmp_path / "bad", edit)
    with pytest.raises(LmlabError, match=message) as e:
        quantize_pretrained(bad, NF4Config())
    assert "\n" not in str(e.value)


def test_pickled_and_quantized_inputs_are_refused(checkpoints, tmp_path):
    import shutil

    pickled = tmp_path / "pickled"
    shutil.copytree(checkpoints["gpt2"], pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(LmlabError, match="pickled"):
        quantize_pretrained(pickled, NF4Config())
    model, _ = quantize_pretrained(checkpoints["gpt2"], Int8Config())
    save_quantized(model, tmp_path / "q", Int8Config())
    with pytest.raises(LmlabError, match="already quantized"):
        quantize_pretrained(tmp_path / "q", NF4Config())


def test_load_quantized_model_refuses_a_stray_tensor(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    from lmlab.models.presets import read_hf_config
    from lmlab.quant.serialization import _read_meta

    model, _ = quantize_pretrained(checkpoints["gpt2"], NF4Config())
    save_quantized(model, tmp_path / "q", NF4Config())
    weights = tmp_path / "q" / "model.safetensors"
    state = load_file(weights)
    save_file({**state, "transformer.extra": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    layers = _read_meta(tmp_path / "q")["layers"]
    with pytest.raises(LmlabError, match="unexpected tensor transformer.extra"):
        load_quantized_model(read_hf_config(tmp_path / "q"), [tmp_path / "w.safetensors"], layers)


@pytest.mark.slow
@pytest.mark.peer
def test_load_quantized_model_reads_a_transformers_bitsandbytes_dir_as_load_quantized(checkpoints, tmp_path):
    # int8: its weight_format tags are the one difference to lmlab's own layout (4-bit is the same)
    import contextlib
    import logging

    pytest.importorskip("bitsandbytes")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from lmlab.models.presets import read_hf_config
    from lmlab.quant.hf import read_bnb_config
    from lmlab.quant.serialization import (
        _bnb_layers,
        _open_headers,
        _read_quantization_config,
        _weight_files,
    )

    q = transformers.BitsAndBytesConfig(load_in_8bit=True)
    peer = transformers.AutoModelForCausalLM.from_pretrained(
        checkpoints["llama"], quantization_config=q, device_map="cpu"
    )
    peer.save_pretrained(tmp_path / "bnb")
    settings = read_bnb_config(_read_quantization_config(tmp_path / "bnb"), "config.json")
    files = _weight_files(tmp_path / "bnb")
    with contextlib.ExitStack() as stack:
        header, handles = _open_headers(stack, files)
        layers = _bnb_layers(tmp_path / "bnb", settings, header, lambda k: handles[k][1].get_tensor(k))
    streamed = load_quantized_model(
        read_hf_config(tmp_path / "bnb"), files, layers, described_by="its quant state"
    )
    _assert_same_model(load_quantized(tmp_path / "bnb"), streamed)


def test_inspect_sees_the_skeleton_before_any_tensor_is_read(checkpoints):
    from lmlab.quant.api import unmatched_skip_modules

    def refuse_typos(skeleton):
        assert all(p.is_meta for p in skeleton.parameters())
        if unmatched := unmatched_skip_modules(skeleton, ["attn.c_atn"]):
            raise LmlabError(f"--skip-modules: no linear layer matches {', '.join(unmatched)}")

    with pytest.raises(LmlabError, match="c_atn"):
        quantize_pretrained(checkpoints["gpt2"], NF4Config(), inspect=refuse_typos)
