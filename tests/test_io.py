import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from lmlab.errors import LmlabError
from lmlab.io import (
    LOCK_NAME,
    DirLock,
    atomic_dir,
    atomic_open,
    atomic_write_bytes,
    atomic_write_json,
    check_output_dir,
    disk_error,
    is_disk_full,
    output_kind,
    recover_interrupted_swap,
    remove_stale_temps,
)


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


def _dead_pid() -> int:
    # Above the kernel's PID ceiling, so never a live process.
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text()) + 12345
    except OSError:
        return 2**22 + 12345


def test_temporary_names_carry_the_writers_pid(tmp_path):
    seen = []
    with atomic_open(tmp_path / "f", "wb") as f:
        seen = os.listdir(tmp_path)
        f.write(b"x")
    assert len(seen) == 1 and seen[0].startswith(f".f.{os.getpid()}.") and seen[0].endswith(".tmp")


def test_remove_stale_temps_spares_live_writers_and_other_files(tmp_path):
    dead, live = _dead_pid(), os.getpid()
    (tmp_path / f".train.bin.{dead}.abc123.tmp").write_bytes(b"x")
    (tmp_path / f".step-00000100.{dead}.q9_z.tmp").mkdir()
    (tmp_path / f".step-00000100.{dead}.q9_z.tmp" / "model.safetensors").write_bytes(b"x")
    (tmp_path / f".out.{live}.abc.tmp").write_bytes(b"mine")
    (tmp_path / "notes.tmp").write_text("a user's file")
    (tmp_path / ".hidden.tmp").write_text("not lmlab's pattern")
    removed = remove_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == sorted(
        [f".train.bin.{dead}.abc123.tmp", f".step-00000100.{dead}.q9_z.tmp"]
    )
    assert sorted(os.listdir(tmp_path)) == sorted([f".out.{live}.abc.tmp", "notes.tmp", ".hidden.tmp"])


def test_interrupted_swap_is_undone_or_finished(tmp_path):
    d = tmp_path / "data"
    old = tmp_path / ".data.old"
    old.mkdir()
    (old / "meta.json").write_text("old")
    recover_interrupted_swap(d)  # killed between the renames: the old directory comes back
    assert (d / "meta.json").read_text() == "old" and not old.exists()
    old.mkdir()
    recover_interrupted_swap(d)  # killed after both renames: the new one stays, the old goes
    assert (d / "meta.json").read_text() == "old" and not old.exists()


def _make(kind: str, d):
    d.mkdir(parents=True, exist_ok=True)
    if kind == "prepared":
        (d / "meta.json").write_text(json.dumps({"format": "lmlab-tokens-v1"}))
    elif kind == "quantized":
        (d / "lmlab_quant.json").write_text("{}")
        (d / "config.json").write_text("{}")
    elif kind == "run":
        (d / "config.json").write_text(json.dumps({"config": {}, "resolved": {}}))
    elif kind == "model":
        (d / "config.json").write_text(json.dumps({"model_type": "t5"}))
    return d


@pytest.mark.parametrize("kind", ["prepared", "quantized", "run", "model"])
def test_output_kind_reads_each_marker(tmp_path, kind):
    assert output_kind(_make(kind, tmp_path / kind)) == kind
    assert output_kind(tmp_path / "missing") is None
    (tmp_path / "plain").mkdir()
    assert output_kind(tmp_path / "plain") is None


def test_check_output_dir_accepts_new_empty_and_own_kind_with_overwrite(tmp_path):
    assert check_output_dir(tmp_path / "new" / "deeper", "quantized") == tmp_path / "new" / "deeper"
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", "quantized")
    # a dead writer's leftovers and a lock file do not make a directory "not empty"
    (tmp_path / "empty" / f".x.{_dead_pid()}.a.tmp").write_bytes(b"")
    (tmp_path / "empty" / LOCK_NAME).write_text("1\n")
    check_output_dir(tmp_path / "empty", "quantized")
    q = _make("quantized", tmp_path / "q")
    with pytest.raises(LmlabError, match="--overwrite"):
        check_output_dir(q, "quantized")
    check_output_dir(q, "quantized", overwrite=True)


@pytest.mark.parametrize(
    "setup, words",
    [
        ("notes", "is not empty"),
        ("run", "holds a training run"),
        ("prepared", "holds a prepared data directory"),
        ("file", "is not a directory"),
        ("under-file", "is under the file"),
        ("is-input", "holds the input"),
        ("contains-input", "holds the input"),
        ("inside-input", "lies inside the input"),
    ],
)
def test_check_output_dir_refuses_what_would_lose_data(tmp_path, setup, words):
    inputs = []
    out = tmp_path / "out"
    if setup == "notes":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif setup in ("run", "prepared"):
        _make(setup, out)
    elif setup == "file":
        out.write_text("a file")
    elif setup == "under-file":
        (tmp_path / "f").write_text("a file")
        out = tmp_path / "f" / "out"
    elif setup == "is-input":
        _make("model", out)
        inputs = [out]
    elif setup == "contains-input":
        _make("model", out / "final")
        inputs = [out / "final"]
    elif setup == "inside-input":
        _make("model", tmp_path / "model")
        out = tmp_path / "model" / "nested"
        inputs = [tmp_path / "model"]
    with pytest.raises(LmlabError, match=words):
        check_output_dir(out, "quantized", overwrite=True, inputs=inputs)
    # `.` and relative spellings resolve to the same directory
    if setup == "is-input":
        with pytest.raises(LmlabError, match="holds the input"):
            check_output_dir(str(out) + "/.", "quantized", inputs=[out])


def test_dir_lock_is_exclusive_names_the_holder_and_dies_with_it(tmp_path):
    d = tmp_path / "run"
    with DirLock(d):
        assert (d / LOCK_NAME).read_text().strip() == str(os.getpid())
        # another process cannot take it, and is told who holds it
        code = (
            "import sys; from lmlab.io import DirLock; from lmlab.errors import LmlabError\n"
            f"try:\n    DirLock({str(d)!r}).acquire()\nexcept LmlabError as e:\n    print(e); sys.exit(3)\n"
        )
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert r.returncode == 3, r.stderr
        assert f"PID {os.getpid()}" in r.stdout and "in use" in r.stdout
    # released: taken again at once
    with DirLock(d):
        pass
    # a holder that is SIGKILLed leaves a lock file but no lock
    p = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from lmlab.io import DirLock; DirLock({str(d)!r}).acquire(); print('held', flush=True); import time; time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    with p.stdout:
        assert p.stdout.readline().strip() == "held"
        p.kill()
        p.wait()
    with DirLock(d):
        assert (d / LOCK_NAME).read_text().strip() == str(os.getpid())


def test_full_disk_is_recognised_also_when_wrapped():
    assert is_disk_full(OSError(28, "No space left on device"))
    assert is_disk_full(OSError(27, "File too large"))
    assert not is_disk_full(OSError(13, "Permission denied"))
    assert is_disk_full(RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })"))
    assert is_disk_full(
        RuntimeError(
            "[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/0: file write failed"
        )
    )
    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError as e:
            raise RuntimeError("wrapped") from e
    except RuntimeError as e:
        assert is_disk_full(e)
    msg = str(disk_error("/tmp/x/y", 10, 20))
    assert msg.startswith("no space left on ") and "wrote 10 of 20 bytes" in msg and "\n" not in msg


def _write_under_limit(tmp_path, code: str, limit: int) -> subprocess.CompletedProcess:
    import resource
    import signal

    def lim():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, preexec_fn=lim
    )


def test_full_disk_leaves_the_old_file_and_no_temporary(tmp_path):
    (tmp_path / "f.bin").write_bytes(b"old")
    code = (
        "import sys\nfrom lmlab.io import atomic_write_bytes, atomic_dir\nfrom lmlab.errors import LmlabError\n"
        "try:\n    atomic_write_bytes('f.bin', b'x' * 100000)\nexcept LmlabError as e:\n    print(e)\n"
        "try:\n    with atomic_dir('d') as t:\n        (t / 'w').write_bytes(b'x' * 100000)\nexcept LmlabError as e:\n    print(e)\n"
    )
    r = _write_under_limit(tmp_path, code, 50000)
    lines = r.stdout.splitlines()
    assert len(lines) == 2, (r.stdout, r.stderr)
    assert lines[0].startswith("no space left on ") and "of 100,000 bytes" in lines[0]
    assert lines[1].startswith("no space left on ") and "while writing d" in lines[1]
    assert (tmp_path / "f.bin").read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["f.bin"]


def test_atomic_write_bytes_round_trip(tmp_path):
    atomic_write_bytes(tmp_path / "a" / "b.bin", b"hello")
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"hello"
    assert os.listdir(tmp_path / "a") == ["b.bin"]


def test_lock_beside_a_swapped_output_is_exclusive_and_removed(tmp_path):
    out = tmp_path / "nf4"
    lock = DirLock(out, "quantized model directory", beside=True)
    with lock:
        assert lock.path == tmp_path / ".nf4.lmlab.lock" and lock.path.is_file()
        assert not out.exists()  # the output itself is not created by the lock
        with pytest.raises(LmlabError, match=f"PID {os.getpid()}"):
            # flock is per open file: a second open in this process conflicts like another process
            DirLock(out, "quantized model directory", beside=True).acquire()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("command", ["prepare", "quantize"])
def test_a_second_writer_of_the_same_out_is_refused_in_one_line(tmp_path, command):
    from lmlab_cli_harness import assert_one_line_error, run_lmlab

    out = tmp_path / "out"
    corpus = tmp_path / "c.txt"
    corpus.write_text("some text\n\nmore text\n")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    holder = subprocess.Popen(
        [sys.executable, "-c",
         f"from lmlab.io import DirLock; DirLock({str(out)!r}, beside=True).acquire(); print('held', flush=True); "
         "import time; time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        if command == "prepare":
            r = run_lmlab(["prepare", "--corpus", str(corpus), "--out", str(out), "--vocab-size", "300"])
        else:
            r = run_lmlab(["quantize", str(tmp_path / "model"), "--method", "nf4", "--out", str(out)])
        assert_one_line_error(r, "in use by another lmlab process", f"PID {holder.pid}")
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


@pytest.mark.parametrize("text, words", [("{", "not valid JSON"), ("[1, 2]", "must hold a JSON object, got list"),
                                         (b"\xff\xfe", "not valid JSON")])  # fmt: skip
def test_read_json_object_names_a_damaged_file(tmp_path, text, words):
    from lmlab.data.shards import load_meta
    from lmlab.io import read_json_object

    p = tmp_path / "meta.json"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(LmlabError, match=words) as e:
        read_json_object(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(LmlabError, match=words):  # a prepared directory's meta.json, hand-edited
        load_meta(tmp_path)
    p.write_text('{"a": 1}')
    assert read_json_object(p) == {"a": 1}
