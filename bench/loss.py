"""The output projection + cross-entropy, forward and backward: lmlab's fused chunked loss beside the plain path.

    python bench/loss.py                 # CPU: the t5-tiny and gpt-tiny shapes of bench/pretrain.py
    python bench/loss.py --gpu           # GPU shapes: GPT-2 (16x1024 -> 50304) and T5-base (128x114 -> 32128)

Plain path: ``F.linear`` to the full (rows x vocab) logits, upcast to fp32, ``F.cross_entropy``
(sum) and its backward, as a Hugging Face model's head and loss do.  lmlab:
:func:`lmlab.train.loss.linear_cross_entropy`.  Both get the same hidden states, weight and
targets; the printed loss difference shows they compute the same thing.  Median of
``--repeats`` timed calls after two warm-up calls; bf16 rows run under autocast.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import time

import torch

from lmlab.train.loss import linear_cross_entropy, linear_cross_entropy_reference

CPU_SHAPES = {"t5-tiny (32x30 targets)": (960, 128, 8192), "gpt-tiny (16x256)": (4096, 128, 8192)}
GPU_SHAPES = {"t5-base (128x114)": (128 * 114, 768, 32128), "gpt-2 (16x1024)": (16 * 1024, 768, 50304)}


def timed(fn, repeats: int, device: torch.device) -> tuple[float, float]:
    """(median seconds, loss) of fn() + backward."""

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    times, loss = [], None
    for i in range(repeats + 2):
        sync()
        t = time.perf_counter()
        loss = fn()
        loss.backward()
        sync()
        if i >= 2:
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2], float(loss.detach())


def call(loss_fn, h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, prec: str) -> torch.Tensor:
    h.grad = w.grad = None
    on = prec == "bf16"
    with torch.autocast(h.device.type, dtype=torch.bfloat16) if on else contextlib.nullcontext():
        return loss_fn(h, w, None, y)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="GPU shapes on a CUDA device")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device")
    dev = torch.device("cuda" if args.gpu else "cpu")
    shapes = GPU_SHAPES if args.gpu else CPU_SHAPES
    where = torch.cuda.get_device_name(dev) if args.gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"output projection + cross-entropy, forward + backward, {where}")
    print(f"{'shape':<26} {'dtype':>5} {'plain ms':>9} {'lmlab ms':>9} {'ratio':>6}   loss difference")
    for name, (n, d, vocab) in shapes.items():
        g = torch.Generator(device=dev).manual_seed(0)
        h = torch.randn(n, d, device=dev, generator=g).requires_grad_()
        w = (torch.randn(vocab, d, device=dev, generator=g) * d**-0.5).requires_grad_()
        y = torch.randint(0, vocab, (n,), device=dev, generator=g)
        for prec in ("fp32", "bf16"):
            plain = functools.partial(call, linear_cross_entropy_reference, h, w, y, prec)
            fused = functools.partial(call, linear_cross_entropy, h, w, y, prec)
            t_plain, l_plain = timed(plain, args.repeats, dev)
            t_fused, l_fused = timed(fused, args.repeats, dev)
            print(f"{name:<26} {prec:>5} {1e3 * t_plain:>9.2f} {1e3 * t_fused:>9.2f} {t_plain / t_fused:>5.2f}x"
                  f"   {abs(l_fused - l_plain) / abs(l_plain):.1e} relative")  # fmt: skip
            if dev.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
