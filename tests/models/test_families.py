"""The model-family registry: one adapter per architecture, the one rule for which class loads a
directory, and each family's blocks (FSDP's units) and forward inputs."""

from __future__ import annotations

import pytest
import torch

from lmlab.errors import LmlabError
from lmlab.models import FAMILIES, PRESETS, build_model, family_of, get_preset, load_model, model_class
from lmlab.models.families import KINDS, get_family


def test_every_family_claims_its_own_model_types_and_every_preset_has_one():
    claimed = [t for f in FAMILIES.values() for t in f.model_types]
    assert len(claimed) == len(set(claimed))
    assert set(FAMILIES) == {"t5", "bert", "gpt2", "llama"}
    assert all(f.kind in KINDS for f in FAMILIES.values())
    assert {p.family_name for p in PRESETS.values()} == set(FAMILIES)


def test_unknown_model_type_and_family_are_one_line_errors():
    from transformers import BartConfig

    with pytest.raises(LmlabError, match="model type 'bart' is not one lmlab trains") as e:
        family_of(BartConfig())
    assert "\n" not in str(e.value)
    with pytest.raises(LmlabError, match="model type None"):
        family_of(torch.nn.Linear(2, 2))
    with pytest.raises(LmlabError, match="unknown model family 'opt'"):
        get_family("opt")


@pytest.mark.parametrize(
    "preset,cls,blocks",
    [
        ("t5-tiny", "T5ForConditionalGeneration", ("T5Block", 4)),
        ("bert-tiny", "BertForMaskedLM", ("BertLayer", 2)),
        ("gpt-tiny", "GPT2LMHeadModel", ("GPT2Block", 4)),
        ("llama-tiny", "LlamaForCausalLM", ("LlamaDecoderLayer", 4)),
    ],
)
def test_model_class_is_the_family_class_unless_architectures_names_one(preset, cls, blocks):
    m = build_model(preset, 300, seed=0)
    assert type(m).__name__ == cls
    assert model_class(m.config).__name__ == cls  # a fresh config names no architecture
    m.config.architectures = ["SomethingElse"]  # not a transformers class: the family's
    assert model_class(m.config).__name__ == cls
    units = family_of(m).blocks(m)  # what lmlab.train.distributed shards
    assert {type(b).__name__ for b in units} == {blocks[0]} and len(units) == blocks[1]


def test_model_class_is_the_saved_class_and_load_model_refuses_a_head_lmlab_does_not_train(tmp_path):
    from transformers import GPT2Config, GPT2ForSequenceClassification, RobertaConfig

    from lmlab.errors import LmlabError
    from lmlab.models import load_model

    c = GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=32, pad_token_id=0)
    GPT2ForSequenceClassification(c).save_pretrained(tmp_path)
    saved = type(c).from_pretrained(tmp_path)
    # lmlab quantize and --init agree on the class that loads the directory...
    assert model_class(saved) is GPT2ForSequenceClassification
    # ...and training/evaluation refuse it rather than drop its classifier for a fresh LM head.
    with pytest.raises(
        LmlabError, match=r"^the model is a GPT2ForSequenceClassification; lmlab trains .*GPT2LMHeadModel$"
    ):
        load_model(tmp_path)
    # A model type no family claims still has a class (lmlab quantize takes any HF model).
    r = RobertaConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=50
    )
    assert model_class(r).__name__ == "RobertaForMaskedLM"


def test_mt5_is_the_t5_family_with_its_own_class():
    from transformers import MT5Config

    c = MT5Config(d_model=16, d_ff=32, d_kv=4, num_layers=1, num_heads=2, vocab_size=50)
    assert family_of(c) is get_family("t5") and model_class(c).__name__ == "MT5ForConditionalGeneration"


def test_load_model_takes_the_familys_class(tmp_path):
    m = build_model("llama-tiny", 300, seed=0)
    m.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert all(
        torch.equal(a, b) for a, b in zip(m.state_dict().values(), loaded.state_dict().values(), strict=True)
    )


def test_forward_inputs_per_kind():
    ids = torch.randint(4, 100, (2, 6))
    labels = ids.clone()
    labels[0, 4:] = -100
    t5 = build_model("t5-tiny", 100, seed=0)
    kw = family_of(t5).forward_inputs(t5, {"input_ids": ids, "labels": labels}, start_id=0)
    assert kw["decoder_input_ids"][:, 0].tolist() == [0, 0] and kw["decoder_input_ids"][0, 5] == 0
    assert torch.equal(kw["decoder_input_ids"][:, 1:4], labels[:, :3])
    bert = build_model("bert-tiny", 100, seed=0)
    assert set(family_of(bert).forward_inputs(bert, {"input_ids": ids, "labels": labels})) == {"input_ids"}
    llama = get_preset("llama-tiny")
    m = build_model(llama, 100, seed=0)
    prefix = torch.zeros(2, 6, dtype=torch.long)
    prefix[:, :2] = 1
    kw = llama.adapter.forward_inputs(m, {"input_ids": ids, "labels": labels, "prefix_mask": prefix})
    assert kw["use_cache"] is False and kw["attention_mask"].shape == (2, 1, 6, 6)
    assert kw["attention_mask"][0, 0, 0, 1] and not kw["attention_mask"][0, 0, 2, 3]


@pytest.mark.slow
def test_llama_pretrains_causal_and_resumes_bit_identical(tmp_path):
    """A few causal steps of llama-tiny through ``lmlab.train.pretrain``; stopped at step 3 and resumed,
    the run ends with the same losses (exact float equality) as the run never stopped."""
    import os
    import signal
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
    from lmlab_train_fixtures import write_prepared

    from lmlab.train import PretrainConfig, pretrain

    data = write_prepared(tmp_path / "data", train_docs=200, val_docs=20)

    def cfg(out: str) -> PretrainConfig:
        return PretrainConfig(data=[str(data)], out=str(tmp_path / out), objective="causal", model="llama-tiny",
                              steps=5, batch_size=4, seq_len=32, eval_every=5, eval_batches=1, save_every=1,
                              keep=2, workers=0, progress=False, precision="fp32")  # fmt: skip

    def stop_at_3(step: int, loss) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    full = pretrain(cfg("full"))
    part = pretrain(cfg("part"), on_step=stop_at_3)
    assert part.stopped_by == "SIGTERM" and part.step == 3
    resumed = pretrain(PretrainConfig.resume_from(tmp_path / "part", progress=False))
    assert resumed.step == 5 and resumed.final_dir is not None
    assert [s for s, _ in full.losses] == [1, 2, 3, 4, 5]
    assert resumed.losses == [x for x in full.losses if x[0] > 3]
    assert resumed.evals[-1] == full.evals[-1]
    assert type(load_model(resumed.final_dir)).__name__ == "LlamaForCausalLM"
