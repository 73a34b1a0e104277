"""get_objective, from_tokenizer with lmlab's tokenizer layout, and ``lmlab corrupt``."""

from __future__ import annotations

import argparse
import subprocess
import sys

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
    PrefixLM,
    SpanCorruption,
    get_objective,
)
from lmlab.objectives import cli as corrupt_cli
from lmlab.objectives.base import ARCHITECTURES as KINDS

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


def run_corrupt(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    corrupt_cli.configure(parser)
    return corrupt_cli.run(parser.parse_args(argv))


def test_corrupt_shows_table3(tokenizer_dir, capsys):
    assert run_corrupt(["--tokenizer", str(tokenizer_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("original  Thank you for inviting me to your party last week .")
    assert out[1].startswith("span") and "<extra_id_0>" in out[1] and out[1].endswith("</s>")
    assert "targets  <extra_id_0>" in out[2]


def test_corrupt_all(tokenizer_dir, capsys):
    assert (
        run_corrupt(
            [
                "--objective",
                "all",
                "--tokenizer",
                str(tokenizer_dir),
                "--seed",
                "3",
                "--text",
                "a b c d e f g h",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    for name in OBJECTIVES:
        assert f"\n{name} " in out


def test_corrupt_unknown_objective(tokenizer_dir):
    with pytest.raises(LmlabError, match="unknown objective"):
        run_corrupt(["--objective", "nope", "--tokenizer", str(tokenizer_dir)])
    with pytest.raises(LmlabError, match="no tokenizer"):
        run_corrupt(["--tokenizer", str(tokenizer_dir / "missing")])


def test_cli_module_imports_nothing_heavy():
    code = "import sys, lmlab.objectives.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


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
