"""lmlab.eval.loss: a model's validation loss under an objective, on batches fixed by a seed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
from lmlab_train_fixtures import tiny_config as tiny  # noqa: E402
from lmlab_train_fixtures import write_prepared  # noqa: E402

from lmlab.eval import evaluate  # noqa: E402
from lmlab.train import pretrain  # noqa: E402


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_prepared(tmp_path_factory.mktemp("data") / "prepared")


@pytest.mark.slow
def test_evaluate_before_and_after_training(data_dir, tmp_path):
    from lmlab.models import build_model, load_model

    untrained = build_model("t5-tiny", 336, seed=0)
    before = evaluate(untrained, data_dir, "span", batch_size=4, seq_len=32, max_batches=2)
    r = pretrain(tiny(data_dir, tmp_path / "run", steps=12, lr=3e-3))
    after = evaluate(load_model(r.final_dir), data_dir, "span", batch_size=4, seq_len=32, max_batches=2)
    assert before["tokens"] == after["tokens"] > 0
    assert after["loss"] < before["loss"] - 0.5
    assert before["perplexity"] > after["perplexity"]


@pytest.mark.slow
def test_evaluate_decoder_and_encoder_models(data_dir):
    from lmlab.models import build_model

    gpt = build_model("gpt-tiny", 336, seed=0)
    ev = evaluate(gpt, [data_dir], "causal", batch_size=4, seq_len=32, max_batches=2)
    assert ev["rows"] == 8 and ev["tokens"] == 8 * 31  # next-token targets: 31 per row of 32
    assert ev["loss"] == pytest.approx(torch.log(torch.tensor(336.0)).item(), rel=0.1)  # untrained ≈ uniform
    bert = build_model("bert-tiny", 336, seed=0)
    ev = evaluate(bert, data_dir, "bert", batch_size=4, seq_len=32, max_batches=2)
    assert 0 < ev["tokens"] < 8 * 32  # only the masked positions are scored


def test_evaluate_is_the_same_function_as_lmlab_train_evaluate():
    import lmlab.train

    assert lmlab.train.evaluate is evaluate


def test_seq_len_defaults_to_the_trained_length(data_dir, tmp_path):
    """A final/'s lmlab_training.json gives evaluate its length; an older final/ kept it in the HF config."""
    from lmlab.models import build_model, load_model

    r = pretrain(tiny(data_dir, tmp_path / "run", steps=1, seq_len=24, eval_every=1))
    model = load_model(r.final_dir)
    ev = evaluate(model, data_dir, "span", batch_size=4, max_batches=2)
    assert ev == evaluate(model, data_dir, "span", batch_size=4, seq_len=24, max_batches=2)
    assert ev["loss"] == pytest.approx(r.evals[-1][1], rel=1e-5)
    legacy = build_model("gpt-tiny", 336, seed=0)
    legacy.config.lmlab_seq_len = 16
    ev = evaluate(legacy, data_dir, "causal", batch_size=4, max_batches=1)
    assert ev["tokens"] == 4 * 15
