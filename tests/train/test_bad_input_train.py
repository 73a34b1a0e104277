"""``lmlab pretrain`` given bad input, through the real command: one error line, exit 2, nothing touched.

Each case builds what it needs under its own ``tmp_path`` (or reuses the module's prepared data
and finished run), runs ``python -m lmlab pretrain ...`` in a subprocess and asserts
:func:`assert_one_line_error` and that every pre-existing file hashes as before (the run
directory's ``.lmlab.lock``, which only ever holds the last holder's PID, aside).
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from lmlab_cli_harness import assert_one_line_error, run_lmlab, run_lmlab_here, tmpfs, tree_hashes  # noqa: E402
from lmlab_train_fixtures import write_prepared  # noqa: E402

from lmlab.data import read_tokenizer  # noqa: E402
from lmlab.io import LOCK_NAME  # noqa: E402
from lmlab.train import PretrainConfig, pretrain  # noqa: E402

TINY = ["--batch-size", "4", "--seq-len", "16", "--steps", "2", "--eval-every", "2", "--eval-batches", "1",
        "--no-progress", "--precision", "fp32"]  # fmt: skip
GPT = ["--model", "gpt-tiny", "--objective", "causal"]


def tiny_run(data: Path, out: Path, **kw) -> Path:
    base = dict(data=[str(data)], out=str(out), objective="causal", model="gpt-tiny", steps=2, batch_size=4,
                seq_len=16, eval_every=2, eval_batches=1, save_every=1, progress=False, precision="fp32",
                workers=0)  # fmt: skip
    pretrain(PretrainConfig(**{**base, **kw}))
    return out


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fx")
    data = write_prepared(root / "data", train_docs=200, val_docs=30)
    return {"data": data, "run": tiny_run(data, root / "run")}


def hashes(*roots: Path) -> dict[str, dict[str, str]]:
    return {
        str(r): {k: v for k, v in tree_hashes(r).items() if not k.endswith(LOCK_NAME)}
        for r in roots
        if r.exists()
    }


# ---------------------------------------------------------------------------------------------- setups
# Each takes (tmp_path, fx) and returns the argv after "pretrain".


def new(*flags: str) -> Callable[[Path, dict], list[str]]:
    return lambda t, fx: ["--data", str(fx["data"]), *GPT, *TINY, *flags, "--out", str(t / "out")]


def out_at(where: Callable[[Path, dict], Path]) -> Callable[[Path, dict], list[str]]:
    return lambda t, fx: ["--data", str(fx["data"]), *GPT, *TINY, "--out", str(where(t, fx))]


def a_file(t: Path, fx) -> Path:
    (t / "notes.txt").write_text("mine\n")
    return t / "notes.txt"


def under_a_file(t: Path, fx) -> Path:
    return a_file(t, fx) / "run"


def users_dir(t: Path, fx) -> Path:
    (t / "mine").mkdir()
    (t / "mine" / "notes.txt").write_text("my notes\n")
    return t / "mine"


def inside_data(t: Path, fx) -> list[str]:
    data = shutil.copytree(fx["data"], t / "data")
    return ["--data", str(data), *GPT, *TINY, "--out", str(data / "run")]


def copied_run(t: Path, fx) -> Path:
    return shutil.copytree(fx["run"], t / "run")


def resume_with(edit: Callable[[Path], None], *flags: str) -> Callable[[Path, dict], list[str]]:
    def setup(t: Path, fx) -> list[str]:
        run = copied_run(t, fx)
        edit(run)
        return ["--resume", str(run), "--no-progress", *flags]

    return setup


def edit_config(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def edit(run: Path) -> None:
        saved = json.loads((run / "config.json").read_text())
        saved = change(saved) or saved
        (run / "config.json").write_text(json.dumps(saved))

    return edit


def set_setting(key: str, value) -> Callable[[Path], None]:
    return edit_config(lambda c: c["config"].__setitem__(key, value))


def every_manifest(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(run: Path) -> None:
        for m in (run / "checkpoints").glob("step-*/manifest.json"):
            saved = json.loads(m.read_text())
            change(saved)
            m.write_text(json.dumps(saved))

    return edit


def out_of_vocabulary(t: Path, fx) -> list[str]:
    data = shutil.copytree(fx["data"], t / "data")
    ids = np.fromfile(data / "train.bin", dtype="<u2")
    ids[len(ids) // 2] = 600  # the vocabulary has ~330 ids; uint16 holds any id up to 65535
    ids.tofile(data / "train.bin")
    return ["--data", str(data), *GPT, *TINY, "--out", str(t / "out")]


def init_and_model(t: Path, fx) -> list[str]:
    return ["--data", str(fx["data"]), "--init", str(fx["run"] / "final"), "--model", "gpt-tiny",
            "--objective", "causal", *TINY, "--out", str(t / "out")]  # fmt: skip


def resume_on_changed_data(t: Path, fx) -> list[str]:
    data = shutil.copytree(fx["data"], t / "data")
    run = tiny_run(data, t / "run")
    # Re-prepared from other text with the same tokenizer: same vocabulary, different ids.
    write_prepared(data, train_docs=200, val_docs=30, seed=7, tok=read_tokenizer(fx["data"]))
    return ["--resume", str(run), "--steps", "3", "--no-progress"]


def resume_on_missing_data(t: Path, fx) -> list[str]:
    data = shutil.copytree(fx["data"], t / "data")
    run = tiny_run(data, t / "run")
    shutil.rmtree(data)
    return ["--resume", str(run), "--steps", "3", "--no-progress"]


CASES = [
    # (id, setup, expected words)
    ("lr-inf", new("--lr", "inf"), ["--lr", "finite"]),
    ("lr-nan", new("--lr", "nan"), ["--lr", "nan"]),
    ("lr-negative", new("--lr", "-1"), ["--lr", "positive"]),
    ("clip-inf", new("--clip", "inf"), ["--clip", "finite"]),
    ("weight-decay-nan", new("--weight-decay", "nan"), ["--weight-decay"]),
    ("weight-decay-negative", new("--weight-decay", "-0.1"), ["--weight-decay", ">= 0"]),
    ("mix-alpha-inf", new("--mix-alpha", "inf"), ["--mix-alpha", "finite"]),
    ("steps-not-a-number", new("--steps", "ten"), ["--steps", "invalid int"]),
    ("model-with-init", init_and_model, ["--init", "drop --model"]),
    ("causal-seq-len-1", new("--seq-len", "1"), ["--seq-len 1", "no target"]),
    (
        "prefix-seq-len-1",
        lambda t, fx: [*new("--seq-len", "1")(t, fx), "--objective", "prefix"],
        ["--seq-len 1", "no target"],
    ),
    (
        "span-seq-len-1",
        lambda t, fx: ["--data", str(fx["data"]), *TINY, "--seq-len", "1", "--out", str(t / "out")],
        ["--seq-len 1", "too short", "span"],
    ),
    ("seq-len-0", new("--seq-len", "0"), ["--seq-len", "positive"]),
    ("device-cuda-on-cpu-build", new("--device", "cuda"), ["--device cuda"]),
    ("device-bogus", new("--device", "bogus"), ["bogus"]),
    ("out-is-a-file", out_at(a_file), ["notes.txt", "not a directory"]),
    ("out-under-a-file", out_at(under_a_file), ["under the file"]),
    ("out-is-a-users-dir", out_at(users_dir), ["mine", "not empty"]),
    ("out-is-the-data", out_at(lambda t, fx: fx["data"]), ["holds the input"]),
    ("out-inside-the-data", inside_data, ["inside the input"]),
    ("out-holds-a-run", out_at(copied_run), ["already holds a run", "--resume"]),
    ("out-of-vocabulary-id", out_of_vocabulary, ["train.bin", "token id 600", "outside the vocabulary"]),
    ("resume-not-a-run", lambda t, fx: ["--resume", str(users_dir(t, fx))], ["not an lmlab run directory"]),
    ("resume-changed-data", resume_on_changed_data, ["changed since the run started", "token files"]),
    ("resume-missing-data", resume_on_missing_data, ["does not exist"]),
    (
        "resume-config-steps-ten",
        resume_with(set_setting("steps", "ten")),
        ["config.json", "steps", "integer"],
    ),
    ("resume-config-lr-string", resume_with(set_setting("lr", "fast")), ["config.json", "lr", "number"]),
    ("resume-config-data-int", resume_with(set_setting("data", 5)), ["config.json", "data"]),
    ("resume-config-a-list", resume_with(edit_config(lambda c: [c])), ["config.json", "unreadable"]),
    ("resume-config-not-json", resume_with(lambda r: (r / "config.json").write_text("{")), ["unreadable"]),
    (
        "resume-manifest-files-empty",
        resume_with(every_manifest(lambda m: m.__setitem__("files", {})), "--steps", "3"),
        ["no usable checkpoint", "corrupt"],
    ),
    (
        "resume-manifest-wrong-types",
        resume_with(every_manifest(lambda m: m.__setitem__("files", ["model.safetensors"])), "--steps", "3"),
        ["no usable checkpoint"],
    ),
    (
        "resume-manifest-bytes-a-string",
        resume_with(
            every_manifest(lambda m: m["files"]["state.pt"].__setitem__("bytes", "many")), "--steps", "3"
        ),
        ["no usable checkpoint"],
    ),
    (
        "resume-with-a-fixed-setting",
        resume_with(lambda r: None, "--lr", "0.1"),
        ["--resume uses the run's own settings", "--lr"],
    ),
]


_SUBPROCESS = {"out-of-vocabulary-id", "resume-manifest-files-empty", "device-bogus"}


@pytest.mark.slow
@pytest.mark.parametrize(("setup", "words"), [pytest.param(s, w, id=i) for i, s, w in CASES])
def test_bad_input_is_one_line_and_touches_nothing(fx, tmp_path, setup, words, request):
    argv = setup(tmp_path, fx)
    before = hashes(tmp_path, fx["data"], fx["run"])
    # A few cases run the installed command in a subprocess; the rest lmlab.cli.main in this process.
    run = run_lmlab if request.node.callspec.id in _SUBPROCESS else run_lmlab_here
    r = run(["pretrain", *argv], timeout=300)
    assert_one_line_error(r, *words)
    assert hashes(tmp_path, fx["data"], fx["run"]) == before
    assert not (tmp_path / "out").exists()  # a refused new run leaves no directory behind


@pytest.mark.slow
def test_a_read_only_out_is_one_line(fx, tmp_path):
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        r = run_lmlab(["pretrain", *new()(tmp_path, fx)[:-1], str(ro / "run")])
        assert_one_line_error(r, "read-only", str(ro / "run"))
