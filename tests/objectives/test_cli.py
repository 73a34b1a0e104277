"""``lmlab corrupt``: Table 3's sentence through each objective, its errors, and a light import."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from lmlab.errors import LmlabError
from lmlab.objectives import OBJECTIVES
from lmlab.objectives import cli as corrupt_cli


def run_corrupt(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    corrupt_cli.configure(parser)
    return corrupt_cli.run(parser.parse_args(argv))


def test_corrupt_shows_table3(tokenizer_dir, capsys):
    assert run_corrupt(["--tokenizer", str(tokenizer_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("original  Thank you for inviting me to your party last week .")
    assert out[1].startswith("span") and "<extra_id_0>" in out[1] and out[1].endswith("</s>")
    assert "targets  <extra_id_0>" in out[2]


def test_corrupt_all(tokenizer_dir, capsys):
    assert (
        run_corrupt(
            [
                "--objective",
                "all",
                "--tokenizer",
                str(tokenizer_dir),
                "--seed",
                "3",
                "--text",
                "a b c d e f g h",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    for name in OBJECTIVES:
        assert f"\n{name} " in out


def test_corrupt_unknown_objective(tokenizer_dir):
    with pytest.raises(LmlabError, match="unknown objective"):
        run_corrupt(["--objective", "nope", "--tokenizer", str(tokenizer_dir)])
    with pytest.raises(LmlabError, match="no tokenizer"):
        run_corrupt(["--tokenizer", str(tokenizer_dir / "missing")])


def test_cli_module_imports_nothing_heavy():
    code = "import sys, lmlab.objectives.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_building_the_parsers_imports_no_torch():
    code = (
        "import argparse, sys, lmlab.objectives.cli as c; c.configure(argparse.ArgumentParser()); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
