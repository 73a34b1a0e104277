import os
import stat

import pytest

from lmlab.io import atomic_dir, atomic_open, atomic_write_json


def mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_atomic_open_replaces_only_on_success(tmp_path):
    p = tmp_path / "f.txt"
    p.write_text("old")
    with pytest.raises(RuntimeError), atomic_open(p, "w") as f:
        f.write("half")
        raise RuntimeError("killed")
    assert p.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]  # no temporary left behind
    atomic_write_json(p, {"a": 1})
    assert p.read_text() == '{\n  "a": 1\n}\n'


def test_atomic_dir_replaces_whole_directory(tmp_path):
    d = tmp_path / "ckpt"
    with atomic_dir(d) as t:
        (t / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(d) as t:
        (t / "b").write_text("2")
        raise RuntimeError("killed")
    assert sorted(os.listdir(d)) == ["a"]
    with atomic_dir(d) as t:
        (t / "c").write_text("3")
    assert sorted(os.listdir(d)) == ["c"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_results_get_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_open(tmp_path / "f", "wb") as f:
            f.write(b"x")
        with atomic_dir(tmp_path / "d") as t:
            (t / "w.safetensors").write_bytes(b"x")
            (t / "w.safetensors").chmod(0o600)  # as safetensors writes it
            (t / "run.sh").write_bytes(b"x")
            (t / "run.sh").chmod(0o700)
    finally:
        os.umask(old)
    assert mode(tmp_path / "f") == 0o644  # not mkstemp's 0600
    assert mode(tmp_path / "d") == 0o755  # not mkdtemp's 0700
    assert mode(tmp_path / "d" / "w.safetensors") == 0o644
    assert mode(tmp_path / "d" / "run.sh") == 0o744  # read access added, the writer's own bits kept
