"""Transparent huge pages for large fresh CPU outputs (Linux ``madvise``; advice only, elsewhere a no-op)."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys


@functools.lru_cache(maxsize=1)
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        fn.restype = ctypes.c_int
        return fn
    return None


def _advise_hugepages(ptr: int, nbytes: int) -> None:
    # A fresh multi-megabyte output is otherwise faulted in 4 KiB at a time, which costs more
    # than decoding it. Asking for transparent huge pages on the 2 MiB-aligned interior of the
    # untouched allocation is only advice: where the kernel says no, nothing changes.
    fn = _madvise()
    if fn is None:
        return
    huge = 1 << 21
    start = (ptr + huge - 1) & ~(huge - 1)
    end = (ptr + nbytes) & ~(huge - 1)
    if end > start:
        fn(start, end - start, 14)  # MADV_HUGEPAGE
