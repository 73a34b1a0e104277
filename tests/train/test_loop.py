"""lmlab.train.loop end to end on CPU: train, validate, checkpoint, resume bit-identically; the process left as it was."""

from __future__ import annotations

import csv
import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from lmlab_train_fixtures import tiny_config as tiny  # noqa: E402
from lmlab_train_fixtures import write_prepared  # noqa: E402

from lmlab.errors import LmlabError  # noqa: E402
from lmlab.train import PretrainConfig, evaluate, pretrain  # noqa: E402
from lmlab.train.checkpoint import list_checkpoints  # noqa: E402


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_prepared(tmp_path_factory.mktemp("data") / "prepared")


@pytest.mark.slow
def test_bf16_autocast_run_on_cpu(data_dir, tmp_path):
    import json

    r = pretrain(tiny(data_dir, tmp_path / "run", precision="bf16", steps=6, eval_every=6, workers=0))
    assert r.losses[0][1] > r.losses[-1][1]  # it learns
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["config"]["precision"] == "bf16" and saved["resolved"]["precision"] == "bf16"
    from lmlab.models import onednn

    assert saved["resolved"]["cpu_fp32_products"] == ("onednn" if onednn.available() else "torch")
    # The weights stay fp32 (mixed precision), and evaluating with the run's precision repeats its last value.
    from lmlab.models import load_model

    model = load_model(r.final_dir)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ev = evaluate(model, data_dir, "span", batch_size=4, seq_len=32, max_batches=2, precision="bf16")
    assert ev["loss"] == pytest.approx(r.evals[-1][1], rel=1e-5)


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_span_t5_run_writes_a_loadable_model(data_dir, tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    from lmlab.data import load_tokenizer

    r = pretrain(tiny(data_dir, tmp_path / "run"))
    assert r.step == 8 and r.final_dir == tmp_path / "run" / "final"
    assert [s for s, _ in r.evals] == [4, 8]
    assert r.losses[0][1] > r.losses[-1][1]  # it learns
    rows = read_metrics(tmp_path / "run")
    assert {"step", "loss", "val_loss"} <= set(rows[0])
    assert [int(x["step"]) for x in rows] == list(range(1, 9))
    assert (tmp_path / "run" / "config.json").is_file() and (tmp_path / "run" / "tokenizer.json").is_file()
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [4, 6, 8]  # keep=3

    model = AutoModelForSeq2SeqLM.from_pretrained(r.final_dir)
    tok = load_tokenizer(r.final_dir)
    assert model.config.vocab_size == len(tok)
    # The saved model gives the loop's last validation loss on the same batches.
    ev = evaluate(model, data_dir, "span", batch_size=4, seq_len=32, max_batches=2)
    assert ev["loss"] == pytest.approx(r.evals[-1][1], rel=1e-5)
    assert ev["perplexity"] == pytest.approx(torch.tensor(ev["loss"]).exp().item(), rel=1e-6)


@pytest.mark.parametrize(
    ("objective", "model", "auto"),
    [
        ("causal", "gpt-tiny", "AutoModelForCausalLM"),
        ("bert", "bert-tiny", "AutoModelForMaskedLM"),
        ("prefix", "gpt-tiny", "AutoModelForCausalLM"),
    ],  # fmt: skip
)
def test_other_families_train_and_load(data_dir, tmp_path, objective, model, auto):
    import transformers

    r = pretrain(tiny(data_dir, tmp_path / "run", objective=objective, model=model, steps=3, eval_every=3))
    assert r.final_dir is not None and len(r.losses) == 3
    getattr(transformers, auto).from_pretrained(r.final_dir)


def test_model_objective_mismatch_is_a_clear_error(data_dir, tmp_path):
    with pytest.raises(LmlabError, match="objective 'span' trains encoder-decoder"):
        pretrain(tiny(data_dir, tmp_path / "a", model="gpt-tiny"))
    with pytest.raises(LmlabError, match="objective 'causal' trains decoder"):
        pretrain(tiny(data_dir, tmp_path / "b", objective="causal"))
    assert not (tmp_path / "a").exists()


def test_out_with_a_run_needs_resume(data_dir, tmp_path):
    pretrain(tiny(data_dir, tmp_path / "run", steps=2))
    with pytest.raises(LmlabError, match="--resume"):
        pretrain(tiny(data_dir, tmp_path / "run", steps=2))


def _stop_at(step: int, signum: int):
    def hook(s: int, loss) -> None:
        if s == step:
            os.kill(os.getpid(), signum)

    return hook


@pytest.mark.slow
def test_interrupted_and_resumed_run_is_bit_identical(data_dir, tmp_path, capsys):
    full = pretrain(tiny(data_dir, tmp_path / "full"))

    part = pretrain(tiny(data_dir, tmp_path / "part"), on_step=_stop_at(5, signal.SIGTERM))
    assert part.stopped_by == "SIGTERM" and part.step == 5 and part.final_dir is None
    assert [s for s, _ in list_checkpoints(tmp_path / "part")] == [2, 4, 5]
    # A torn write of the newest checkpoint: detected, named, and the run goes back to step 4.
    bad = tmp_path / "part" / "checkpoints" / "step-00000005" / "model.safetensors"
    bad.write_bytes(bad.read_bytes()[:100])

    resumed = pretrain(PretrainConfig.resume_from(tmp_path / "part", progress=False))
    err = capsys.readouterr().err
    assert "step-00000005" in err and "truncated" in err and "falling back" in err
    assert resumed.step == 8 and resumed.final_dir is not None
    assert resumed.losses == [x for x in full.losses if x[0] > 4]  # exact float equality
    assert resumed.evals[-1] == full.evals[-1]
    assert [r["loss"] for r in read_metrics(tmp_path / "part")] == [
        r["loss"] for r in read_metrics(tmp_path / "full")
    ]
    a = torch.load(tmp_path / "full" / "checkpoints" / "step-00000008" / "optimizer.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "checkpoints" / "step-00000008" / "optimizer.pt", weights_only=True)
    assert all(torch.equal(a["state"][k]["exp_avg"], b["state"][k]["exp_avg"]) for k in a["state"])


@pytest.mark.slow
def test_dropout_is_seeded_and_resumes_bit_identical(data_dir, tmp_path):
    """BERT trains with dropout 0.1: its masks come from the run's seed, and a resume continues them."""
    kw = dict(objective="bert", model="bert-tiny", steps=6, save_every=3, eval_every=6)
    state = torch.get_rng_state()
    a = pretrain(tiny(data_dir, tmp_path / "a", **kw))
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is left as it was
    b = pretrain(tiny(data_dir, tmp_path / "b", **kw))
    assert a.losses == b.losses  # same seed, same dropout masks
    c = pretrain(tiny(data_dir, tmp_path / "c", **kw), on_step=_stop_at(4, signal.SIGTERM))
    assert c.stopped_by == "SIGTERM"
    resumed = pretrain(PretrainConfig.resume_from(tmp_path / "c", progress=False))
    assert resumed.losses == [x for x in a.losses if x[0] > 4]
    saved = torch.load(tmp_path / "c" / "checkpoints" / "step-00000004" / "state.pt", weights_only=True)
    assert len(saved["rng_ranks"]) == 1 and torch.equal(saved["rng_ranks"][0]["cpu"], saved["rng"]["cpu"])


def test_resume_may_extend_steps(data_dir, tmp_path):
    pretrain(tiny(data_dir, tmp_path / "run", steps=4, schedule="constant"))
    longer = pretrain(PretrainConfig.resume_from(tmp_path / "run", steps=6, progress=False))
    assert longer.step == 6 and [s for s, _ in longer.losses] == [5, 6]
    with pytest.raises(LmlabError, match="cannot change"):
        PretrainConfig.resume_from(tmp_path / "run", lr=1.0)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
    def poison(step: int, loss) -> None:
        if step == 4:  # after the step-4 checkpoint, break the weights as a diverging run would
            for p in poison.model.parameters():
                p.data.fill_(float("nan"))

    import lmlab.train.loop as loop

    real = loop._Run._build

    def build(self):
        real(self)
        poison.model = self.s.base

    loop._Run._build = build
    try:
        with pytest.raises(LmlabError, match=r"loss became nan at step 5.*step-00000004"):
            pretrain(tiny(data_dir, tmp_path / "run"), on_step=poison)
    finally:
        loop._Run._build = real
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [2, 4]
    assert not (tmp_path / "run" / "final").exists()


def test_grad_accum_gives_the_same_run(data_dir, tmp_path):
    a = pretrain(tiny(data_dir, tmp_path / "a", steps=3, workers=0))
    b = pretrain(tiny(data_dir, tmp_path / "b", steps=3, grad_accum=2, workers=0))
    for (sa, la), (sb, lb) in zip(a.losses, b.losses, strict=True):
        assert sa == sb and la == pytest.approx(lb, rel=1e-5)


@pytest.mark.slow
def test_init_continues_from_a_saved_model(data_dir, tmp_path):
    first = pretrain(tiny(data_dir, tmp_path / "first", steps=6, lr=3e-3))
    cont = pretrain(tiny(data_dir, tmp_path / "cont", steps=2, init=str(first.final_dir), warmup=0))
    fresh = pretrain(tiny(data_dir, tmp_path / "fresh", steps=2, warmup=0))
    assert cont.losses[0][1] < fresh.losses[0][1] - 0.5  # it starts where the first run ended


def test_several_sources_mix(data_dir, tmp_path):
    other = write_prepared(tmp_path / "other", train_docs=100, val_docs=40)
    # write_prepared trains its own tokenizer on other text: a different vocabulary is refused.
    with pytest.raises(LmlabError, match="another tokenizer|different tokenizer"):
        pretrain(tiny(data_dir, tmp_path / "bad", data=[str(data_dir), str(other)]))
    from lmlab.data import read_tokenizer

    same = write_prepared(
        tmp_path / "same", train_docs=100, val_docs=40, seed=9, tok=read_tokenizer(data_dir)
    )
    r = pretrain(tiny(data_dir, tmp_path / "mix", data=[str(data_dir), str(same)], mix_alpha=0.3, steps=3))
    assert r.final_dir is not None
    import json

    rates = json.loads((tmp_path / "mix" / "config.json").read_text())["resolved"]["mixing_rates"]
    assert rates[str(same)] > 0.3  # 1/6 of the tokens, lifted by α = 0.3


def test_adafactor_with_inverse_sqrt_and_a_token_budget(data_dir, tmp_path):
    from lmlab.data import load_tokenizer
    from lmlab.objectives import get_objective

    raw = get_objective("span", load_tokenizer(data_dir)).raw_length(32)  # raw tokens per row
    # --tokens just over 4 steps of 4 rows: rounds up to 5 steps.
    r = pretrain(tiny(data_dir, tmp_path / "run", steps=None, tokens=16 * raw + 1, optimizer="adafactor",
                      schedule="inverse-sqrt", warmup=2))  # fmt: skip
    assert r.step == 5 and r.losses[-1][1] < r.losses[0][1]
    lrs = [float(x["lr"]) for x in read_metrics(tmp_path / "run")]
    assert lrs[:2] == pytest.approx([0.005, 0.01])  # linear warmup to Adafactor's 1e-2
    assert lrs[2:] == pytest.approx([0.01 * (2 / s) ** 0.5 for s in (3, 4, 5)])


def test_runs_without_tensorboard(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    r = pretrain(tiny(data_dir, tmp_path / "run", steps=2))
    assert r.final_dir is not None and len(read_metrics(tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert err.count("tensorboard is not installed") == 1


def test_lmlab_command_line_in_process(data_dir, tmp_path):
    from lmlab.cli import main

    out = tmp_path / "run"
    args = ["pretrain", "--data", str(data_dir), "--model", "gpt-tiny", "--objective", "causal", "--steps", "2",
            "--batch-size", "4", "--seq-len", "32", "--workers", "0", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    assert (out / "final" / "config.json").is_file()
    assert main(["pretrain", "--resume", str(out), "--steps", "3", "--no-progress"]) == 0
    assert [int(r["step"]) for r in read_metrics(out)] == [1, 2, 3]


def test_pretrain_leaves_the_process_as_it_found_it(data_dir, tmp_path, monkeypatch):
    """No TF32 switch, no malloc tuning, no oneDNN policy outside the run, unless asked (tune_process)."""
    from lmlab import runtime

    tuned = []
    monkeypatch.setattr(runtime, "tune_process", lambda device: tuned.append(str(device)))
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: pytest.fail("mallopt without tune_process"))
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
              torch.get_float32_matmul_precision())  # fmt: skip
    seen = []
    r = pretrain(tiny(data_dir, tmp_path / "a", steps=2, onednn="off"),
                 on_step=lambda s, loss: seen.append(runtime.current_onednn_policy()))  # fmt: skip
    after = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())  # fmt: skip
    assert r.final_dir is not None and before == after and tuned == []
    assert seen == ["off", "off"] and runtime.current_onednn_policy() == "auto"
    pretrain(tiny(data_dir, tmp_path / "b", steps=1), tune_process=True)
    assert tuned == ["cpu"]


def test_final_holds_a_pure_hf_config_and_the_run_settings_beside_it(data_dir, tmp_path):
    from lmlab.io import output_kind
    from lmlab.models import load_model
    from lmlab.train.state import TRAINING_FILE, model_settings

    r = pretrain(tiny(data_dir, tmp_path / "run", steps=2, seq_len=24))
    hf = json.loads((r.final_dir / "config.json").read_text())
    assert not [k for k in hf if k.startswith("lmlab")]
    assert json.loads((r.final_dir / TRAINING_FILE).read_text()) == {"seq_len": 24, "objective": "span"}
    assert output_kind(r.final_dir) == "model" and output_kind(tmp_path / "run") == "run"
    model = load_model(r.final_dir)
    assert model_settings(model.name_or_path, model.config) == {"seq_len": 24, "objective": "span"}
    # --init takes the length the model was trained at, as before.
    cont = pretrain(tiny(data_dir, tmp_path / "cont", steps=1, seq_len=None, init=str(r.final_dir)))
    saved = json.loads((tmp_path / "cont" / "config.json").read_text())
    assert cont.step == 1 and saved["resolved"]["seq_len"] == 24
