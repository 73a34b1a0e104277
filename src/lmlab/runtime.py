"""What lmlab asks of the machine and the process: CPU probes and process-wide tuning, in one place.

Nothing here runs at import.  The probes (native bf16, AMD's AVX-512, hence the MKL-vs-oneDNN choice
for fp32 products) read ``/proc/cpuinfo`` on first use and cache the answer for the process.  The
tuning changes the whole process, so library calls never apply it on their own:

* :func:`tune_process` -- TF32 matrix products on CUDA, glibc's :func:`keep_freed_memory` on CPU.
  ``lmlab pretrain`` and ``lmlab quickstart`` apply it; ``pretrain(cfg, tune_process=True)`` asks
  for it from Python (and then leaves it on, as the CLI does).
* :func:`onednn_policy` -- a context (not a global) in which :mod:`lmlab.models.onednn` routes fp32
  CPU products by a policy: ``"auto"`` (where the gain was measured, see :func:`prefers_onednn`),
  ``"on"`` (any x86 CPU with the op) or ``"off"``; the impl spellings ``"fast"`` / ``"reference"``
  mean on / off.  ``PretrainConfig.onednn`` carries it for a run; the CLI reads ``LMLAB_ONEDNN``.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import re
import sys
from collections.abc import Iterator
from typing import Any

from lmlab.errors import LmlabError

ONEDNN_POLICIES = ("auto", "on", "off")
# The spellings accepted for a policy: lmlab.impl's names and the environment variable's.
_ALIASES = {"": "auto", "auto": "auto", "on": "on", "fast": "on", "1": "on", "true": "on", "yes": "on",
            "off": "off", "reference": "off", "0": "off", "false": "off", "no": "off"}  # fmt: skip
_ONEDNN: contextvars.ContextVar[str] = contextvars.ContextVar("lmlab_onednn_policy", default="auto")


# ---------------------------------------------------------------------------------------------- probes


def _cpuinfo(limit: int | None = None) -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return f.read(limit) if limit else f.read()
    except OSError:
        return ""


@functools.cache
def cpu_native_bf16() -> bool:
    """Whether this x86 CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); Linux only.

    There oneDNN's bf16 matrix products run about 4× its fp32 ones (measured: 0.93 vs 0.19
    TFLOP/s on 2 cores of an AVX512-BF16 EPYC); elsewhere bf16 is emulated and slower.
    """
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", _cpuinfo()) is not None


@functools.cache
def mkl_leaves_avx512_idle() -> bool:
    """An AMD CPU with AVX-512 (Linux's /proc/cpuinfo): there MKL's SGEMM runs its AVX2 code.

    Measured on a Zen 5 EPYC: 187 GFLOP/s for 4096 × 512 × 512, 191 with MKL held to AVX2
    (``MKL_ENABLE_INSTRUCTIONS=AVX2``), against oneDNN's 410.
    """
    info = _cpuinfo(1 << 16)  # the first processor's block is enough
    return "AuthenticAMD" in info and " avx512f" in info


# ---------------------------------------------------------------------------------------------- oneDNN policy


def check_onednn_policy(policy: str | None) -> str:
    """``policy`` as one of :data:`ONEDNN_POLICIES` (None is ``auto``); a one-line error otherwise."""
    key = "" if policy is None else str(policy).strip().lower()
    if key not in _ALIASES:
        raise LmlabError(
            f"unknown oneDNN policy {policy!r}; choose auto, on (or fast, 1) or off (or reference, 0)"
        )
    return _ALIASES[key]


def current_onednn_policy() -> str:
    """The policy of the innermost :func:`onednn_policy` context (``auto`` outside any)."""
    return _ONEDNN.get()


@contextlib.contextmanager
def onednn_policy(policy: str | None) -> Iterator[str]:
    """A context in which :mod:`lmlab.models.onednn` routes by ``policy``; the previous one after it."""
    token = _ONEDNN.set(check_onednn_policy(policy))
    try:
        yield _ONEDNN.get()
    finally:
        _ONEDNN.reset(token)


def prefers_onednn(policy: str | None = None) -> bool:
    """Whether fp32 CPU products should go to oneDNN rather than MKL under ``policy``.

    ``auto`` routes where the gain was measured, AMD CPUs with AVX-512 (Zen 4 and 5), where MKL
    leaves half the vector width idle; on Intel's AVX-512 cores MKL already runs its AVX-512
    kernels, and on AVX2-only cores both libraries run AVX2, so those keep MKL.  The choice is fixed
    per machine, not timed at start-up, so a resumed run takes the same path as the run it resumes.
    (Whether the op itself works here is :func:`lmlab.models.onednn.available`'s check.)
    """
    p = check_onednn_policy(policy) if policy is not None else current_onednn_policy()
    return p == "on" or (p == "auto" and mkl_leaves_avx512_idle())


# ---------------------------------------------------------------------------------------------- tuning

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    A CPU training step frees and re-allocates tens of MB of activations.  By default glibc
    returns the free top of its heap to the kernel (and maps big blocks afresh), so each step
    page-faults that memory back in, zero-filled by the kernel: measured for t5-tiny on 2 cores,
    6-7k faults and 10 ms of system time per fp32 step, 16k and 27 ms per bf16 step; with the
    thresholds raised, the bf16 step took 80 instead of 96 ms.  This is what Intel's PyTorch CPU
    tuning guide gets by preloading jemalloc or tcmalloc.  Blocks up to 32 MiB (glibc's ceiling
    for the setting) come from the heap, and up to 1 GiB of free heap is kept.  Process-wide and
    never undone; True where it was applied (Linux with glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # another C library (musl): leave it as it is
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def allow_tf32() -> None:
    """TF32 for fp32 matrix products and convolutions on CUDA (Ampere and later): process-wide."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def tune_process(device: Any) -> dict[str, bool]:
    """The process tuning for training on ``device`` (a torch.device or its name): what was applied.

    CUDA: TF32 products (:func:`allow_tf32`); CPU: glibc keeps freed memory (:func:`keep_freed_memory`).
    Process-wide and left on: the command line applies it; library calls only when asked.
    """
    kind = getattr(device, "type", None) or str(device).split(":")[0]
    if kind == "cuda":
        allow_tf32()
        return {"tf32": True, "keep_freed_memory": False}
    return {"tf32": False, "keep_freed_memory": keep_freed_memory() if kind == "cpu" else False}
