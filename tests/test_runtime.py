"""lmlab.runtime: the CPU probes are lazy, the process tuning is applied only when asked, the oneDNN
policy is a context that is restored after it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lmlab import runtime
from lmlab.errors import LmlabError


@pytest.mark.slow  # a fresh interpreter
def test_importing_lmlab_probes_nothing():
    """``lmlab --help`` (every command module) and the runtime module read no /proc/cpuinfo at import."""
    code = (
        "import builtins, sys\n"
        "real = builtins.open\n"
        "def spy(f, *a, **k):\n"
        "    assert 'cpuinfo' not in str(f), 'probed at import'\n"
        "    return real(f, *a, **k)\n"
        "builtins.open = spy\n"
        "import lmlab.runtime, lmlab.models.onednn, lmlab.train.loop, lmlab.cli\n"
        "lmlab.cli.build_parser()\n"
        "assert lmlab.runtime.cpu_native_bf16.cache_info().currsize == 0\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_keep_freed_memory_tunes_glibc_and_skips_other_c_libraries(monkeypatch):
    import ctypes
    import platform

    from lmlab import runtime as loop

    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(loop.sys, "platform", "linux")
    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc())
    assert loop.keep_freed_memory.__wrapped__() is True
    assert calls == [(-3, 32 << 20), (-1, 1 << 30)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD

    def missing(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", missing)
    assert loop.keep_freed_memory.__wrapped__() is False
    monkeypatch.undo()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":  # the real call succeeds here
        assert loop.keep_freed_memory.__wrapped__() is True


def test_tune_process_applies_what_the_device_needs(monkeypatch):
    calls = []
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: calls.append("malloc") or True)
    monkeypatch.setattr(runtime, "allow_tf32", lambda: calls.append("tf32"))
    assert runtime.tune_process(torch.device("cpu")) == {"tf32": False, "keep_freed_memory": True}
    assert runtime.tune_process("cuda:1") == {"tf32": True, "keep_freed_memory": False}
    assert calls == ["malloc", "tf32"]


def test_allow_tf32_switches_both_backends():
    was = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        runtime.allow_tf32()
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = was


@pytest.mark.parametrize(
    ("given", "policy"),
    [(None, "auto"), ("", "auto"), ("AUTO", "auto"), ("1", "on"), ("fast", "on"), ("on", "on"), ("yes", "on"),
     ("0", "off"), ("reference", "off"), ("false", "off"), (" off ", "off")],
)  # fmt: skip
def test_policy_spellings(given, policy):
    assert runtime.check_onednn_policy(given) == policy


def test_policy_is_a_context_restored_after_it(monkeypatch):
    monkeypatch.setattr(runtime, "mkl_leaves_avx512_idle", lambda: False)
    assert runtime.current_onednn_policy() == "auto" and not runtime.prefers_onednn()
    with runtime.onednn_policy("on"):
        assert runtime.prefers_onednn()
        with runtime.onednn_policy("reference"):
            assert runtime.current_onednn_policy() == "off" and not runtime.prefers_onednn()
        assert runtime.current_onednn_policy() == "on"
    assert runtime.current_onednn_policy() == "auto"
    monkeypatch.setattr(runtime, "mkl_leaves_avx512_idle", lambda: True)
    assert runtime.prefers_onednn() and runtime.prefers_onednn("auto") and not runtime.prefers_onednn("off")
    with pytest.raises(LmlabError, match="unknown oneDNN policy 'maybe'"):
        runtime.onednn_policy("maybe").__enter__()


def test_probes_read_cpuinfo_flags(monkeypatch):
    monkeypatch.setattr(
        runtime, "_cpuinfo", lambda limit=None: "vendor_id : AuthenticAMD\nflags : sse avx512f avx512_bf16"
    )
    assert runtime.cpu_native_bf16.__wrapped__() and runtime.mkl_leaves_avx512_idle.__wrapped__()
    monkeypatch.setattr(
        runtime, "_cpuinfo", lambda limit=None: "vendor_id : GenuineIntel\nflags : sse avx512f"
    )
    assert not runtime.cpu_native_bf16.__wrapped__() and not runtime.mkl_leaves_avx512_idle.__wrapped__()
    monkeypatch.setattr(runtime, "_cpuinfo", lambda limit=None: "")  # no /proc (macOS, Windows)
    assert not runtime.cpu_native_bf16.__wrapped__() and not runtime.mkl_leaves_avx512_idle.__wrapped__()
