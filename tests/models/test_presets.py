"""Model presets: the shapes the papers give, the right HF classes, FLOPs that match known figures."""

from __future__ import annotations

import pytest

from lmlab.errors import LmlabError
from lmlab.models import PRESETS, build_model, family_of, get_preset


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.slow  # builds the 124M model
def test_gpt_is_gpt2_small():
    m = build_model("gpt", 50304, seed=0)
    assert type(m).__name__ == "GPT2LMHeadModel"
    assert 124.0e6 < n_params(m) < 124.9e6  # GPT-2 124M with nanoGPT's padded vocabulary
    assert m.config.resid_pdrop == m.config.attn_pdrop == 0.0


def test_t5_presets_are_v1_1_shapes():
    c = get_preset("t5-base").config
    assert (c["d_model"], c["d_ff"], c["num_layers"], c["num_heads"]) == (768, 2048, 12, 12)
    c = get_preset("t5-small").config
    assert (c["d_model"], c["d_ff"], c["num_layers"], c["num_heads"]) == (512, 1024, 8, 6)
    m = build_model("t5-tiny", 8192, seed=0)
    assert m.config.is_gated_act and m.config.dropout_rate == 0.0
    assert 1e6 < n_params(m) < 5e6


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_has_a_family(name):
    p = get_preset(name)
    assert p.adapter.name == p.family_name and p.kind in ("encoder-decoder", "encoder", "decoder")


def test_llama_presets_are_gpt_sized_with_swiglu_rmsnorm_and_rope():
    for llama, gpt in (("llama-tiny", "gpt-tiny"), ("llama-mini", "gpt-mini")):
        c, g = get_preset(llama).config, get_preset(gpt).config
        assert (c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"]) == (
            g["n_embd"], g["n_layer"], g["n_head"]
        )  # fmt: skip
        assert (
            c["intermediate_size"] % 32 == 0 and 0 <= c["intermediate_size"] - 8 * c["hidden_size"] / 3 < 32
        )
    m = build_model("llama-tiny", 512, seed=0)
    assert type(m.model.norm).__name__ == "LlamaRMSNorm" and m.config.hidden_act == "silu"
    assert m.config.rope_parameters["rope_type"] == "default" and not hasattr(m.model, "wpe")
    assert m.lm_head.weight is m.model.embed_tokens.weight  # tied, as the preset says
    gpt = build_model("gpt-tiny", 512, seed=0)
    # SwiGLU's three (d, 8d/3) matrices ~ GPT-2's two (d, 4d): about the same size without the position table
    assert abs(n_params(m) - (n_params(gpt) - gpt.transformer.wpe.weight.numel())) < 0.03 * n_params(m)


def test_small_presets_build_with_the_data_vocabulary():
    specials = {"pad": 0, "eos": 1}
    for name, cls in (("t5-tiny", "T5ForConditionalGeneration"), ("bert-tiny", "BertForMaskedLM"),
                      ("gpt-tiny", "GPT2LMHeadModel"), ("llama-tiny", "LlamaForCausalLM")):  # fmt: skip
        m = build_model(name, 512, specials, seed=0)
        assert type(m).__name__ == cls and m.config.vocab_size == 512
        assert family_of(m).kind == get_preset(name).kind and family_of(m) is get_preset(name).adapter


def test_seeded_build_is_reproducible_and_leaves_global_rng_alone():
    import torch

    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b = build_model("gpt-tiny", 512, seed=7), build_model("gpt-tiny", 512, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_unknown_preset():
    with pytest.raises(LmlabError, match="unknown model preset"):
        get_preset("t5-huge")


def test_load_model_round_trip_without_hugging_faces_bar(tmp_path, capsys):
    """``load_model`` (``--init``, evaluation) picks the Auto class and prints no loading bar of its own."""
    import torch

    from lmlab.models import load_model

    m = build_model("gpt-tiny", 300, seed=0)
    m.save_pretrained(tmp_path)
    capsys.readouterr()
    loaded = load_model(tmp_path)
    assert type(loaded).__name__ == "GPT2LMHeadModel"
    assert all(
        torch.equal(a, b) for a, b in zip(m.state_dict().values(), loaded.state_dict().values(), strict=True)
    )
    assert "%|" not in capsys.readouterr().err
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()  # switched back on after
