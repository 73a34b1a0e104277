"""``lmlab quickstart`` end to end, as the README's first command runs it, with a few steps."""

from __future__ import annotations

import re

import pytest
from lmlab_cli_harness import assert_one_line_error, run_lmlab, run_lmlab_here

pytestmark = pytest.mark.slow


def _losses(stdout: str) -> dict[str, float]:
    rows = {}
    for line in stdout.splitlines():
        m = re.match(
            r"\s+(float32, untrained|float32, trained|NF4 \+ double quant|LLM\.int8\(\))\s+([\d.]+)\s", line
        )
        if m:
            rows[m.group(1)] = float(m.group(2))
    return rows


def test_quickstart_trains_quantizes_and_summarises(tmp_path):
    out = tmp_path / "qs"
    args = ["quickstart", "--out", str(out), "--steps", "24", "--batch-size", "8", "--no-progress"]
    r = run_lmlab(args)
    assert r.returncode == 0, r.stderr[-2000:]
    for stage in ("[1/4] prepare", "[2/4] pretrain", "[3/4] quantize", "[4/4] summary"):
        assert stage in r.stdout
    loss = _losses(r.stdout)
    assert set(loss) == {"float32, untrained", "float32, trained", "NF4 + double quant", "LLM.int8()"}, (
        r.stdout
    )
    assert loss["float32, trained"] < loss["float32, untrained"]
    # Quantization damage is small next to what training bought.
    for q in ("NF4 + double quant", "LLM.int8()"):
        assert abs(loss[q] - loss["float32, trained"]) < 0.1 * (
            loss["float32, untrained"] - loss["float32, trained"]
        )
    assert (out / "final" / "model.safetensors").is_file() and (out / "metrics.csv").is_file()

    from transformers import AutoModelForSeq2SeqLM

    from lmlab.data import load_tokenizer

    model = AutoModelForSeq2SeqLM.from_pretrained(out / "final")
    assert model.config.model_type == "t5"
    assert load_tokenizer(out / "final").vocab_size > 0

    # A second quickstart on the same directory refuses rather than replace the run.
    again = run_lmlab(args)
    assert_one_line_error(again, "already holds a run", "--fresh")


@pytest.mark.parametrize(("flag", "value"), [("--steps", "-1"), ("--batch-size", "0"), ("--seq-len", "0")])
def test_a_bad_number_is_refused_before_prepare(tmp_path, flag, value):
    out = tmp_path / "qs"
    r = run_lmlab_here(["quickstart", "--out", str(out), flag, value, "--no-progress"])
    assert_one_line_error(r, flag, "must be positive")
    assert "[1/4] prepare" not in r.stdout  # no corpus prepared, no cache written for a typo
    assert not out.exists()
