"""The data plan: pure in (seed, step), mixing ∝ n^α, batches independent of how they are split."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
from lmlab_train_fixtures import write_prepared  # noqa: E402

from lmlab.train.data import BatchPlan, ObjectiveBatches, Sources, StepSampler, mixing_rates, val_keys  # noqa: E402


def test_mixing_rates_follow_mt5():
    sizes = [1_000_000, 10_000]
    assert mixing_rates(sizes, 1.0) == pytest.approx([100 / 101, 1 / 101])
    p = mixing_rates(sizes, 0.3)
    assert p[1] / p[0] == pytest.approx(100**-0.3)
    assert mixing_rates(sizes, 0.0) == pytest.approx([0.5, 0.5])


@settings(max_examples=25, deadline=None)
@given(
    n_rows=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    G=st.integers(1, 16),
    seed=st.integers(0, 2**31),
    jump=st.integers(0, 30),
)
def test_plan_is_pure_in_seed_and_step(n_rows, G, seed, jump):
    rates = mixing_rates(n_rows, 0.5)
    seq = BatchPlan(n_rows, rates, G, seed)
    rows = [seq.rows(s) for s in range(jump + 2)]
    fresh = BatchPlan(n_rows, rates, G, seed)
    assert np.array_equal(fresh.rows(jump), rows[jump])  # a jump replays to the same place
    assert np.array_equal(fresh.rows(jump + 1), rows[jump + 1])
    assert np.array_equal(fresh.rows(0), rows[0])  # and back
    for r in rows:
        assert ((r[:, 1] >= 0) & (r[:, 1] < np.asarray(n_rows)[r[:, 0]])).all()


def test_each_source_serves_a_permutation_per_epoch():
    plan = BatchPlan([7], np.array([1.0]), 7, seed=3)
    epoch0, epoch1 = plan.rows(0)[:, 1], plan.rows(1)[:, 1]
    assert sorted(epoch0) == sorted(epoch1) == list(range(7))
    assert not np.array_equal(epoch0, epoch1)


def test_mixing_frequencies_match_the_rates():
    rates = mixing_rates([900, 100], 0.3)
    plan = BatchPlan([50, 50], rates, 256, seed=0)
    src = np.concatenate([plan.rows(s)[:, 0] for s in range(40)])
    assert np.mean(src == 1) == pytest.approx(rates[1], abs=0.02)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_prepared(tmp_path_factory.mktemp("data") / "prepared", train_docs=200, val_docs=40)


def test_a_global_batch_is_the_same_however_it_is_split(data_dir):
    from lmlab.data import load_tokenizer
    from lmlab.objectives import get_objective

    obj = get_objective("span", load_tokenizer(data_dir))
    src = Sources([str(data_dir)], obj.raw_length(32))
    # Blocks of 3 examples: the splits below cut through blocks (micro-batches of 4, 2 and 1).
    ds = ObjectiveBatches(src, obj, seed=5, shift_labels=False, block=3)
    plan = BatchPlan(src.n_rows, np.array([1.0]), 8, seed=5)

    def batches(world, accum):
        out = []
        for rank in range(world):
            out += [ds[k] for k in StepSampler(plan, 2, 3, rank, world, accum)]
        return {k: torch.cat([b[k] for b in out]) for k in ("input_ids", "labels", "decoder_input_ids")}

    one = batches(1, 1)
    for world, accum in ((2, 1), (1, 4), (2, 2), (4, 2), (8, 1)):
        other = batches(world, accum)
        assert all(torch.equal(one[k], other[k]) for k in one)


def test_a_block_is_one_objective_call_with_its_own_generator(data_dir):
    from lmlab.data import load_tokenizer
    from lmlab.objectives import get_objective
    from lmlab.train.data import TRAIN_STREAM, block_seed

    obj = get_objective("span", load_tokenizer(data_dir))
    src = Sources([str(data_dir)], obj.raw_length(32))
    ds = ObjectiveBatches(src, obj, seed=5, shift_labels=False, block=4)
    rows = BatchPlan(src.n_rows, np.array([1.0]), 8, seed=5).rows(0)
    got = ds[(TRAIN_STREAM, 0, rows, 2, 7)]  # examples 2..6: the end of block 0, all of block 1 but its last
    tokens = torch.stack([torch.from_numpy(src.read(s, r)) for s, r in rows.tolist()])
    want = [
        obj(
            tokens[b * 4 : b * 4 + 4],
            generator=torch.Generator().manual_seed(block_seed(5, TRAIN_STREAM, 0, b)),
        )
        for b in (0, 1)
    ]
    for k in ("input_ids", "labels", "decoder_input_ids"):
        assert torch.equal(got[k], torch.cat([want[0][k][2:], want[1][k][:3]]))
    assert int(got["n_raw"]) == 5 * src.raw_len


def test_validation_rows_are_shared_equally():
    # budget 4 × 2 = 8 rows, 4 per source; source 1 has only 3; 7 rows cut to 6 for 2 ranks
    keys = [val_keys([10, 3], 4, 2, r, 2) for r in range(2)]
    rows = [np.concatenate([k[2] for k in ks]) for ks in keys]
    assert len(rows[0]) == len(rows[1]) == 3
    both = np.concatenate(rows)
    assert sorted(map(tuple, both[:, :2].tolist())) == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
    assert all(len(k[2]) <= 2 for ks in keys for k in ks)  # per-rank batches of 4 // 2
