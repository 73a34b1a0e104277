"""The registry (get_objective, make_objective, @register_objective), the Objective protocol,
from_tokenizer with lmlab's tokenizer layout, and what every objective does on any device."""

from __future__ import annotations

import argparse
import dataclasses
from typing import ClassVar

import pytest
import torch

from lmlab.errors import LmlabError
from lmlab.objectives import (
    IGNORE_INDEX,
    OBJECTIVES,
    BertMLM,
    BertStyle,
    CausalLM,
    Deshuffle,
    DropTokens,
    MassStyle,
    Objective,
    PrefixLM,
    SpanCorruption,
    get_objective,
    make_objective,
    objective_names,
    register_objective,
)
from lmlab.objectives import cli as corrupt_cli
from lmlab.objectives.base import ARCHITECTURES as KINDS
from lmlab.objectives.base import KIND_DEFAULTS, LengthPreserving

ARCHITECTURES = {
    "span": ("encoder-decoder",),
    "iid-span": ("encoder-decoder",),
    "bert": ("encoder",),
    "bert-style": ("encoder-decoder",),
    "mass": ("encoder-decoder",),
    "drop": ("encoder-decoder",),
    "prefix": ("encoder-decoder", "decoder"),
    "deshuffle": ("encoder-decoder",),
    "causal": ("decoder",),
}


def test_names_classes_and_architectures(hf_tokenizer):
    assert set(OBJECTIVES) == set(ARCHITECTURES)
    classes = {
        "span": SpanCorruption,
        "iid-span": SpanCorruption,
        "bert": BertMLM,
        "bert-style": BertStyle,
        "mass": MassStyle,
        "drop": DropTokens,
        "prefix": PrefixLM,
        "deshuffle": Deshuffle,
        "causal": CausalLM,
    }
    V = len(hf_tokenizer)
    tokens = torch.randint(4, V - 100, (3, 40), generator=torch.Generator().manual_seed(0))
    for name, arch in ARCHITECTURES.items():
        objective = get_objective(name, hf_tokenizer)
        assert type(objective) is classes[name]
        assert objective.architectures == arch
        assert set(arch) <= set(KINDS) == {"encoder-decoder", "encoder", "decoder"}
        assert objective.raw_length(512) == (568 if name == "span" else 512)
        batch = objective(tokens, generator=torch.Generator().manual_seed(1))
        keys = {"input_ids", "attention_mask", "labels"}
        if arch[0] == "encoder-decoder":
            keys.add("decoder_input_ids")
        assert set(batch) == keys
        for v in batch.values():
            assert v.dtype == torch.long and v.shape[0] == 3
        ids = torch.cat([batch["input_ids"].flatten(), batch["labels"].flatten()])
        ids = ids[ids != IGNORE_INDEX]
        assert ids.min() >= 0 and ids.max() < V
    assert get_objective("iid-span", hf_tokenizer).noise == "iid"
    assert get_objective("prefix", hf_tokenizer, decoder_only=True).decoder_only


def test_from_tokenizer_reads_lmlab_layout(hf_tokenizer, tokenizer_dir):
    V = len(hf_tokenizer)
    sc = SpanCorruption.from_tokenizer(hf_tokenizer)
    assert (sc.sentinel_id, sc.eos_id, sc.pad_id, sc.num_sentinels) == (V - 1, 1, 0, 100)
    mlm = BertMLM.from_tokenizer(hf_tokenizer)
    assert (mlm.vocab_size, mlm.mask_id, mlm.pad_id) == (V, 3, 0)
    assert {0, 1, 2, 3, V - 1, V - 100} <= set(mlm.special_ids) and V - 101 not in mlm.special_ids
    t5 = BertMLM.from_tokenizer(hf_tokenizer, preset="t5")
    assert (t5.mask_replace_prob, t5.random_replace_prob) == (0.9, 0.1)
    # A raw tokenizers.Tokenizer and a path work too.
    from lmlab.data import read_tokenizer

    assert SpanCorruption.from_tokenizer(read_tokenizer(tokenizer_dir)) == sc
    assert get_objective("span", tokenizer_dir) == sc
    assert get_objective("bert", str(tokenizer_dir)) == mlm


def test_user_mistakes_are_one_line_errors(hf_tokenizer):
    with pytest.raises(LmlabError, match="unknown objective"):
        get_objective("t5", hf_tokenizer)
    with pytest.raises(LmlabError, match="noise_density"):
        get_objective("span", hf_tokenizer, noise_density=2.0)
    with pytest.raises(LmlabError, match="unexpected keyword"):
        get_objective("causal", hf_tokenizer, noise_density=0.1)
    with pytest.raises(LmlabError, match="preset"):
        get_objective("bert", hf_tokenizer, preset="roberta")
    with pytest.raises(LmlabError, match="right-padded"):
        CausalLM()(torch.ones(1, 3, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 1]]))
    with pytest.raises(LmlabError, match="shape"):
        CausalLM()(torch.ones(3, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_every_objective_follows_the_device(name, hf_tokenizer):
    objective = get_objective(name, hf_tokenizer)
    V = len(hf_tokenizer)
    gen = torch.Generator(device="cuda").manual_seed(0)
    tokens = torch.randint(4, V - 100, (16, 300), device="cuda", generator=gen)
    mask = (
        torch.arange(300, device="cuda") < torch.randint(0, 301, (16, 1), device="cuda", generator=gen)
    ).long()
    for attention_mask in (None, mask):
        before = tokens.clone()
        a = objective(
            tokens, attention_mask=attention_mask, generator=torch.Generator(device="cuda").manual_seed(1)
        )
        b = objective(
            tokens, attention_mask=attention_mask, generator=torch.Generator(device="cuda").manual_seed(1)
        )
        assert torch.equal(tokens, before)
        for k, v in a.items():
            assert v.device.type == "cuda" and torch.equal(v, b[k]), k
        ids = torch.cat([a["input_ids"].flatten(), a["labels"].flatten()])
        ids = ids[ids != IGNORE_INDEX]
        assert ids.numel() == 0 or (ids.min() >= 0 and ids.max() < V)
        n_in = a["attention_mask"].sum(dim=1)
        if name in ("span", "iid-span"):
            from lmlab.objectives import reference as ref

            sentinels = set(range(V - 100, V))
            cpu = {k: v.cpu() for k, v in a.items()}
            lengths = [300] * 16 if attention_mask is None else mask.sum(dim=1).tolist()
            for r in range(16):
                row_in = cpu["input_ids"][r, : int(n_in[r])].tolist()
                row_t = [t for t in cpu["labels"][r].tolist() if t != IGNORE_INDEX]
                assert ref.merge_on_sentinels(row_in, row_t, sentinels, 1) == tokens[r, : lengths[r]].tolist()


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0, 0), (1, 1)])
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_empty_and_tiny_batches(name, shape, hf_tokenizer):
    objective = get_objective(name, hf_tokenizer)
    tokens = torch.full(shape, 7, dtype=torch.long)
    batch = objective(tokens, generator=torch.Generator().manual_seed(0))
    for v in batch.values():
        assert v.shape[0] == shape[0] and v.dtype == torch.long
    assert batch["attention_mask"].shape == batch["input_ids"].shape
    if name == "span":
        # Widths follow the row length alone, even for an empty batch.
        assert (batch["input_ids"].shape[1], batch["labels"].shape[1]) == objective.output_widths(shape[1])


def test_objectives_pickle_for_dataloader_workers(hf_tokenizer):
    # DataLoader workers started with spawn receive the objective pickled.
    import pickle

    tokens = torch.randint(4, len(hf_tokenizer) - 100, (2, 50))
    for name in ARCHITECTURES:
        objective = get_objective(name, hf_tokenizer)
        clone = pickle.loads(pickle.dumps(objective))
        assert clone == objective and hash(clone) == hash(objective)
        a = objective(tokens, generator=torch.Generator().manual_seed(0))
        b = clone(tokens, generator=torch.Generator().manual_seed(0))
        assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- protocol


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_every_registered_objective_is_an_objective(name, hf_tokenizer):
    cls, defaults = OBJECTIVES[name]
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
    assert cls.architectures and set(cls.architectures) <= set(KINDS)
    objective = cls.from_tokenizer(hf_tokenizer, **defaults)
    assert isinstance(objective, Objective)
    assert objective == get_objective(name, hf_tokenizer)
    with pytest.raises(dataclasses.FrozenInstanceError):
        objective.pad_id = 5  # type: ignore[misc]
    for kind in cls.architectures:  # each kind it trains builds, with that kind's defaults
        assert make_objective(name, hf_tokenizer, kind).architectures == cls.architectures


def test_make_objective_fits_the_model_kind(hf_tokenizer):
    assert make_objective("prefix", hf_tokenizer, "decoder").decoder_only
    assert not make_objective("prefix", hf_tokenizer, "encoder-decoder").decoder_only
    # An encoder-decoder prefix batch given to a decoder trains on misaligned labels: refused.
    with pytest.raises(LmlabError) as e:
        make_objective("prefix", hf_tokenizer, "decoder", {"decoder_only": False})
    assert str(e.value) == (
        "PrefixLM(decoder_only=False) batches do not fit a decoder model; use decoder_only=True"
    )
    with pytest.raises(LmlabError, match=r"decoder_only=True\) batches do not fit a encoder-decoder"):
        make_objective("prefix", hf_tokenizer, "encoder-decoder", {"decoder_only": True})
    assert (
        make_objective("span", hf_tokenizer, "encoder-decoder", {"noise_density": 0.3}).noise_density == 0.3
    )
    with pytest.raises(LmlabError) as e:
        make_objective("span", hf_tokenizer, "decoder")
    assert str(e.value) == (
        "objective 'span' trains encoder-decoder (t5-*) models, but the model is decoder (gpt-*)"
    )
    with pytest.raises(
        LmlabError,
        match=r"trains decoder \(gpt-\*\) or encoder-decoder \(t5-\*\) models, but the model is encoder",
    ):
        make_objective("prefix", hf_tokenizer, "encoder")


def _tiny(kind: str):
    import transformers

    small = dict(vocab_size=1000)
    if kind == "t5":
        return transformers.T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, **small)
    if kind == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, **small)
    if kind == "roberta":  # no lmlab family: its kind comes from the config
        return transformers.RobertaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, **small)
    return transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, **small)


def test_get_objective_for_a_model_builds_its_variant_and_refuses_a_mismatch(hf_tokenizer):
    import transformers

    gpt = transformers.GPT2LMHeadModel(_tiny("gpt2"))
    assert get_objective("prefix", hf_tokenizer, model=gpt).decoder_only
    assert get_objective("prefix", hf_tokenizer, model=_tiny("gpt2")).decoder_only  # a config does too
    assert not get_objective("prefix", hf_tokenizer, model=_tiny("t5")).decoder_only
    assert get_objective("prefix", hf_tokenizer, kind="decoder").decoder_only
    assert not get_objective("prefix", hf_tokenizer).decoder_only  # no model: the registered default
    assert type(get_objective("bert", hf_tokenizer, model=_tiny("roberta"))) is BertMLM
    with pytest.raises(
        LmlabError,
        match=r"^objective 'span' trains encoder-decoder \(t5-\*\) models, but the model is decoder",
    ):
        get_objective("span", hf_tokenizer, model=gpt)
    with pytest.raises(LmlabError, match=r"^objective 'causal' trains decoder .* the model is encoder "):
        get_objective("causal", hf_tokenizer, model=_tiny("bert"))
    with pytest.raises(LmlabError, match=r"decoder_only=False\) batches do not fit a decoder model"):
        get_objective("prefix", hf_tokenizer, model=gpt, decoder_only=False)
    with pytest.raises(LmlabError, match=r"^kind='encoder' but the model is decoder$"):
        get_objective("bert", hf_tokenizer, model=gpt, kind="encoder")
    with pytest.raises(LmlabError, match=r"^unknown model kind 'gpt'"):
        get_objective("causal", hf_tokenizer, kind="gpt")
    with pytest.raises(LmlabError, match=r"cannot tell what kind of model a Linear is"):
        get_objective("causal", hf_tokenizer, model=torch.nn.Linear(2, 2))


def test_instance_kinds(hf_tokenizer):
    assert get_objective("prefix", hf_tokenizer).kinds == ("encoder-decoder",)
    assert get_objective("prefix", hf_tokenizer, decoder_only=True).kinds == ("decoder",)
    assert get_objective("span", hf_tokenizer).kinds == ("encoder-decoder",)
    get_objective("causal", hf_tokenizer).check_kind("decoder")
    with pytest.raises(LmlabError, match=r"^CausalLM trains decoder models, but the model is encoder$"):
        get_objective("causal", hf_tokenizer).check_kind("encoder")


# ---------------------------------------------------------------------------------------------- decorator


@pytest.fixture
def registry():
    """The live registry, restored after the test: a toy objective must not leak into others."""
    saved = dict(OBJECTIVES), {k: dict(v) for k, v in KIND_DEFAULTS.items()}
    yield OBJECTIVES
    OBJECTIVES.clear()
    OBJECTIVES.update(saved[0])
    KIND_DEFAULTS.clear()
    KIND_DEFAULTS.update(saved[1])


def _toy():
    @dataclasses.dataclass(frozen=True)
    class Reverse(LengthPreserving):
        """Input: the row reversed; target: the row (a toy, one file's worth of objective)."""

        pad_id: int = 0
        scale: int = 1

        architectures: ClassVar[tuple[str, ...]] = ("encoder", "decoder")

        def transform(self, tokens, lengths, generator):
            return {
                "input_ids": tokens.flip(1) * self.scale,
                "attention_mask": torch.ones_like(tokens),
                "labels": tokens.clone(),
            }

    return Reverse


def test_registering_an_objective_names_it_everywhere(registry, hf_tokenizer, capsys):
    Reverse = _toy()
    assert register_objective("reverse", kind_defaults={"decoder": {"scale": 2}})(Reverse) is Reverse
    register_objective("reverse-3", {"scale": 3})(Reverse)
    assert objective_names()[-2:] == ("reverse", "reverse-3")
    tokens = torch.arange(6).view(2, 3)
    assert get_objective("reverse", hf_tokenizer)(tokens)["input_ids"].tolist() == [[2, 1, 0], [5, 4, 3]]
    assert get_objective("reverse-3").scale == 3
    assert make_objective("reverse", hf_tokenizer, "decoder").scale == 2
    assert make_objective("reverse", hf_tokenizer, "encoder").scale == 1
    assert isinstance(get_objective("reverse"), Objective)
    # The help of `lmlab corrupt` is built from the registry, when it is printed.
    parser = argparse.ArgumentParser()
    corrupt_cli.configure(parser)
    assert "reverse, reverse-3, or all" in " ".join(parser.format_help().split())


def test_the_registry_fixture_left_no_toy_behind():
    assert "reverse" not in objective_names() and set(objective_names()) == set(ARCHITECTURES)


def test_registration_mistakes_are_one_line_errors(registry):
    Reverse = _toy()
    with pytest.raises(LmlabError) as e:
        register_objective("span")(Reverse)
    assert "\n" not in str(e.value)
    assert str(e.value) == (
        "objective 'span' is already registered, by lmlab.objectives.span_corruption.SpanCorruption"
    )
    with pytest.raises(LmlabError, match="no field colour"):
        register_objective("reverse", {"colour": 1})(Reverse)
    with pytest.raises(LmlabError, match="architectures must be among"):
        register_objective("reverse", kind_defaults={"vision": {}})(Reverse)

    @dataclasses.dataclass
    class Mutable(LengthPreserving):
        pad_id: int = 0
        architectures: ClassVar[tuple[str, ...]] = ("decoder",)

        def transform(self, tokens, lengths, generator):
            return {"input_ids": tokens}

    with pytest.raises(LmlabError, match="not a frozen dataclass Objective"):
        register_objective("mutable")(Mutable)

    class NoDataclass:
        architectures = ("decoder",)

    with pytest.raises(LmlabError, match="it has no pad_id, from_tokenizer, raw_length, targets_length"):
        register_objective("plain")(NoDataclass)
    assert set(objective_names()) == set(ARCHITECTURES)  # nothing half-registered
