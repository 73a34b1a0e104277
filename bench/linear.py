"""fp32 linear layers on CPU, forward + backward: lmlab's oneDNN route beside torch's own (MKL).

    python bench/linear.py               # t5-tiny's and gpt-tiny's layer shapes, 2 threads here
    python bench/linear.py --repeats 50

Each row times one linear layer of a training step, y = x Wᵀ and its two gradients, as
``F.linear`` + autograd (torch's CPU BLAS, MKL in the x86 wheels) and as
:func:`lmlab.models.onednn.linear` (under the policy ``"on"``, so the route is timed on any x86
CPU, not only where lmlab's ``"auto"`` turns it on), and prints each side's GFLOP/s (6·M·K·N
FLOPs per forward + backward), the ratio and the largest difference of the outputs and
gradients relative to their largest entry.  Median of ``--repeats`` calls after three warm-up
calls.  The first line says which CPU and whether lmlab routes there by default.
"""

from __future__ import annotations

import argparse
import functools
import time

import torch
import torch.nn.functional as F

from lmlab import runtime
from lmlab.models import onednn

SHAPES = {
    # name: (M rows, K in, N out)
    "t5-tiny q|k|v, encoder 32x128": (4096, 128, 384),
    "t5-tiny o": (4096, 128, 128),
    "t5-tiny wi_0|wi_1": (4096, 128, 768),
    "t5-tiny wo": (4096, 384, 128),
    "t5-tiny q|k|v, decoder 32x29": (928, 128, 384),
    "gpt-tiny c_fc, 16x256": (4096, 128, 512),
    "gpt-tiny mlp c_proj": (4096, 512, 128),
}


def timed(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def step(linear, x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor) -> list[torch.Tensor]:
    x.grad = w.grad = None
    y = linear(x, w)
    y.backward(dy)
    return [y.detach(), x.grad, w.grad]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    with runtime.onednn_policy("on"):
        run(args)


def run(args: argparse.Namespace) -> None:
    if not onednn.available("on"):  # nothing to compare; `make bench` goes on to the next script
        print(
            "bench/linear.py: oneDNN's fp32 linear is not available here (not x86, or a torch build without it)"
        )
        return
    default = onednn.available("auto")
    print(f"fp32 linear, forward + backward, {cpu_name()}, {torch.get_num_threads()} threads; "
          f"lmlab routes through oneDNN by default here: {'yes' if default else 'no (policy on does)'}")  # fmt: skip
    print(
        f"{'layer (M x K -> N)':<50} {'torch GFLOP/s':>13} {'lmlab GFLOP/s':>13} {'ratio':>6}  max rel. diff"
    )
    for name, (M, K, N) in SHAPES.items():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(M, K, generator=g, requires_grad=True)
        w = (torch.randn(N, K, generator=g) * K**-0.5).requires_grad_()
        dy = torch.randn(M, N, generator=g)
        flops = 6 * M * K * N
        ref_step = functools.partial(step, F.linear, x, w, dy)
        new_step = functools.partial(step, onednn.linear, x, w, dy)
        t_ref, t_new = timed(ref_step, args.repeats), timed(new_step, args.repeats)
        ref, new = ref_step(), new_step()
        diff = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(new, ref, strict=True))
        label = f"{name} ({M} x {K} -> {N})"
        print(
            f"{label:<50} {flops / t_ref / 1e9:>13.0f} {flops / t_new / 1e9:>13.0f} {t_ref / t_new:>5.2f}x  {diff:.1e}"
        )


if __name__ == "__main__":
    main()
