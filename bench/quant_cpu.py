"""NF4 / FP4 quantize and dequantize on CPU: lmlab beside bitsandbytes and torchao, one run.

A 4096 x 4096 float32 weight, block 64, on 2 CPU threads (torch and OpenMP). Each library's
calls are interleaved round-robin, so a noisy neighbour slows all of them alike; the table shows
the median (and the best) seconds per call and lmlab's speed-up. lmlab's output is checked
bit-for-bit against bitsandbytes' in the same run. Goal from issue 4: quantize >= 5x and
dequantize >= 2x faster than bitsandbytes. Peer figures measured earlier on this kind of machine
(FACTS.md): bitsandbytes 0.50 quantize 0.46-0.77 s, dequantize 0.04-0.05 s; torchao 1.8-3.4 s and
0.4-0.7 s.

"dequantize" allocates its output, as a user's call does; "dequantize, out=" writes into a
reused buffer (lmlab only: bitsandbytes' CPU backend has no out= kernel).

Measure on an idle machine: with other processes holding cores, each OpenMP region of a torch op
waits for a preempted worker thread, and lmlab's chunked fast path runs many such regions (a
single C kernel runs one). ``--threads 1`` avoids the stall (bitsandbytes then gets one OpenMP
thread too).

    .venv/bin/python bench/quant_cpu.py [--threads 2] [--repeats 15] [--size 4096] [--types nf4,fp4]
"""

from __future__ import annotations

import argparse
import os
import sys


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--types", default="nf4,fp4")
    p.add_argument("--double-quant", action="store_true", help="also compress the absmax (QLoRA)")
    p.add_argument("--no-torchao", action="store_true", help="skip torchao (slowest by far)")
    return p.parse_args()


ARGS = _parse()
# bitsandbytes' C kernels use OpenMP's default, one thread per available CPU. Only when that
# differs from --threads do we set OMP_NUM_THREADS (before torch is imported): with it set,
# libgomp's waiting policy turns every small parallel region into a millisecond stall as soon as
# another process holds a core (measured: 100x slower chunked ops), so leave it unset if possible.
if ARGS.threads != len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count():
    os.environ["OMP_NUM_THREADS"] = str(ARGS.threads)

import logging  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from lmlab.quant import dequantize_4bit, quantize_4bit  # noqa: E402


def _bitsandbytes():
    try:
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import bitsandbytes.functional as F

        return F
    except ImportError:
        return None


def _torchao_to_nf4():
    logging.disable(logging.WARNING)  # torchao logs about optional CUDA extensions at import
    try:
        for module in ("torchao.dtypes.nf4tensor", "torchao.quantization.quantize_.workflows.nf4.nf4_tensor"):
            try:
                mod = __import__(module, fromlist=["to_nf4"])
                return mod.to_nf4
            except ImportError:
                continue
        return None
    finally:
        logging.disable(logging.NOTSET)


def bench_round_robin(fns: dict[str, callable], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function, calls interleaved; two warm-up rounds first."""
    for _ in range(2):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32 if t.element_size() == 4 else torch.int16)


def bench_type(quant_type: str, w: torch.Tensor, F, to_nf4) -> bool:
    """Print the rows for one codebook; False if lmlab and bitsandbytes disagree."""
    dq = ARGS.double_quant
    q = quantize_4bit(w, quant_type, 64, dq)
    out = torch.empty_like(w)
    quant = {"lmlab": lambda: quantize_4bit(w, quant_type, 64, dq)}
    dequant = {"lmlab": lambda: dequantize_4bit(q)}
    dequant_out = {"lmlab": lambda: dequantize_4bit(q, out=out)}
    same = True
    if F is not None:
        packed, state = F.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=dq)
        same_q = torch.equal(q.packed, packed) and torch.equal(bits(q.absmax), bits(state.absmax))
        same_d = torch.equal(bits(dequantize_4bit(q)), bits(F.dequantize_4bit(packed, state)))
        same = same_q and same_d
        print(f"{quant_type}: bit-identical to bitsandbytes: quantize {same_q}, dequantize {same_d}")
        quant["bitsandbytes"] = lambda: F.quantize_4bit(
            w, blocksize=64, quant_type=quant_type, compress_statistics=dq
        )
        dequant["bitsandbytes"] = lambda: F.dequantize_4bit(packed, state)
    if to_nf4 is not None and quant_type == "nf4":
        nf4 = to_nf4(w, 64, 256)  # torchao always compresses the scales (blocks of 256)
        quant["torchao"] = lambda: to_nf4(w, 64, 256)
        dequant["torchao"] = lambda: nf4.get_original_weight()
    for label, fns in (("quantize", quant), ("dequantize", dequant), ("dequantize, out=", dequant_out)):
        times = bench_round_robin(fns, ARGS.repeats if label != "quantize" else max(3, ARGS.repeats // 3))
        ours = statistics.median(times["lmlab"])
        for name, ts in times.items():
            med, best = statistics.median(ts), min(ts)
            ratio = "" if name == "lmlab" else f"{med / ours:>15.1f}x"
            print(f"{quant_type + ' ' + label:<24}{name:<14}{med:>10.4f}{best:>10.4f}{ratio}")
    return same


def main() -> int:
    torch.set_num_threads(ARGS.threads)
    F = _bitsandbytes()
    to_nf4 = None if ARGS.no_torchao else _torchao_to_nf4()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(ARGS.size, ARGS.size, generator=g)
    dq = ARGS.double_quant
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{ARGS.size} x {ARGS.size} float32, block 64{', double quant' if dq else ''}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
        + (f", bitsandbytes {sys.modules['bitsandbytes'].__version__}" if F else ", bitsandbytes missing")
        + (f", torchao {sys.modules['torchao'].__version__}" if to_nf4 else ", torchao skipped")
        + f"; load average {load:.2f} on {os.cpu_count()} CPUs"
    )
    if load > 0.5 and ARGS.threads > 1:
        print(
            f"note: load average {load:.2f}: other processes hold cores, and then every OpenMP region of "
            "a torch op waits for a preempted worker; lmlab's chunked ops suffer most (up to 100x). "
            "Rerun on an idle machine, or with --threads 1."
        )
    print(f"{'operation':<24}{'library':<14}{'median s':>10}{'best s':>10}{'lmlab speed-up':>16}")
    ok = all(bench_type(quant_type, w, F, to_nf4) for quant_type in ARGS.types.split(","))
    if F is not None and not ok:
        print("MISMATCH against bitsandbytes", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
