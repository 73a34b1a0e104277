"""lmlab.eval.load.load_for_eval: every kind of model directory a user has (final/, a checkpoint,
an HF directory), dtype handling, and each way it can go wrong as one line through ``lmlab generate``."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from lmlab.cli import main
from lmlab.errors import LmlabError
from lmlab.eval.load import cast_floats_, describe, human_count, load_for_eval, resolve_dtype

PROMPT = "Call me Ishmael."


@pytest.mark.parametrize(
    ("family", "cls", "kind"),
    [
        ("gpt2", "GPT2LMHeadModel", "decoder"),
        ("llama", "LlamaForCausalLM", "decoder"),
        ("t5", "T5ForConditionalGeneration", "encoder-decoder"),
        ("bert", "BertForMaskedLM", "encoder"),
    ],
)
def test_saved_models_load_as_saved(saved_model, tiny_model, eval_tokenizer, family, cls, kind):
    m = load_for_eval(saved_model(family), device="cpu")
    ref = tiny_model(family)
    assert type(m.model).__name__ == cls and m.kind == kind and m.family.name == family
    assert not m.model.training and m.quantized is None and m.settings == {}
    assert m.dtype == torch.float32 and m.device == torch.device("cpu")
    assert m.tokenizer.get_vocab() == eval_tokenizer.get_vocab()
    for (name, p), (_, q) in zip(m.model.state_dict().items(), ref.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    n = sum(p.numel() for p in ref.parameters())
    assert m.description == f"{cls} ({family}, {human_count(n)} parameters, float32)"


def test_human_count():
    assert [human_count(n) for n in (999, 1_000, 935_040, 1_134_208, 7_241_732_096)] == [
        "999",
        "1.0 k",
        "935.0 k",
        "1.1 M",
        "7.2 B",
    ]


def test_bfloat16_and_the_fp32_modules_of_half_types(saved_model, tiny_model):
    m = load_for_eval(saved_model("gpt2"), dtype="bfloat16")
    assert {p.dtype for p in m.model.parameters()} == {torch.bfloat16}
    assert m.model.lm_head.weight is m.model.transformer.wte.weight  # still tied
    assert m.description.endswith("bfloat16)")
    # float16 (possible on GPUs): T5's wo stays float32, as transformers loads it
    t5 = cast_floats_(copy.deepcopy(tiny_model("t5")), torch.float16)
    dtypes = {n: p.dtype for n, p in t5.named_parameters()}
    assert {d for n, d in dtypes.items() if n.endswith(".wo.weight")} == {torch.float32}
    assert {d for n, d in dtypes.items() if not n.endswith(".wo.weight")} == {torch.float16}
    assert describe(t5).endswith("float16)")
    assert resolve_dtype(torch.bfloat16, "cpu") == torch.bfloat16 and resolve_dtype(None, "cpu") is None


def _run_dir(root: Path, saved: Path, step: int = 7, *, manifest: bool = True) -> Path:
    """A run directory as lmlab pretrain leaves one: config.json, tokenizer.json, one checkpoint."""
    from lmlab.io import sha256_file

    run = root / "run"
    ck = run / "checkpoints" / f"step-{step:08d}"
    ck.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(saved / name, ck / name)
    shutil.copy(saved / "tokenizer.json", run / "tokenizer.json")
    cfg = {"config": {"objective": "causal", "model": "gpt-tiny"}, "resolved": {"seq_len": 96}}
    (run / "config.json").write_text(json.dumps(cfg))
    if manifest:
        files = {
            n: {"sha256": sha256_file(ck / n), "bytes": (ck / n).stat().st_size}
            for n in ("config.json", "model.safetensors")
        }
        (ck / "manifest.json").write_text(json.dumps({"step": step, "files": files}))
    return run


def test_checkpoint_takes_the_runs_tokenizer_and_settings(saved_model, eval_tokenizer, tmp_path, capsys):
    run = _run_dir(tmp_path, saved_model("gpt2"))
    ck = run / "checkpoints" / "step-00000007"
    m = load_for_eval(ck)
    assert m.settings == {"seq_len": 96, "objective": "causal"} and m.kind == "decoder"
    assert m.tokenizer.get_vocab() == eval_tokenizer.get_vocab()
    assert main(["generate", str(ck), "--prompt", PROMPT, "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.startswith("Call me Ishmael.")
    # the run itself is not a model; a weights file that fails the manifest is refused
    with pytest.raises(LmlabError, match="is a training run; pass RUN/final or RUN/checkpoints/step-N"):
        load_for_eval(run)
    with open(ck / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\0\0\0\0")
    with pytest.raises(LmlabError, match="model.safetensors fails its checksum"):
        load_for_eval(ck)


def test_final_dir_settings(saved_model, tmp_path):
    from lmlab.train.state import write_model_settings

    final = tmp_path / "final"
    shutil.copytree(saved_model("gpt2"), final)
    write_model_settings(final, {"seq_len": 64, "objective": "prefix"})
    assert load_for_eval(final).settings == {"seq_len": 64, "objective": "prefix"}


# ------------------------------------------------------------------------------ one-line refusals


@pytest.fixture(scope="module")
def bad_dirs(tmp_path_factory, saved_model, eval_tokenizer, eval_data):
    """name -> (a MODEL argument that must be refused, words its one error line must hold)."""
    import transformers

    from lmlab.models.presets import build_model, quiet_hf_progress

    root = tmp_path_factory.mktemp("bad-models")
    good = saved_model("gpt2")
    out: dict[str, tuple[str, list[str]]] = {}
    out["missing"] = (str(root / "nope"), ["does not exist"])
    (root / "file.txt").write_text("x")
    out["file"] = (str(root / "file.txt"), ["is not a directory"])
    (root / "empty").mkdir()
    out["empty"] = (str(root / "empty"), ["holds no model: no config.json"])
    out["prepared"] = (str(eval_data), ["prepared data directory"])
    out["run"] = (str(_run_dir(root, good, manifest=False)), ["is a training run", "RUN/final"])
    trunc = root / "truncated"
    shutil.copytree(good, trunc)
    with open(trunc / "model.safetensors", "r+b") as f:
        f.truncate((trunc / "model.safetensors").stat().st_size // 2)
    out["truncated"] = (str(trunc), ["weights", "damaged"])
    with quiet_hf_progress():
        bare = transformers.BertModel(
            transformers.BertConfig(
                vocab_size=len(eval_tokenizer),
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=64,
            )
        )
        bare.save_pretrained(root / "bare-bert")
        eval_tokenizer.save_pretrained(root / "bare-bert")
        out["no-head"] = (str(root / "bare-bert"), ["BertModel has no language-modelling head"])
        small = build_model("gpt-tiny", 512, seed=0)
        small.save_pretrained(root / "small-vocab")
        eval_tokenizer.save_pretrained(root / "small-vocab")
        out["too-many-ids"] = (str(root / "small-vocab"), ["1024 ids", "512 rows"])
    shutil.copytree(good, root / "no-tok", ignore=shutil.ignore_patterns("tokenizer*"))
    out["no-tokenizer"] = (str(root / "no-tok"), ["has no tokenizer; pass --tokenizer DIR"])
    return out


@pytest.mark.parametrize(
    "case",
    ["missing", "file", "empty", "prepared", "run", "truncated", "no-head", "too-many-ids", "no-tokenizer"],
)
def test_bad_model_is_one_line(bad_dirs, capsys, case):
    model, words = bad_dirs[case]
    assert main(["generate", model, "--prompt", PROMPT, "--max-new-tokens", "1"]) == 2
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip() and "Writing model shards" not in ln]
    assert out == "" and "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("lmlab generate: error: "), err
    assert all(w in lines[0] for w in words), lines[0]


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--tokenizer", "/nonexistent/tok"], ["tokenizer /nonexistent/tok does not exist"]),
        (["--device", "tpu9"], ["unknown device 'tpu9'"]),
        pytest.param(
            ["--device", "cuda"],
            ["CUDA is not available"],
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA"),
        ),
        pytest.param(["--dtype", "float16", "--device", "cpu"], ["float16 needs a GPU"]),
    ],
)
def test_bad_load_settings_are_one_line(saved_model, capsys, flags, words):
    assert main(["generate", str(saved_model("gpt2")), "--prompt", PROMPT, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lmlab generate: error: ") and all(w in err[-1] for w in words), err[-1]
