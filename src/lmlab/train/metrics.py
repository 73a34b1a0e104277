"""A run's metrics: ``metrics.csv`` (always) and TensorBoard (when installed), and reading them back.

One row per logged step (:data:`METRIC_FIELDS`); a resume keeps the rows up to its checkpoint,
repaired from what a crash or a second writer can leave (:func:`read_metrics_rows`).  Columns are only
ever added at the end: the rows of a run logged before a column existed are read by their header and
get it empty.

``val_loss`` is the validation loss per scored target token (nats); ``val_bpb`` the same loss summed
over the targets, per UTF-8 byte of the validation rows' text, in bits (:mod:`lmlab.train.loop`), a
figure runs with different tokenizers share.
"""

from __future__ import annotations

import contextlib
import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmlab.io import atomic_open, disk_error, is_disk_full

METRICS = "metrics.csv"
METRIC_FIELDS = (
    "step", "loss", "val_loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "elapsed_s", "val_bpb",
)  # fmt: skip
# What earlier versions wrote, for a file whose header line was lost (matched by the number of fields).
_EARLIER_FIELDS = (METRIC_FIELDS[:9],)
# TensorBoard's name of each column it shows.
TB_TAGS = {"loss": "train/loss", "val_loss": "val/loss", "val_bpb": "val/bpb", "lr": "train/lr",
           "grad_norm": "train/grad_norm", "tokens_per_s": "train/tokens_per_s", "mfu": "train/mfu"}  # fmt: skip


def read_metrics_rows(path: Path, upto: int | None) -> list[dict[str, str]]:
    """The complete, parseable rows of ``metrics.csv`` with ``step <= upto``, in step order.

    What a crash (or a second writer) can leave is skipped, never a crash: a torn last line, NUL
    padding, a row with the wrong number of fields or a step that is not an increasing integer.
    """
    try:
        text = path.read_bytes().decode("utf-8", "replace")
    except FileNotFoundError:
        return []
    lines = text.split("\n")[:-1]  # what follows the last newline is a torn row
    if not lines:
        return []
    header = next(csv.reader([lines[0].replace("\x00", "")]), [])
    layouts = [header]
    if "step" not in header:
        layouts = [list(METRIC_FIELDS), *map(list, _EARLIER_FIELDS)]
        lines = ["", *lines]
    by_width = {len(h): h for h in reversed(layouts)}
    rows, last = [], 0
    for line in lines[1:]:
        if "\x00" in line or not line.strip():
            continue
        try:
            fields = next(csv.reader([line]))
        except csv.Error:
            continue
        names = by_width.get(len(fields))
        if names is None:
            continue
        row = dict(zip(names, fields, strict=True))
        try:
            step = int(row["step"])
        except ValueError:
            continue
        if step <= last or (upto is not None and step > upto):
            continue
        rows.append({k: row.get(k, "") for k in METRIC_FIELDS})
        last = step
    return rows


class Metrics:
    """``metrics.csv`` (always) and TensorBoard (when installed), rank 0 only.

    The file is rewritten whole through a temporary file and a rename when the run starts (a
    resume keeps the rows up to its checkpoint, repaired: :func:`read_metrics_rows`), then
    appended to, one flushed row per logged step.
    """

    def __init__(self, run_dir: Path, resume_step: int | None, enabled: bool, log: Callable[[str], None]):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        self.path = path = run_dir / METRICS
        # A killed run may have logged steps past its last checkpoint: those are redone.
        rows = read_metrics_rows(path, resume_step) if resume_step is not None else []
        with atomic_open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
            w.writeheader()
            w.writerows(rows)
        self.f = open(path, "a", newline="")  # noqa: SIM115 - closed in close()
        self.w = csv.DictWriter(self.f, fieldnames=METRIC_FIELDS)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)
        except ImportError:
            log(
                "lmlab pretrain: tensorboard is not installed; logging to metrics.csv only "
                "(pip install 'lmlab[logging]' adds TensorBoard logs)"
            )

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            self.w.writerow({k: ("" if row.get(k) is None else row[k]) for k in METRIC_FIELDS})
            self.f.flush()
        except OSError as e:
            if is_disk_full(e):
                raise disk_error(self.path) from None
            raise
        if self.tb is not None:
            for k, tag in TB_TAGS.items():
                if row.get(k) is not None:
                    self.tb.add_scalar(tag, row[k], row["step"])

    def close(self) -> None:
        if self.enabled:
            with contextlib.suppress(OSError):  # a full disk was reported where it happened
                self.f.close()
            if self.tb is not None:
                self.tb.close()
