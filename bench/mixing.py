"""lmlab's source mixing beside ``datasets.interleave_datasets``: speed, realised rates, resuming.

Three sources of 200k, 40k and 10k rows (a row = one training example's 568 raw tokens), mixed
with mT5's rates ``p_i ∝ n_i^0.3`` (Xue et al. 2021 §2), 256 examples a step, 400 steps
(102k examples: the small source is served twice).  Printed side by side:

* rows/s of the choice of (source, row) for whole steps: lmlab's ``BatchPlan.rows(step)``;
  ``interleave_datasets(probabilities=..., seed=..., stopping_strategy="all_exhausted")`` over
  map-style ``Dataset``s of row ids, read a step's slice at a time, and the same over
  ``to_iterable_dataset()`` (what streaming users run), read 256 at a time;
* the realised share of each source against the rates;
* the cost of starting at step 300 (a resume): lmlab from ``(seed, step)`` alone; the
  map-style interleave by index (it is seekable, but builds its whole index table first); the
  iterable one by replaying, or from a ``state_dict()`` saved at that step.

    .venv/bin/python bench/mixing.py [--steps 400]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from lmlab.train.data import BatchPlan, mixing_rates

SIZES = (200_000, 40_000, 10_000)
G = 256
SEED = 0


def lmlab_rows(steps: int, start: int = 0) -> np.ndarray:
    plan = BatchPlan(SIZES, mixing_rates(SIZES, 0.3), G, SEED)
    return np.concatenate([plan.rows(s) for s in range(start, steps)])


def _sources():
    import datasets

    return [
        datasets.Dataset.from_dict({"source": np.full(n, i), "row": np.arange(n)})
        for i, n in enumerate(SIZES)
    ]


def hf_map(steps: int, start: int = 0) -> tuple[np.ndarray, float]:
    """The rows of steps ``start …`` and the seconds spent building the interleaved index table."""
    import datasets

    t0 = time.perf_counter()
    mixed = datasets.interleave_datasets(
        _sources(), probabilities=list(mixing_rates(SIZES, 0.3)), seed=SEED, stopping_strategy="all_exhausted"
    ).with_format("numpy")
    build = time.perf_counter() - t0
    n = min(len(mixed), steps * G)
    out = [
        np.stack([b["source"], b["row"]], axis=1)
        for b in (mixed[k : min(k + G, n)] for k in range(start * G, n, G))
    ]
    return np.concatenate(out), build


def _hf_iterable():
    import datasets

    return datasets.interleave_datasets(
        [d.to_iterable_dataset() for d in _sources()],
        probabilities=list(mixing_rates(SIZES, 0.3)),
        seed=SEED,
        stopping_strategy="all_exhausted",
    )


def hf_iterable(steps: int) -> np.ndarray:
    out = np.empty((steps * G, 2), dtype=np.int64)
    for k, ex in zip(range(steps * G), _hf_iterable(), strict=False):
        out[k] = ex["source"], ex["row"]
    return out


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def shares(rows: np.ndarray) -> str:
    counts = np.bincount(rows[:, 0], minlength=len(SIZES)) / len(rows)
    return " ".join(f"{c:.4f}" for c in counts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    args = ap.parse_args()
    S, n = args.steps, args.steps * G
    rates = mixing_rates(SIZES, 0.3)
    print(f"sources {SIZES}, rates n^0.3: {' '.join(f'{r:.4f}' for r in rates)}; {S} steps of {G}")

    ours, t_ours = timed(lmlab_rows, S)
    (theirs, build), t_map = timed(hf_map, S)
    it, t_it = timed(hf_iterable, S)
    print(f"{'':28s} {'rows/s':>12s} {'lmlab ×':>8s}   realised shares")
    print(f"{'lmlab BatchPlan':28s} {n / t_ours:12,.0f} {1.0:8.1f}   {shares(ours)}")
    print(f"{'datasets map-style':28s} {n / t_map:12,.0f} {t_map / t_ours:8.1f}   {shares(theirs)}"
          f"   (index table {build:.2f} s of it)")  # fmt: skip
    print(f"{'datasets iterable':28s} {n / t_it:12,.0f} {t_it / t_ours:8.1f}   {shares(it)}")

    # Resuming at step R: what each needs, and what it costs.
    R = S * 3 // 4
    first, t_r = timed(lambda: BatchPlan(SIZES, rates, G, SEED).rows(R))
    resumed = lmlab_rows(S, R)
    assert np.array_equal(first, ours[R * G : (R + 1) * G]) and np.array_equal(resumed, ours[R * G :])
    print(f"resume at step {R}: lmlab from (seed, step) alone {t_r * 1e3:.1f} ms to its rows, identical rows")
    (m_res, build_r), t_mr = timed(hf_map, S, R)
    assert np.array_equal(m_res, theirs[R * G :])
    print(
        f"  datasets map-style by index {t_mr * 1e3:.1f} ms (rebuilds its index table, {build_r:.2f} s), identical rows"
    )
    # Iterable: replay R steps, or restore a state_dict saved at step R.
    mixed = _hf_iterable()
    t0 = time.perf_counter()
    stream = iter(mixed)
    for _ in range(R * G):
        next(stream)
    state = mixed.state_dict()
    t_replay = time.perf_counter() - t0
    again = _hf_iterable()
    again.load_state_dict(state)
    t0 = time.perf_counter()
    nxt = [next(iter(again)) for _ in range(1)]
    t_state = time.perf_counter() - t0
    same = (nxt[0]["source"], nxt[0]["row"]) == tuple(it[R * G])
    print(f"  datasets iterable: replay {t_replay:.2f} s; from a saved state_dict {t_state * 1e3:.1f} ms, "
          f"next row {'identical' if same else 'DIFFERENT'}")  # fmt: skip
    # Epochs: does a source's second pass come in a new order?
    small = ours[ours[:, 0] == 2, 1]
    small_hf = theirs[theirs[:, 0] == 2, 1]
    n2 = SIZES[2]
    print(f"second pass over the 10k source in a new order: lmlab {not np.array_equal(small[:n2], small[n2:2 * n2])}, "
          f"datasets map-style {not np.array_equal(small_hf[:n2], small_hf[n2:2 * n2])}")  # fmt: skip


if __name__ == "__main__":
    main()
