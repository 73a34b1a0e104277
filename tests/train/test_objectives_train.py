"""Every objective pre-trains every model family it suits: train, evaluate, checkpoint, resume.

``iid-span`` and ``drop`` give outputs whose width depends on the draw; their blocks are padded
to a common width (:func:`lmlab.train.data.pad_parts`), which these runs exercise, with global
batches of more than one objective block (``NOISE_BLOCK`` = 32 rows) too.
"""

from __future__ import annotations

import math
import signal
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from lmlab_train_fixtures import write_prepared  # noqa: E402

from lmlab.objectives.registry import OBJECTIVES  # noqa: E402
from lmlab.train import PretrainConfig, pretrain  # noqa: E402
from lmlab.train.data import pad_parts  # noqa: E402

FAMILY_MODELS = {"encoder-decoder": "t5-tiny", "encoder": "bert-tiny", "decoder": "gpt-tiny"}
PAIRS = [(name, FAMILY_MODELS[arch]) for name, (cls, _) in OBJECTIVES.items() for arch in cls.architectures]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_prepared(tmp_path_factory.mktemp("data") / "prepared", train_docs=200, val_docs=40)


def tiny(data_dir: Path, out: Path, **kw) -> PretrainConfig:
    base = dict(data=[str(data_dir)], out=str(out), steps=4, batch_size=4, seq_len=24, eval_every=2,
                eval_batches=2, save_every=2, progress=False, precision="fp32", workers=0)  # fmt: skip
    return PretrainConfig(**{**base, **kw})


def test_every_objective_is_covered():
    assert {name for name, _ in PAIRS} == set(OBJECTIVES)
    assert ("prefix", "gpt-tiny") in PAIRS and ("prefix", "t5-tiny") in PAIRS


def _stop_at(step: int):
    def hook(s: int, loss) -> None:
        if s == step:
            signal.raise_signal(signal.SIGTERM)

    return hook


@pytest.mark.slow
@pytest.mark.parametrize(("objective", "model"), PAIRS)
def test_objective_trains_evaluates_checkpoints_and_resumes(data_dir, tmp_path, objective, model):
    part = pretrain(tiny(data_dir, tmp_path / "run", objective=objective, model=model), on_step=_stop_at(3))
    assert part.stopped_by == "SIGTERM" and part.step == 3 and [s for s, _ in part.evals] == [2]
    resumed = pretrain(PretrainConfig.resume_from(tmp_path / "run", progress=False))
    assert resumed.step == 4 and resumed.final_dir is not None and [s for s, _ in resumed.evals] == [4]
    assert all(math.isfinite(v) for _, v in part.losses + resumed.losses + part.evals + resumed.evals)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["iid-span", "drop"])
def test_ragged_objectives_over_several_blocks_and_micro_steps(data_dir, tmp_path, objective):
    """40 rows: two objective blocks of different widths; split in two micro-steps, the same losses."""
    kw = dict(objective=objective, model="t5-tiny", steps=2, batch_size=40, eval_every=2, eval_batches=1)
    a = pretrain(tiny(data_dir, tmp_path / "a", **kw))
    b = pretrain(tiny(data_dir, tmp_path / "b", grad_accum=2, **kw))
    for (sa, la), (sb, lb) in zip(a.losses, b.losses, strict=True):
        assert sa == sb and la == pytest.approx(lb, rel=1e-5)
    assert a.evals[-1][1] == pytest.approx(b.evals[-1][1], rel=1e-5)


def test_pad_parts_pads_each_key_with_its_own_value():
    a = {"input_ids": torch.tensor([[5, 6, 1]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
         "labels": torch.tensor([[7, 1]]), "decoder_input_ids": torch.tensor([[0, 7]])}  # fmt: skip
    b = {"input_ids": torch.tensor([[5, 1]]), "attention_mask": torch.ones(1, 2, dtype=torch.long),
         "labels": torch.tensor([[7, 8, 1]]), "decoder_input_ids": torch.tensor([[0, 7, 8]])}  # fmt: skip
    out = pad_parts([a, b], pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 1], [5, 1, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert out["labels"].tolist() == [[7, 1, -100], [7, 8, 1]]
    assert out["decoder_input_ids"].tolist() == [[0, 7, 0], [0, 7, 8]]
    no_mask = pad_parts([{"input_ids": torch.tensor([[4]])}, {"input_ids": torch.tensor([[4, 4]])}], 9)
    assert no_mask["input_ids"].tolist() == [[4, 9], [4, 4]]
    assert no_mask["attention_mask"].tolist() == [[1, 0], [1, 1]]
