"""The Hugging Face ``Trainer`` boundary: an lmlab objective is its ``data_collator``.

A user with a ``transformers`` model, a tokenizer and a dataset of token ids hands an objective
to ``Trainer(data_collator=...)`` in place of ``DataCollatorForLanguageModeling``; a few steps of a
tiny GPT-2 (next-token), T5 (span corruption) and BERT (masked LM) train and their loss on a fixed
batch falls.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent / "train"))
from lmlab_train_fixtures import make_texts  # noqa: E402

from lmlab.objectives import get_objective  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from lmlab.data import load_tokenizer
    from lmlab.data.tokenizer import save_tokenizer, train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    save_tokenizer(train_tokenizer(make_texts(200, 0), vocab_size=300), out / "tokenizer.json")
    return load_tokenizer(out)


@pytest.fixture
def one_thread():
    # Models this small train several times faster on one thread than on two (the hand-off between
    # threads costs more than the products); the process's setting is restored afterwards.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(kind: str, vocab: int):
    small = dict(vocab_size=vocab, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    if kind == "t5":
        c = transformers.T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16,
                                  decoder_start_token_id=0, **small)  # fmt: skip
        return transformers.T5ForConditionalGeneration(c)
    if kind == "gpt2":
        c = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=1, **small)
        return transformers.GPT2LMHeadModel(c)
    c = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                max_position_embeddings=64, **small)  # fmt: skip
    return transformers.BertForMaskedLM(c)


def _loss(model, batch) -> float:
    model.eval()
    with torch.no_grad():
        return float(model(**batch).loss)


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "name"), [("gpt2", "causal"), ("t5", "span"), ("bert", "bert")])
def test_trainer_trains_with_an_objective_as_its_collator(tokenizer, tmp_path, one_thread, kind, name):
    model = _model(kind, len(tokenizer))
    objective = get_objective(name, tokenizer, model=model)  # refuses an objective of another kind
    rows = tokenizer(make_texts(64, 1), truncation=True, max_length=48)["input_ids"]
    dataset = [{"input_ids": r} for r in rows]  # ragged rows: the objective pads them
    fixed = objective(dataset[:16], generator=torch.Generator().manual_seed(0))
    before = _loss(model, fixed)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=8, learning_rate=3e-3,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset, data_collator=objective)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    after = _loss(model, fixed)
    assert after < before - 0.1, (before, after)
    assert list(tmp_path.iterdir()) == [] or all(p.name.startswith("runs") for p in tmp_path.iterdir())


def test_a_gpt_refuses_an_encoder_decoder_objective(tokenizer):
    from lmlab.errors import LmlabError

    gpt = _model("gpt2", len(tokenizer))
    with pytest.raises(LmlabError, match="trains encoder-decoder"):
        get_objective("span", tokenizer, model=gpt)
    prefix = get_objective("prefix", tokenizer, model=gpt)  # a decoder's prefix LM: one sequence
    batch = prefix([{"input_ids": [5, 6, 7, 8, 9]}], generator=torch.Generator().manual_seed(0))
    assert "decoder_input_ids" not in batch and batch["input_ids"].shape == batch["labels"].shape
