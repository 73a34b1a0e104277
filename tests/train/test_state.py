"""lmlab.train.state: the run directory's settings and data identity, what --resume checks, final/'s settings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from lmlab_train_fixtures import tiny_config as tiny  # noqa: E402
from lmlab_train_fixtures import write_prepared  # noqa: E402

from lmlab.train import (  # noqa: E402
    PretrainConfig,
    pretrain,
    state,  # noqa: E402
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_prepared(tmp_path_factory.mktemp("data") / "prepared")


def test_resume_notes_a_change_of_fp32_product_library(data_dir, tmp_path, capsys):
    """A run resumed with the other fp32 products (onednn, LMLAB_ONEDNN) says it will match to rounding only."""
    from lmlab.models import onednn

    if not onednn._probe():
        pytest.skip("no oneDNN fp32 linear in this torch build")
    pretrain(tiny(data_dir, tmp_path / "r", steps=4, eval_every=100, onednn="on"))
    capsys.readouterr()
    resumed = pretrain(PretrainConfig.resume_from(tmp_path / "r", steps=6, progress=False, onednn="off"))
    err = capsys.readouterr().err
    assert resumed.step == 6 and "multiplied fp32 with onednn, this process with torch" in err
    saved = json.loads((tmp_path / "r" / "config.json").read_text())["resolved"]
    assert saved["cpu_fp32_products"] == "torch"  # what the resumed part ran with


def test_resume_a_run_whose_config_predates_a_setting(data_dir, tmp_path):
    import json

    pretrain(tiny(data_dir, tmp_path / "run", steps=4, precision="auto"))
    path = tmp_path / "run" / "config.json"
    saved = json.loads(path.read_text())
    del saved["config"]["precision"]  # as an lmlab without --precision wrote it
    path.write_text(json.dumps(saved))
    longer = pretrain(PretrainConfig.resume_from(tmp_path / "run", steps=5, progress=False))
    assert longer.step == 5


def test_data_identity_changes_with_the_tokens(data_dir, tmp_path):
    import shutil

    data = shutil.copytree(data_dir, tmp_path / "data")
    was = state.data_identity([str(data)])[str(data)]
    assert was == state.data_identity([str(data)])[str(data)]  # deterministic
    raw = bytearray((data / "train.bin").read_bytes())
    raw[0] ^= 1
    (data / "train.bin").write_bytes(bytes(raw))
    now = state.data_identity([str(data)])[str(data)]
    assert [k for k in now if now[k] != was[k]] == ["edges_sha256"]


def test_model_settings_from_the_file_or_an_older_hf_config(tmp_path):
    from types import SimpleNamespace

    assert state.model_settings(tmp_path) == {} and state.model_settings(None) == {}
    state.write_model_settings(tmp_path, {"seq_len": 64, "objective": "causal", "other": 1})
    assert json.loads((tmp_path / state.TRAINING_FILE).read_text()) == {"seq_len": 64, "objective": "causal"}
    assert state.model_settings(tmp_path) == {"seq_len": 64, "objective": "causal"}
    old = SimpleNamespace(lmlab_seq_len=128, lmlab_objective="span")
    assert state.model_settings(tmp_path / "missing", old) == {"seq_len": 128, "objective": "span"}
    (tmp_path / state.TRAINING_FILE).write_text("[1]")  # damaged: the HF config's, else nothing
    assert state.model_settings(tmp_path) == {}
