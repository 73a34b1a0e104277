"""lmlab.train.metrics: metrics.csv as written, and what a crash can leave of it read back."""

from __future__ import annotations

import csv

from lmlab.train.metrics import METRIC_FIELDS, Metrics, read_metrics_rows


def test_rows_are_written_and_a_resume_keeps_those_up_to_its_step(tmp_path):
    m = Metrics(tmp_path, None, True, lambda msg: None)
    for step in (1, 2, 3):
        m.write({"step": step, "loss": 1.0 / step, "lr": 0.1})
    m.close()
    rows = read_metrics_rows(tmp_path / "metrics.csv", None)
    assert [r["step"] for r in rows] == ["1", "2", "3"] and set(rows[0]) == set(METRIC_FIELDS)
    m = Metrics(tmp_path, 2, True, lambda msg: None)  # resumed from step 2: step 3 is redone
    m.write({"step": 3, "loss": 0.5})
    m.close()
    with open(tmp_path / "metrics.csv", newline="") as f:
        assert [(r["step"], r["loss"]) for r in csv.DictReader(f)] == [
            ("1", "1.0"),
            ("2", "0.5"),
            ("3", "0.5"),
        ]


def test_what_a_crash_leaves_is_skipped(tmp_path):
    path = tmp_path / "metrics.csv"
    header = ",".join(METRIC_FIELDS)
    good = lambda step: ",".join([str(step), "1.5", "", "0.1", "", "4"] + [""] * (len(METRIC_FIELDS) - 6))  # noqa: E731
    path.write_bytes(
        "\n".join(
            [header, good(1), "\x00\x00\x00", good(2), "x,1,,,,,,,", "3,1.5", good(2), good(4), "5,1.2,"]
        ).encode()
    )
    assert [r["step"] for r in read_metrics_rows(path, None)] == ["1", "2", "4"]  # torn tail "5,1.2," dropped
    assert [r["step"] for r in read_metrics_rows(path, 2)] == ["1", "2"]
    assert read_metrics_rows(tmp_path / "missing.csv", None) == []


def test_disabled_metrics_write_nothing(tmp_path):
    m = Metrics(tmp_path, None, False, lambda msg: None)
    m.write({"step": 1})
    m.close()
    assert not (tmp_path / "metrics.csv").exists()
