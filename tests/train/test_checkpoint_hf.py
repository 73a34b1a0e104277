"""Checkpoints load as Hugging Face Trainer's ``checkpoint-N/`` do: ``from_pretrained(step_dir)``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from lmlab_train_fixtures import tiny_config as tiny  # noqa: E402
from lmlab_train_fixtures import write_prepared  # noqa: E402

from lmlab.train import PretrainConfig, pretrain  # noqa: E402
from lmlab.train.checkpoint import (  # noqa: E402
    MANIFEST,
    hf_config_files,
    latest_checkpoint,
    load_checkpoint,
    verify_checkpoint,
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_prepared(tmp_path_factory.mktemp("data") / "prepared", train_docs=200, val_docs=20)


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models train several times faster on one thread than on two of a busy machine; restored after.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(input_ids=ids, decoder_input_ids=ids[:, :5]).logits
        return model(input_ids=ids).logits


@pytest.mark.slow
def test_step_dir_loads_with_from_pretrained(data_dir, tmp_path):
    import transformers

    objective, model, auto, generates = "causal", "gpt-tiny", "AutoModelForCausalLM", True

    kw = dict(objective=objective, model=model, steps=2, save_every=1, eval_every=2, keep=5)
    r = pretrain(tiny(data_dir, tmp_path / "run", **kw))
    step1 = tmp_path / "run" / "checkpoints" / "step-00000001"
    step2 = tmp_path / "run" / "checkpoints" / "step-00000002"
    for d in (step1, step2):
        assert verify_checkpoint(d) is None
        files = json.loads((d / MANIFEST).read_text())["files"]
        assert "config.json" in files  # checksummed with the rest
        assert ("generation_config.json" in files) == generates
    cls = getattr(transformers, auto)
    final = cls.from_pretrained(r.final_dir)
    last = cls.from_pretrained(step2)  # the last step's checkpoint is the final model
    first = cls.from_pretrained(step1)
    assert type(last) is type(final)
    ids = torch.randint(4, final.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(last, ids), _logits(final, ids))
    # step 1 holds the weights of step 1: the same logits as its state dict in a fresh model.
    fresh = cls.from_config(first.config)
    fresh.load_state_dict(load_checkpoint(step1)["model"], strict=False)
    fresh.tie_weights()
    assert torch.equal(_logits(first, ids), _logits(fresh, ids))
    assert not torch.equal(_logits(first, ids), _logits(final, ids))


def test_hf_config_files_as_save_pretrained_writes_them(tmp_path):
    import transformers

    bert = transformers.BertForMaskedLM(
        transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=99)
    )
    files = hf_config_files(bert)
    assert set(files) == {"config.json"}  # BERT does not generate: no generation_config.json
    assert bert.config.architectures is None  # the model is left as it is (save_pretrained sets it)
    bert.save_pretrained(tmp_path)
    assert json.loads(files["config.json"]) == json.loads((tmp_path / "config.json").read_text())


@pytest.mark.slow
def test_damaged_config_is_detected_and_an_old_checkpoint_still_resumes(
    data_dir, tmp_path, capsys, monkeypatch
):
    run = tmp_path / "run"
    monkeypatch.setenv("LMLAB_PROGRESS_INTERVAL", "0")  # a line for every step
    full = pretrain(tiny(data_dir, run, steps=3, save_every=1, eval_every=3, keep=5, progress=True))
    # stderr is captured, not a terminal: the progress bar is whole lines (lmlab.progress), one a
    # step at interval 0, and never a carriage return.
    err = capsys.readouterr().err
    assert "\r" not in err
    bar = [line for line in err.splitlines() if line.startswith("pretrain:")]
    assert len(bar) == 3 and "3/3" in bar[-1], err
    ckpts = run / "checkpoints"
    from transformers import AutoModelForSeq2SeqLM, T5ForConditionalGeneration

    assert type(AutoModelForSeq2SeqLM.from_pretrained(ckpts / "step-00000002")) is T5ForConditionalGeneration
    # A torn config.json in the newest checkpoint: named, and the run falls back to the one before.
    (ckpts / "step-00000002" / "config.json").write_text("{")
    assert "config.json" in verify_checkpoint(ckpts / "step-00000002")
    # A checkpoint from before lmlab wrote config.json: no config files, none in its manifest.
    old = ckpts / "step-00000001"
    manifest = json.loads((old / MANIFEST).read_text())
    for name in ("config.json", "generation_config.json"):
        (old / name).unlink()
        del manifest["files"][name]
    (old / MANIFEST).write_text(json.dumps(manifest))
    assert verify_checkpoint(old) is None
    # Drop the final step's checkpoint and the final model so that resume starts from step 1.
    import shutil

    shutil.rmtree(ckpts / "step-00000003")
    shutil.rmtree(run / "final")
    assert latest_checkpoint(run, log=lambda m: None) == old
    resumed = pretrain(PretrainConfig.resume_from(run, progress=False))
    assert resumed.step == 3 and resumed.final_dir is not None
    assert "step-00000002" in capsys.readouterr().err
    assert resumed.losses == [x for x in full.losses if x[0] > 1]  # bit for bit from the old checkpoint
