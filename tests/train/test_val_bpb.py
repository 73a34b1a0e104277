"""Validation bits per byte in the training loop: ``val_bpb`` = the validation loss summed over the scored
targets / the UTF-8 bytes of the validation rows / ln 2, recomputed here without the loop; and a resume of
a run whose metrics.csv predates the column."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from lmlab_train_fixtures import write_prepared  # noqa: E402

from lmlab.train import PretrainConfig, pretrain  # noqa: E402
from lmlab.train.metrics import METRIC_FIELDS, Metrics, read_metrics_rows  # noqa: E402

SEQ, BATCH, EVAL_BATCHES = 32, 4, 2


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_prepared(tmp_path_factory.mktemp("data") / "prepared", train_docs=200, val_docs=40)


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bpb") / "run"
    cfg = PretrainConfig(data=[str(data_dir)], out=str(out), objective="causal", model="gpt-tiny", steps=2,
                         batch_size=BATCH, seq_len=SEQ, eval_every=1, eval_batches=EVAL_BATCHES, save_every=1,
                         workers=0, progress=False, precision="fp32")  # fmt: skip
    return out, pretrain(cfg)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def val_rows(data_dir: Path) -> np.ndarray:
    """The rows the loop validates on: the first batch_size · eval_batches rows of the val split (causal:
    a row is seq_len corpus tokens)."""
    from lmlab.data import load_tokens

    ids = np.asarray(load_tokens(data_dir, "val"), dtype=np.int64)
    return ids[: BATCH * EVAL_BATCHES * SEQ].reshape(BATCH * EVAL_BATCHES, SEQ)


def text_bytes(data_dir: Path, rows: np.ndarray) -> int:
    """The bytes of the rows' text, from the Unigram pieces' own spelling ("▁" a space, specials nothing)."""
    from lmlab.data import load_tokenizer

    tok = load_tokenizer(data_dir)
    special = set(tok.all_special_ids)
    pieces = tok.convert_ids_to_tokens(rows.reshape(-1).tolist())
    return sum(
        len(p.replace("▁", " ").encode())
        for i, p in zip(rows.reshape(-1).tolist(), pieces, strict=True)
        if i not in special
    )


def test_val_bpb_is_the_loss_sum_over_the_rows_bytes(data_dir, run):
    out, result = run
    rows = read_csv(out / "metrics.csv")
    assert list(rows[0]) == list(METRIC_FIELDS) and METRIC_FIELDS[-1] == "val_bpb"
    evals = [r for r in rows if r["val_loss"]]
    assert [int(r["step"]) for r in evals] == [1, 2]
    val = val_rows(data_dir)
    n_bytes = text_bytes(data_dir, val)
    n_targets = val.shape[0] * (SEQ - 1)  # causal: every token but a row's first is predicted
    assert n_bytes > 2 * val.size  # words, not specials: a wrong count would not land here
    for r in evals:  # the loss per target and the bits per byte share one sum
        assert float(r["val_bpb"]) == pytest.approx(
            float(r["val_loss"]) * n_targets / n_bytes / math.log(2), rel=1e-9
        )
    # The last validation ran on the final weights: recompute its sum with the saved model.
    from lmlab.models import load_model

    model = load_model(result.final_dir).eval()
    x = torch.from_numpy(val)
    with torch.no_grad():
        logits = model(input_ids=x).logits.float()  # (B, T, V)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                            reduction="sum")  # fmt: skip
    assert float(evals[-1]["val_bpb"]) == pytest.approx(float(nll) / n_bytes / math.log(2), rel=1e-5)
    assert result.val_bpb == [(int(r["step"]), pytest.approx(float(r["val_bpb"]))) for r in evals]
    # Bits per byte sit well below the loss in bits per token: a token spans several bytes.
    assert float(evals[-1]["val_bpb"]) < float(evals[-1]["val_loss"]) / math.log(2) / 2


def test_resume_of_a_run_logged_before_val_bpb_keeps_its_rows(data_dir, run, tmp_path):
    import shutil

    out, _ = run
    old = shutil.copytree(out, tmp_path / "old")
    before = read_csv(old / "metrics.csv")
    earlier = [f for f in METRIC_FIELDS if f != "val_bpb"]
    with open(old / "metrics.csv", "w", newline="") as f:  # as a version without the column wrote it
        w = csv.DictWriter(f, fieldnames=earlier, extrasaction="ignore")
        w.writeheader()
        w.writerows(before)
    assert [r["step"] for r in read_metrics_rows(old / "metrics.csv", None)] == ["1", "2"]
    longer = pretrain(PretrainConfig.resume_from(old, steps=3, progress=False))
    assert longer.step == 3
    after = read_csv(old / "metrics.csv")
    assert [r["step"] for r in after] == ["1", "2", "3"]
    for a, b in zip(after[:2], before, strict=True):  # kept, the new column empty
        assert {k: a[k] for k in earlier} == {k: b[k] for k in earlier} and a["val_bpb"] == ""
    assert after[2]["val_loss"] and float(after[2]["val_bpb"]) > 0


def test_headerless_rows_of_either_layout_are_read(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("1,2.5,,0.1,,64,,,1.0\n2,2.4,2.6,0.1,,128,,,2.0,1.3\n3,2.3\n")
    rows = read_metrics_rows(path, None)
    assert [(r["step"], r["val_loss"], r["val_bpb"]) for r in rows] == [("1", "", ""), ("2", "2.6", "1.3")]
    m = Metrics(tmp_path, 2, True, lambda msg: None)
    m.write({"step": 3, "loss": 2.3, "val_loss": 2.5, "val_bpb": 1.25})
    m.close()
    assert [(r["step"], r["val_bpb"]) for r in read_csv(path)] == [("1", ""), ("2", "1.3"), ("3", "1.25")]
