"""Bad inputs to ``lmlab quantize`` (and ``pretrain --init``), through the real CLI in a subprocess.

Each case sets up files, runs the command, and asserts exit status 2, one ``error:`` line naming
the problem, no traceback, and that every file that existed before is untouched (issue 12: never
lose a user's work, never a traceback).
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from lmlab_cli_harness import assert_one_line_error, run_lmlab, run_lmlab_here, tree_hashes
from quant_helpers import tiny_gpt2

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> Path:
    """root/model (a saved tiny GPT-2 with a tokenizer file) and root/quantized (its NF4 output)."""
    from lmlab.quant import NF4Config, quantize_, save_quantized

    root = tmp_path_factory.mktemp("fx")
    model = tiny_gpt2()
    model.save_pretrained(root / "model")
    (root / "model" / "tokenizer.json").write_text('{"stub": true}\n')
    quantize_(model, NF4Config())
    save_quantized(model, root / "quantized", NF4Config(), extra_files=[root / "model" / "tokenizer.json"])
    return root


def _copy_model(fx: Path, tmp: Path, name: str = "model") -> Path:
    return Path(shutil.copytree(fx / name, tmp / name))


def _edit_weights(d: Path, edit: Callable[[dict], None]) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(d / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})


def _edit_config(d: Path, edit: Callable[[dict], object]) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg = edit(cfg) or cfg
    (d / "config.json").write_text(json.dumps(cfg))


def _set(tensors: dict, key: str, value: float, index=(0,)) -> None:
    tensors[key] = tensors[key].clone()
    tensors[key][index] = value


def _quantize(model: Path, out: str | Path, *flags: str, method: str = "nf4") -> list[str]:
    return ["quantize", str(model), "--method", method, *flags, "--out", str(out)]


# Each setup gets (fx, tmp) and returns (argv, cwd); files it makes in tmp are hashed before the run.
def out_dot(fx, tmp):
    (tmp / "notes.txt").write_text("my notes\n")
    return _quantize(fx / "model", "."), tmp


def out_file(fx, tmp):
    (tmp / "notes.txt").write_text("my notes\n")
    return _quantize(fx / "model", tmp / "notes.txt"), None


def out_under_file(fx, tmp):
    (tmp / "notes.txt").write_text("my notes\n")
    return _quantize(fx / "model", tmp / "notes.txt" / "q"), None


def out_holds_model(fx, tmp):
    run = tmp / "run"
    shutil.copytree(fx / "model", run / "final")
    (run / "metrics.csv").write_text("step,loss\n1,2.0\n")
    (run / "checkpoints" / "step-1").mkdir(parents=True)
    return _quantize(run / "final", run), None


def out_is_model(fx, tmp):
    m = _copy_model(fx, tmp)
    return _quantize(m, m, "--overwrite"), None


def out_inside_model(fx, tmp):
    m = _copy_model(fx, tmp)
    return _quantize(m, m / "q"), None


def out_user_dir(fx, tmp):
    (tmp / "mine").mkdir()
    (tmp / "mine" / "thesis.tex").write_text("\\section{}\n")
    return _quantize(fx / "model", tmp / "mine", "--overwrite"), None


def out_run_dir(fx, tmp):
    (tmp / "run" / "checkpoints" / "step-5").mkdir(parents=True)
    (tmp / "run" / "checkpoints" / "step-5" / "model.safetensors").write_bytes(b"x" * 10)
    return _quantize(fx / "model", tmp / "run", "--overwrite"), None


def out_other_model(fx, tmp):
    other = _copy_model(fx, tmp, "model")
    return _quantize(fx / "model", other, "--overwrite"), None


def out_quantized_no_overwrite(fx, tmp):
    q = _copy_model(fx, tmp, "quantized")
    return _quantize(fx / "model", q), None


def out_empty_string(fx, tmp):
    return _quantize(fx / "model", ""), None


def flag(*flags: str, method: str = "nf4"):
    def setup(fx, tmp):
        return _quantize(fx / "model", tmp / "q", *flags, method=method), None

    return setup


def model_missing(fx, tmp):
    return _quantize(tmp / "nowhere", tmp / "q"), None


def model_no_config(fx, tmp):
    (tmp / "m").mkdir()
    (tmp / "m" / "model.safetensors").write_bytes(b"")
    return _quantize(tmp / "m", tmp / "q"), None


def damaged(edit_weights=None, edit_config=None, raw: bytes | None = None, remove: str | None = None):
    def setup(fx, tmp):
        m = _copy_model(fx, tmp)
        if edit_weights:
            _edit_weights(m, edit_weights)
        if edit_config:
            _edit_config(m, edit_config)
        if raw is not None:
            (m / "model.safetensors").write_bytes(raw)
        if remove:
            (m / remove).unlink()
        return _quantize(m, tmp / "q"), None

    return setup


def truncated(fx, tmp):
    m = _copy_model(fx, tmp)
    data = (m / "model.safetensors").read_bytes()
    (m / "model.safetensors").write_bytes(data[: len(data) // 2])
    return _quantize(m, tmp / "q"), None


def bad_config_text(text: str):
    def setup(fx, tmp):
        m = _copy_model(fx, tmp)
        (m / "config.json").write_text(text)
        return _quantize(m, tmp / "q"), None

    return setup


def model_dir_is_run(fx, tmp):
    run = tmp / "run"
    shutil.copytree(fx / "model", run / "final")
    (run / "config.json").write_text(json.dumps({"config": {"model": "gpt-tiny"}, "resolved": {}}))
    return _quantize(run, tmp / "q"), None


def already_lmlab(fx, tmp):
    return _quantize(fx / "quantized", tmp / "q"), None


def already_bnb(fx, tmp):
    m = _copy_model(fx, tmp)
    _edit_config(
        m, lambda c: c.update(quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True})
    )
    return _quantize(m, tmp / "q"), None


def _drop(key: str):
    return lambda t: t.pop(key)


C_ATTN = "transformer.h.0.attn.c_attn.weight"
CASES = [
    # --out: never destroy what is there
    ("out-dot", out_dot, ["--out .", "not empty"]),
    ("out-existing-file", out_file, ["notes.txt", "not a directory"]),
    ("out-under-file", out_under_file, ["under the file"]),
    ("out-is-the-run-holding-model", out_holds_model, ["holds the input"]),
    ("out-is-model-dir", out_is_model, ["holds the input"]),
    ("out-inside-model-dir", out_inside_model, ["lies inside the input"]),
    ("out-user-dir-even-with-overwrite", out_user_dir, ["mine", "not empty"]),
    ("out-run-dir-even-with-overwrite", out_run_dir, ["training run"]),
    ("out-saved-model-even-with-overwrite", out_other_model, ["holds a saved model"]),
    ("out-quantized-without-overwrite", out_quantized_no_overwrite, ["--overwrite"]),
    ("out-empty", out_empty_string, ["--out is empty"]),
    # flags that do not apply, or bad values
    ("threshold-with-nf4", flag("--threshold", "5"), ["--threshold", "int8", "nf4"]),
    ("threshold-with-fp4", flag("--threshold", "6", method="fp4"), ["--threshold", "fp4"]),
    ("block-size-with-int8", flag("--block-size", "64", method="int8"), ["--block-size", "int8"]),
    ("double-quant-with-int8", flag("--double-quant", method="int8"), ["--double-quant", "int8"]),
    ("bad-block-size", flag("--block-size", "48"), ["block_size", "48"]),
    ("threshold-nan", flag("--threshold", "nan", method="int8"), ["threshold"]),
    ("threshold-negative", flag("--threshold", "-1", method="int8"), ["threshold"]),
    # MODEL_DIR: missing, damaged, already quantized
    ("model-dir-missing", model_missing, ["nowhere", "no such directory"]),
    ("model-dir-no-config", model_no_config, ["config.json"]),
    ("model-dir-is-a-run", model_dir_is_run, ["training run", "final/"]),
    ("weight-missing", damaged(edit_weights=_drop(C_ATTN)), ["lack", C_ATTN, "random"]),
    ("embedding-missing", damaged(edit_weights=_drop("transformer.wte.weight")), ["lack", "wte"]),
    (
        "nan-in-embedding",
        damaged(edit_weights=lambda t: _set(t, "transformer.wte.weight", float("nan"), (3, 4))),
        ["NaN", "transformer.wte.weight"],
    ),
    (
        "inf-in-layernorm",
        damaged(edit_weights=lambda t: _set(t, "transformer.ln_f.weight", float("inf"))),
        ["Inf", "ln_f"],
    ),
    (
        "nan-in-quantized-layer",
        damaged(edit_weights=lambda t: _set(t, C_ATTN, float("nan"), (1, 2))),
        ["NaN", C_ATTN],
    ),
    ("weights-truncated", truncated, ["model", "damaged"]),
    ("weights-empty", damaged(raw=b""), ["damaged"]),
    ("weights-absent", damaged(remove="model.safetensors"), ["cannot load", "model.safetensors"]),
    ("config-not-json", bad_config_text("{not json"), ["config.json", "not valid JSON"]),
    ("config-a-list", bad_config_text("[1, 2]"), ["config.json", "JSON object"]),
    ("config-wrong-type", damaged(edit_config=lambda c: c.update(n_embd="wide")), ["config.json", "n_embd"]),
    ("already-quantized-by-lmlab", already_lmlab, ["already quantized", "lmlab quantize"]),
    ("already-quantized-bitsandbytes", already_bnb, ["already quantized", "quantization_config"]),
]

# Cases that load the model take a few seconds each; the flag and --out cases fail before torch.
_SUBPROCESS = {CASES[0][0], "weights-truncated", "nan-in-embedding"}
_LOADS = {
    "weight-missing",
    "embedding-missing",
    "nan-in-embedding",
    "inf-in-layernorm",
    "nan-in-quantized-layer",
    "weights-truncated",
    "weights-empty",
    "weights-absent",
    "config-wrong-type",
}


@pytest.mark.slow  # each case is a fresh `python -m lmlab` process
@pytest.mark.parametrize(
    "setup,words",
    [
        pytest.param(s, w, id=i, marks=[pytest.mark.slow] if i in _LOADS else [])
        for i, s, w in CASES  # fmt: skip
    ],
)
def test_quantize_refuses_in_one_line_and_touches_nothing(fx, tmp_path, setup, words, request):
    argv, cwd = setup(fx, tmp_path)
    before, fixtures = tree_hashes(tmp_path), tree_hashes(fx)
    # A few cases run the installed command in a subprocess; the rest lmlab.cli.main in this process.
    run = run_lmlab if request.node.callspec.id in _SUBPROCESS else run_lmlab_here
    r = run(argv, cwd=cwd)
    assert_one_line_error(r, *words)
    assert tree_hashes(tmp_path) == before
    assert tree_hashes(fx) == fixtures
    assert not (tmp_path / "q").exists()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    from lmlab_train_fixtures import write_prepared

    return write_prepared(tmp_path_factory.mktemp("prep") / "data")


@pytest.mark.slow
def test_pretrain_init_refuses_a_quantized_model(fx, prepared, tmp_path):
    before, fixtures = tree_hashes(tmp_path), tree_hashes(fx)
    argv = ["pretrain", "--data", str(prepared), "--objective", "causal", "--init", str(fx / "quantized")]
    r = run_lmlab([*argv, "--steps", "1", "--no-progress", "--out", str(tmp_path / "run")])
    assert_one_line_error(r, "already quantized", "quantized")
    assert tree_hashes(tmp_path) == before and tree_hashes(fx) == fixtures


@pytest.mark.slow
@pytest.mark.parametrize(
    "setup,words",
    [
        pytest.param(lambda fx, tmp: fx / "quantized", ["already quantized"], id="lmlab-quantized"),
        pytest.param(already_bnb, ["already quantized", "quantization_config"], id="bitsandbytes"),
        pytest.param(damaged(edit_weights=_drop(C_ATTN)), ["lacks", C_ATTN], id="missing-weight"),
        pytest.param(truncated, ["damaged"], id="truncated-weights"),
        pytest.param(bad_config_text("[1]"), ["config.json", "JSON object"], id="config-a-list"),
    ],
)
def test_load_model_for_init_refuses_in_one_line(fx, tmp_path, setup, words):
    """``pretrain --init`` loads through ``load_model``: same refusals as quantize, never random weights."""
    from lmlab.errors import LmlabError
    from lmlab.models import load_model

    made = setup(fx, tmp_path)
    model_dir = made if isinstance(made, Path) else Path(made[0][1])
    with pytest.raises(LmlabError) as e:
        load_model(model_dir)
    assert "\n" not in str(e.value)
    for w in words:
        assert w.lower() in str(e.value).lower(), (w, str(e.value))


def test_load_model_accepts_an_intact_model_with_tied_weights(fx):
    from lmlab.models import load_model

    model = load_model(fx / "model")
    assert model.lm_head.weight is model.transformer.wte.weight
