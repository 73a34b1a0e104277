"""fp32 linear layers on x86 CPUs through oneDNN, with their backward passes.

PyTorch's x86 wheels send fp32 ``F.linear`` / ``torch.mm`` to MKL's SGEMM.  On AMD CPUs MKL
takes its AVX2 code path even where the core has full-width AVX-512, so it runs at half the
machine's peak; oneDNN, which PyTorch also ships (bf16 products under CPU autocast already go
there), picks its kernels by instruction set and runs at the peak.  Measured on the 2-core AMD
EPYC (Zen 5) these benchmarks use, t5-tiny's shapes (4096 × 128 → 384 and the like), in GFLOP/s:

=========================  ==========  ======
product                    MKL SGEMM   oneDNN
=========================  ==========  ======
forward  x Wᵀ              190-205     380-455
input gradient  ∂y W       185-205     385-445
weight gradient  ∂yᵀ x     175-195     230-355
=========================  ==========  ======

:func:`linear` is ``F.linear`` with that routing: the forward and both gradients are oneDNN
products (``torch.ops.mkldnn._linear_pointwise``, the op Inductor's CPU backend calls), the
weight gradient formed in whichever orientation puts the smaller dimension first (the faster one
by 1.3-1.9x above).  Whole layers, forward and backward with autograd's bookkeeping and the
transposes the backward needs, run 1.3-1.7x faster (``bench/linear.py``).  The arithmetic is the same fp32 dot products, summed in another order, so
results agree with MKL's to float rounding, not bit for bit; each path is deterministic.

It applies to fp32 tensors on CPU outside autocast and ``torch.compile``, where the op exists
(x86-64 builds with oneDNN) and passes a one-time check against ``F.linear`` at first use;
anything else — other dtypes, CUDA, autocast's bf16 (already oneDNN), a build without the op —
takes ``F.linear`` itself, the reference the tests compare against.  The backward pass is not
itself differentiable (no double backward; training never needs one).

A policy chooses, passed by the caller (:func:`lmlab.runtime.onednn_policy`, a context, or the
``policy`` argument of :func:`available`; ``PretrainConfig.onednn`` for a run; the CLI reads
``LMLAB_ONEDNN``): ``auto`` (the default) routes where the gain was measured, AMD CPUs with AVX-512
(Zen 4 and 5), where MKL leaves half the vector width idle; on Intel's AVX-512 cores MKL already runs
its AVX-512 kernels, and on AVX2-only cores both libraries run AVX2, so those keep MKL (see
:func:`lmlab.runtime.prefers_onednn`).  ``on`` (impl's ``fast``) routes on any x86 CPU with the op,
``off`` (impl's ``reference``) never (for A/B runs).  No environment variable is read here.
"""

from __future__ import annotations

import contextlib
import platform

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode

from lmlab import runtime

_STATE: dict[str, bool] = {}


def _op():
    return torch.ops.mkldnn._linear_pointwise


def _probe() -> bool:
    """Whether the oneDNN op exists here and agrees with ``F.linear`` on a small product."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(37, 24, generator=g)
        w = torch.randn(19, 24, generator=g)
        v = torch.randn(37, 19, generator=g)
        with torch.autocast("cpu", enabled=False), torch.no_grad():
            y = _op()(x, w, None, "none", [], "")
            yt = _op()(x.t(), v.t(), None, "none", [], "")  # strided operands, as the backward uses
        return torch.allclose(y, F.linear(x, w), rtol=1e-5, atol=1e-5) and torch.allclose(
            yt, x.t() @ v, rtol=1e-5, atol=1e-5
        )
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def _mkl_leaves_avx512_idle() -> bool:
    """An AMD CPU with AVX-512: :func:`lmlab.runtime.mkl_leaves_avx512_idle` (the probe lives there)."""
    return runtime.mkl_leaves_avx512_idle()


def available(policy: str | None = None) -> bool:
    """Whether :func:`linear` routes fp32 CPU products to oneDNN under ``policy``.

    ``policy`` None is the current :func:`lmlab.runtime.onednn_policy` (``auto`` outside any); the op
    is checked against ``F.linear`` once per process, at first use.
    """
    if not runtime.prefers_onednn(policy):
        return False
    if "ok" not in _STATE:
        _STATE["ok"] = _probe()
    return _STATE["ok"]


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``linear(x, weight)`` takes the oneDNN path (fp32 CPU tensors, autocast off)."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and weight.dim() == 2
        and x.shape[-1] == weight.shape[1]
        and x.numel() > 0
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()  # Inductor plans its own CPU kernels
        and available()
    )


def mm_nt(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a bᵀ (+ bias) by oneDNN, without autograd: a (M, K), b (N, K) fp32 on CPU, either possibly a
    strided view, bias (N,) or None → (M, N) contiguous.  Only where :func:`applies`."""
    return _op()(a, b, bias, "none", [], "")


class _Linear(torch.autograd.Function):
    """y = x Wᵀ (+ b) with oneDNN products forward and backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        K = x.shape[-1]
        x2 = x.reshape(-1, K)  # (M, K)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        y = _op()(x2, weight, bias, "none", [], "")  # (M, N)
        ctx.save_for_backward(x2, weight)
        ctx.x_shape = x.shape
        ctx.has_bias = bias is not None
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor):
        x2, weight = ctx.saved_tensors
        N, K = weight.shape
        dy2 = dy.reshape(-1, N)  # (M, N)
        if not dy2.is_contiguous():
            dy2 = dy2.contiguous()
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            # W is small: its transpose, made contiguous, is the faster weight operand.
            dx = mm_nt(dy2, weight.t().contiguous()).view(ctx.x_shape)  # (M, K)
        if ctx.needs_input_grad[1]:
            # ∂W = ∂yᵀ x (N, K); as x ᵀ ∂y it is (K, N).  Both read M-long strided columns, and
            # oneDNN is faster with the smaller of N and K as the output's rows.
            dw = mm_nt(x2.t(), dy2.t()).t().contiguous() if K < N else mm_nt(dy2.t(), x2.t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, dw, db


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: x (..., K), weight (N, K), bias (N,) or None → (..., N).

    Through oneDNN where :func:`applies` (fp32 on CPU, autocast off), else ``F.linear`` itself.
    """
    if applies(x, weight) and (bias is None or bias.dtype == torch.float32):
        return _Linear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class _Routing(TorchFunctionMode):
    """Sends ``F.linear`` (``nn.Linear``) and ``torch.addmm(bias, x, W)`` (GPT-2's ``Conv1D``) to :func:`linear`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            return linear(*args, **kwargs)
        if func is torch.addmm and not kwargs and len(args) == 3:
            bias, x, w = args  # x (M, K) · w (K, N) + bias (N,): a linear layer with weight wᵀ
            if (
                bias.dim() == 1
                and x.dim() == 2
                and w.dim() == 2
                and applies(x, w.t())
                and bias.dtype == x.dtype
            ):
                return _Linear.apply(x, w.t(), bias)
        return func(*args, **kwargs)


def routing(enabled: bool = True) -> contextlib.AbstractContextManager:
    """A context in which a model's own linear layers go through :func:`linear` (fp32 CPU only).

    For models whose forward lmlab does not write itself (GPT-2, BERT, T5 with dropout): their
    ``nn.Linear`` and ``Conv1D`` layers call ``F.linear`` / ``torch.addmm``, which this
    ``TorchFunctionMode`` redirects while the forward runs; the backward passes are
    :func:`linear`'s own.  A no-op (no mode, no per-op cost) when ``enabled`` is false, under
    autocast or ``torch.compile``, or where oneDNN is not :func:`available`.
    """
    if not enabled or torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling() or not available():
        return contextlib.nullcontext()
    return _Routing()
