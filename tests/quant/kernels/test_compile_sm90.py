"""Every Triton kernel of lmlab compiles for sm_90 (H100 / H200) without register spills.

The interpreter tests beside this file run the kernels' Python bodies on CPU tensors but never
compile them; ``bench/triton_compile_check.py --quick`` lowers the first config of each kernel
(QLoRA: Dettmers et al. 2023 §3; LLM.int8(): Dettmers et al. 2022 §3) with the ptxas bundled in the
triton wheel, no GPU needed. It runs in a subprocess without ``TRITON_INTERPRET`` (set by the
conftest), which would otherwise turn the kernels into interpreted ones that cannot be compiled.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "bench" / "triton_compile_check.py"
MODULES = ("triton_4bit", "triton_int8")


def _bundled_ptxas() -> Path | None:
    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return path if os.access(path, os.X_OK) else None


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
    pytest.mark.skipif(_bundled_ptxas() is None, reason="triton's bundled ptxas is missing"),
]


def _kernel_names() -> list[str]:
    """``module.name`` of every ``*_kernel`` Triton object of lmlab's kernel modules."""
    import triton
    from triton.runtime.interpreter import InterpretedFunction  # what triton.jit makes under the conftest

    kinds = (
        triton.runtime.jit.JITFunction,
        InterpretedFunction,
        triton.runtime.autotuner.Autotuner,
        triton.runtime.autotuner.Heuristics,
    )
    names = []
    for mod in MODULES:
        module = importlib.import_module(f"lmlab.quant.kernels.{mod}")
        names += [
            f"{mod}.{n}"
            for n, obj in vars(module).items()
            if n.endswith("_kernel") and isinstance(obj, kinds)
        ]
    return names


def test_quick_compile_sm90_every_kernel():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--arch", "90"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "skipped" not in proc.stdout, out
    names = _kernel_names()
    assert len(names) >= 10, names
    compiled = [line.split()[0] for line in proc.stdout.splitlines() if " regs " in line]
    missing = [n for n in names if n not in compiled]
    assert not missing, f"not compiled: {missing}\n{out}"
