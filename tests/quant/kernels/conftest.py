"""Where the Triton kernels run in the tests: on the GPU when there is one, else under Triton's
interpreter (``TRITON_INTERPRET=1``) on CPU tensors, so CI checks the very kernels the GPU runs.

The interpreter is chosen here, before any lmlab Triton module is imported (``triton.jit`` reads the
variable when a kernel is defined). Without triton installed the kernel tests skip.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

HAVE_TRITON = importlib.util.find_spec("triton") is not None
ON_GPU = torch.cuda.is_available()
if HAVE_TRITON and not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def triton_device() -> str:
    """The device the Triton kernels are tested on: ``"cuda"``, or ``"cpu"`` under the interpreter."""
    if not HAVE_TRITON:
        pytest.skip("triton is not installed (pip install 'lmlab[gpu]')")
    if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA device and TRITON_INTERPRET is not 1")
    return "cuda" if ON_GPU else "cpu"
