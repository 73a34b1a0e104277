"""The training data stream: rows of packed corpus tokens, mixed over sources, objective in workers.

A row is ``R`` consecutive tokens of a split's flat token file (documents stay packed with their
``</s>`` separators, as T5 packs C4), where ``R = objective.raw_length(seq_len)``; row ``k`` of a
source is ``tokens[k·R : (k+1)·R]``.

Which rows form step ``s``'s global batch is a function of ``(seed, s)`` alone:

* each of the ``G`` examples of the step picks a source with probability ``p_i ∝ n_i^α``
  (``n_i`` the source's training tokens; mT5's recipe, Xue et al. 2021 §2, with α = 0.3 there;
  α = 1 is proportional, α = 0 uniform).  The draws are one PCG64 stream read at offset ``s·G``;
* source ``i`` serves its rows in a fresh permutation per epoch, seeded by ``(seed, i, epoch)``;
  the ``k``-th row it serves is the ``k mod n``-th entry of epoch ``k // n``.

Why not ``datasets.interleave_datasets(probabilities=..., stopping_strategy="all_exhausted")``,
which draws the same law (``bench/mixing.py``, 3 sources, mT5 rates, 400 steps of 256; realised
shares match the rates within sampling noise for both): lmlab's plan chose rows at 315k rows/s
against 14.9k for the map-style interleave and 2.7k for the iterable one (21× and 116×, 2 busy
cores); it reaches any step from ``(seed, step)`` alone (37 ms for step 300), so a checkpoint
needs no data state.  The map-style interleave is seekable too, but builds its whole index table
first (1.6–2.5 s here, growing with the run) and serves a source's second pass in the same order
as its first; the iterable one resumes only from a ``state_dict()`` saved with the checkpoint
(identical rows then) or by replaying the stream (26 s to step 300).

The step's global batch is transformed by the objective in blocks of ``NOISE_BLOCK`` consecutive
examples (examples ``b·K … b·K+K−1``), one call and one ``torch.Generator`` seeded from
``(seed, s, b)`` per block.  A micro-batch transforms the blocks that overlap it and keeps its own
rows, so a batch does not depend on how it is split over gradient-accumulation micro-steps,
data-parallel ranks or DataLoader workers, and a resumed run sees the very batches an
uninterrupted one would.  Blocks rather than single examples because the objectives are
vectorised: one call on 32 rows costs about what a call on one row does (184 µs vs 147 µs for
span corruption of 141 tokens), so per-example calls made the data 25× dearer than the objective.
Validation rows, dealt round-robin to ranks, keep one generator per example.

Objectives whose output widths depend on the draw (``iid-span``, ``drop``) give blocks of
different widths; :func:`pad_parts` right-pads them to the micro-batch's widest (pad id in the
inputs, ``attention_mask`` 0, labels ``-100``), so each row's content -- and every scored value,
up to float rounding -- is the same however the batch is split; only the padding width differs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmlab.data.shards import load_meta, load_tokens
from lmlab.errors import LmlabError

TRAIN_STREAM, VAL_STREAM = 0, 1
NOISE_BLOCK = 32  # examples per objective call (and per generator) in a training step
IGNORE_INDEX = -100
_RANGE_CHUNK = 1 << 24  # ids per numpy max when a split's id range is checked (32 MiB of uint16)


def mixing_rates(sizes: Sequence[int], alpha: float) -> np.ndarray:
    """Sampling probabilities ``p_i = n_i^α / Σ_j n_j^α`` (mT5, Xue et al. 2021 §2), float64."""
    n = np.asarray(sizes, dtype=np.float64)
    if (n <= 0).any():
        raise LmlabError("every --data source needs training tokens")
    w = n**alpha
    return w / w.sum()


def row_seed(seed: int, stream: int, step: int, j: int) -> int:
    """A 64-bit seed for the objective's generator on example ``j`` of ``step``."""
    a, b = np.random.SeedSequence([seed, stream, step, j]).generate_state(2, np.uint32)
    return int(a) << 32 | int(b)


def block_seed(seed: int, stream: int, step: int, block: int) -> int:
    """A 64-bit seed for the objective's generator on block ``block`` of ``step``'s global batch."""
    a, b = np.random.SeedSequence([seed, stream, step, 0x626C6B, block]).generate_state(2, np.uint32)
    return int(a) << 32 | int(b)


class BatchPlan:
    """``rows(step)`` → ``(G, 2)`` int64 ``[source, row]`` of the step's global batch.

    Pure in ``(seed, step)``; steps asked for in order cost O(G), a jump replays the source
    draws since step 0 (vectorised, a fraction of a second for 10⁷ examples).
    """

    def __init__(self, n_rows: Sequence[int], rates: np.ndarray, global_batch: int, seed: int):
        self.n_rows = [int(n) for n in n_rows]
        self.cum = np.cumsum(rates)
        self.cum[-1] = 1.0
        self.G = int(global_batch)
        self.seed = int(seed)
        self._step = 0
        self._served = np.zeros(len(self.n_rows), dtype=np.int64)  # rows each source served before _step
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}

    def _sources(self, start: int, count: int) -> np.ndarray:
        if len(self.n_rows) == 1:
            return np.zeros(count, dtype=np.int64)
        # One uint64 per double, so advancing the bit generator by k skips k draws exactly.
        bitgen = np.random.PCG64(np.random.SeedSequence([self.seed, 0x6D6978])).advance(start)
        u = np.random.Generator(bitgen).random(count)
        return np.searchsorted(self.cum, u, side="right").clip(max=len(self.n_rows) - 1)

    def _perm(self, source: int, epoch: int) -> np.ndarray:
        key = (source, epoch)
        if key not in self._perm_cache:
            if len(self._perm_cache) > 2 * len(self.n_rows):
                self._perm_cache.clear()
            rng = np.random.default_rng([self.seed, 0x726F77, source, epoch])
            self._perm_cache[key] = rng.permutation(self.n_rows[source])
        return self._perm_cache[key]

    def _seek(self, step: int) -> None:
        if step < self._step:
            self._step, self._served[:] = 0, 0
        chunk = max(1, (1 << 22) // self.G)
        while self._step < step:
            k = min(chunk, step - self._step)
            src = self._sources(self._step * self.G, k * self.G)
            self._served += np.bincount(src, minlength=len(self.n_rows))
            self._step += k

    def rows(self, step: int) -> np.ndarray:
        self._seek(step)
        src = self._sources(step * self.G, self.G)
        out = np.empty((self.G, 2), dtype=np.int64)
        out[:, 0] = src
        for i, n in enumerate(self.n_rows):
            where = np.flatnonzero(src == i)
            k = self._served[i] + np.arange(where.size)
            rows = np.empty(where.size, dtype=np.int64)
            for epoch in np.unique(k // n):
                sel = k // n == epoch
                rows[sel] = self._perm(i, int(epoch))[k[sel] % n]
            out[where, 1] = rows
            self._served[i] += where.size
        self._step = step + 1
        return out


@dataclass
class Sources:
    """The prepared directories of a run, their token memmaps and row counts.

    Opening them checks every id against the directory's vocabulary once (a pass of numpy max
    over the memmap, about a second per GB), so an out-of-range id is one error naming the file,
    not an ``IndexError`` in the middle of training.
    """

    dirs: list[str]
    raw_len: int
    split: str = "train"

    def __post_init__(self) -> None:
        if self.raw_len <= 0:
            raise LmlabError(f"rows of {self.raw_len} corpus tokens are too short; raise --seq-len")
        self.tokens = [load_tokens(d, self.split) for d in self.dirs]
        for d, t in zip(self.dirs, self.tokens, strict=True):
            check_id_range(t, int(load_meta(d)["vocab_size"]), Path(d) / f"{self.split}.bin")
        self.n_rows = [len(t) // self.raw_len for t in self.tokens]
        for d, t, n in zip(self.dirs, self.tokens, self.n_rows, strict=True):
            if len(t) == 0 and self.split == "val":
                raise LmlabError(f"{d} has no validation split (it was prepared with --val-fraction 0)")
            if n == 0:
                raise LmlabError(
                    f"the {self.split} split of {d} has {len(t)} tokens, fewer than one row of {self.raw_len} "
                    "(lower --seq-len, or prepare more text)"
                )

    def read(self, source: int, row: int) -> np.ndarray:
        R = self.raw_len
        return np.asarray(self.tokens[source][row * R : (row + 1) * R], dtype=np.int64)


def check_id_range(tokens: np.ndarray, vocab_size: int, path: str | Path) -> None:
    """Raise a one-line error naming ``path`` if an id of ``tokens`` is ``>= vocab_size``."""
    if tokens.size == 0 or np.iinfo(tokens.dtype).max < vocab_size:
        return
    for lo in range(0, tokens.size, _RANGE_CHUNK):
        chunk = tokens[lo : lo + _RANGE_CHUNK]
        top = int(chunk.max())
        if top >= vocab_size:
            at = lo + int(np.argmax(chunk >= vocab_size))
            raise LmlabError(
                f"{path} holds token id {int(tokens[at])} at position {at}, outside the vocabulary of "
                f"{vocab_size} ids in meta.json: the file is corrupt or from another tokenizer; "
                "run `lmlab prepare` again"
            )


def check_same_tokenizer(dirs: Sequence[str]) -> dict[str, Any]:
    """The first directory's meta; an error if the sources disagree on the vocabulary."""
    metas = [load_meta(d) for d in dirs]
    first = metas[0]
    for d, m in zip(dirs[1:], metas[1:], strict=True):
        if m["vocab_size"] != first["vocab_size"] or m.get("special_ids") != first.get("special_ids"):
            raise LmlabError(
                f"{d} was prepared with another tokenizer than {dirs[0]}; --data sources must share one"
            )
    texts = {
        (Path(d) / "tokenizer.json").read_bytes() for d in dirs if (Path(d) / "tokenizer.json").is_file()
    }
    if len(texts) > 1:
        raise LmlabError(
            f"--data sources {', '.join(dirs)} have different tokenizer.json files; they must share one"
        )
    return first


def pad_parts(parts: Sequence[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Concatenate the objective's outputs of several blocks, right-padding ragged widths.

    Each ``(B_i, W_i)`` tensor is padded to the widest ``W``: ``labels`` with ``-100``,
    ``attention_mask`` with 0, every other key (``input_ids``, ``decoder_input_ids``) with
    ``pad_id``.  Padded inputs without an ``attention_mask`` get one, so padding is never attended.
    """
    keys = list(parts[0])
    widths = {k: max(p[k].shape[1] for p in parts) for k in keys if parts[0][k].dim() == 2}
    if "attention_mask" not in keys and any(p["input_ids"].shape[1] < widths["input_ids"] for p in parts):
        parts = [{**p, "attention_mask": torch.ones_like(p["input_ids"])} for p in parts]
        keys.append("attention_mask")
        widths["attention_mask"] = widths["input_ids"]
    out = {}
    for k in keys:
        fill = IGNORE_INDEX if k == "labels" else 0 if k == "attention_mask" else pad_id
        ts = [p[k] for p in parts]
        if k in widths:
            ts = [
                torch.nn.functional.pad(t, (0, widths[k] - t.shape[1]), value=fill)
                if t.shape[1] < widths[k]
                else t
                for t in ts
            ]
        out[k] = torch.cat(ts)
    return out


class ObjectiveBatches(torch.utils.data.Dataset):
    """Map-style dataset whose index is a whole micro-batch.

    Training keys are ``(stream, step, rows, lo, hi)``: ``rows`` the step's global batch
    ``(G, 2)`` int64 ``[source, row]`` and ``[lo, hi)`` this micro-batch's examples; the objective
    runs on whole blocks of ``block`` examples, one generator per block (module docstring).
    Validation keys are ``(stream, step, rows)`` with ``rows`` ``(M, 3)`` ``[source, row, j]``,
    one generator per example ``j``.  Returns the objective's dict of ``(M, ·)`` tensors
    (``attention_mask`` dropped when it is all ones, so attention can take its unmasked fast
    path) plus ``n_targets``, the count of scored labels, and ``n_raw``, the corpus tokens read.
    """

    def __init__(
        self, sources: Sources, objective: Any, seed: int, shift_labels: bool, block: int = NOISE_BLOCK
    ):
        self.sources = sources
        self.objective = objective
        self.seed = seed
        self.shift_labels = shift_labels
        self.block = int(block)

    def __len__(self) -> int:  # the sampler decides; never used to index
        return 0

    def _read(self, rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.sources.read(src, row) for src, row in rows.tolist()]))

    def _blocks(self, stream: int, step: int, rows: np.ndarray, lo: int, hi: int) -> list[dict]:
        K, parts = self.block, []
        for b in range(lo // K, -(-hi // K)):
            start, stop = b * K, min((b + 1) * K, len(rows))
            g = torch.Generator().manual_seed(block_seed(self.seed, stream, step, b))
            out = self.objective(self._read(rows[start:stop, :2]), generator=g)
            keep = slice(max(lo, start) - start, min(hi, stop) - start)
            parts.append({k: v[keep] for k, v in out.items()})
        return parts

    def _rows(self, stream: int, step: int, rows: np.ndarray) -> list[dict]:
        parts = []
        for source, row, j in rows.tolist():
            tokens = self._read(np.array([[source, row]]))  # (1, R)
            g = torch.Generator().manual_seed(row_seed(self.seed, stream, step, j))
            parts.append(self.objective(tokens, generator=g))
        return parts

    def __getitem__(self, key: tuple) -> dict[str, torch.Tensor]:
        if len(key) == 5:
            stream, step, rows, lo, hi = key
            parts = self._blocks(stream, step, rows, lo, hi)
            n_rows = hi - lo
        else:
            stream, step, rows = key
            parts = self._rows(stream, step, rows)
            n_rows = rows.shape[0]
        batch = pad_parts(parts, int(getattr(self.objective, "pad_id", 0)))
        mask = batch.get("attention_mask")
        if mask is not None and bool(mask.all()):
            del batch["attention_mask"]
        labels = batch["labels"][:, 1:] if self.shift_labels else batch["labels"]
        batch["n_targets"] = (labels != -100).sum()
        batch["n_raw"] = torch.tensor(n_rows * self.sources.raw_len)
        return batch


class StepSampler(torch.utils.data.Sampler):
    """Yields this rank's micro-batch keys for steps ``start … stop-1``, ``accum`` per step."""

    def __init__(self, plan: BatchPlan, start: int, stop: int, rank: int, world: int, accum: int):
        self.plan, self.start, self.stop = plan, start, stop
        self.rank, self.world, self.accum = rank, world, accum
        per_rank = plan.G // world
        self.per_rank, self.micro = per_rank, per_rank // accum

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * self.accum

    def __iter__(self) -> Iterator[tuple[int, int, np.ndarray, int, int]]:
        for step in range(self.start, self.stop):
            rows = self.plan.rows(step)
            for m in range(self.accum):
                lo = self.rank * self.per_rank + m * self.micro
                yield TRAIN_STREAM, step, rows, lo, lo + self.micro


def val_keys(n_rows: Sequence[int], batch_size: int, max_batches: int, rank: int, world: int) -> list:
    # batch_size is the global batch: the same rows are scored however many ranks share them.
    """Micro-batch keys of the validation pass: the first rows of each source, fixed across runs.

    Rows are dealt round-robin to ranks in equal shares, so every rank runs the same number of
    forward passes (FSDP's all-gathers line up).
    """
    budget = batch_size * max_batches
    per_source = math.ceil(budget / len(n_rows))
    rows = [(i, r) for i, n in enumerate(n_rows) for r in range(min(n, per_source))][:budget]
    if len(rows) >= world:  # equal shares, so every rank runs the same number of forward passes
        rows = rows[: len(rows) // world * world]
    table = np.array([(s, r, j) for j, (s, r) in enumerate(rows)], dtype=np.int64).reshape(-1, 3)
    mine = table[rank::world]
    per_rank = max(1, batch_size // world)
    n_batches = math.ceil(len(mine) / per_rank)
    return [(VAL_STREAM, 0, mine[b * per_rank : (b + 1) * per_rank]) for b in range(n_batches)]


def make_loader(
    dataset: ObjectiveBatches, keys, workers: int, pin_memory: bool
) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        sampler=keys,
        num_workers=workers,
        pin_memory=pin_memory,
        worker_init_fn=_worker_init if workers else None,
        prefetch_factor=4 if workers else None,
        # Its own generator: a DataLoader iterator otherwise draws its base seed from torch's global
        # generator, shifting dropout's stream whenever a loader starts (a resume, every evaluation).
        # The objectives take their noise from their own seeded generators, never from this one.
        generator=torch.Generator().manual_seed(0),
    )


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's tensors on ``device`` (asynchronous copies to CUDA from pinned memory)."""
    nb = device.type == "cuda"
    return {k: v.to(device, non_blocking=nb) for k, v in batch.items()}


def _worker_init(_: int) -> None:
    # The objective is light; one thread per worker leaves the cores to the model.
    torch.set_num_threads(1)
