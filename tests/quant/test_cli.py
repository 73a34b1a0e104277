"""``lmlab quantize MODEL_DIR --method ... --out DIR`` end to end on tiny saved models."""

from __future__ import annotations

import pytest
import torch
from quant_helpers import logits, tiny_models

from lmlab.cli import main
from lmlab.quant import load_quantized


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for name, model in tiny_models().items():
        if name in ("t5", "bert", "gpt2"):
            d = root / name
            model.save_pretrained(d)
            (d / "tokenizer.json").write_text('{"stub": true}\n')
            dirs[name] = d
    return dirs


IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "name,argv",
    [
        ("gpt2", ["--method", "nf4"]),
        ("gpt2", ["--method", "int4", "--double-quant"]),
        ("t5", ["--method", "fp4", "--block-size", "128", "--double-quant"]),
        ("bert", ["--method", "int8", "--threshold", "5.0"]),
    ],
)
def test_quantize_command(saved, name, argv, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["quantize", str(saved[name]), *argv, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "%|" not in captured.err, "Hugging Face's loading bar leaked into the command's output"
    assert "bits/param" in printed and "whole model" in printed and str(out) in printed
    assert (out / "tokenizer.json").read_text() == '{"stub": true}\n'
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary left behind
    model = load_quantized(out)

    from lmlab.models.families import model_class

    float_model = model_class(model.config).from_pretrained(saved[name]).eval()
    a, b = logits(model, IDS), logits(float_model, IDS)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.97


def test_quantize_command_errors(saved, tmp_path, capsys):
    assert main(["quantize", str(tmp_path / "missing"), "--method", "nf4", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmlab quantize: error:") and "config.json" in err and err.count("\n") == 1
    argv = [
        "quantize",
        str(saved["gpt2"]),
        "--method",
        "nf4",
        "--block-size",
        "48",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(argv) == 2
    assert "block_size must be one of" in capsys.readouterr().err
    argv = [
        "quantize",
        str(saved["gpt2"]),
        "--method",
        "int8",
        "--double-quant",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(argv) == 2
    assert not (tmp_path / "o").exists()


def test_cli_module_imports_nothing_heavy():
    import subprocess
    import sys

    code = (
        "import sys, lmlab.quant.cli; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
