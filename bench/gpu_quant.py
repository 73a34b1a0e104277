"""lmlab's quantized layers on one CUDA GPU beside dense bf16 and bitsandbytes, in one short run (issue 16).

Kernels measured: the Triton 4-bit NormalFloat layer (QLoRA, Dettmers et al. 2023 §3: blockwise NF4 with
double-quantized scales, bitsandbytes' layout) and the LLM.int8() layer (Dettmers et al. 2022 §3: vector-wise
int8 with the mixed-precision decomposition of outlier columns). Budget: under 3 minutes on one H200.

    python bench/gpu_quant.py                    # from the repository root with PYTHONPATH=src, on a GPU
    python bench/gpu_quant.py --quick            # 8192 x 8192 only
    python bench/gpu_quant.py --shapes 8192x8192,14336x4096 --m 1,16 --out DIR
    .venv/bin/python bench/gpu_quant.py --smoke  # CPU only: every code path at tiny shapes, no timings

Shapes are ``N x K`` = out_features x in_features of the weight ``W (N, K)``: 4096x4096, 8192x8192 and
14336x4096 (the issue's "4096 x 14336": in 4096, out 14336, Llama-3-8B's MLP up projection), each at
M = 1, 16 and 4096 rows of bf16 activations ``x (M, K)``. Rows of the linear table, per (shape, M):

  dense bf16            ``F.linear(x, W)``, W in bf16 (cuBLAS: the baseline)
  bnb nf4               bitsandbytes ``Linear4bit(quant_type="nf4", compress_statistics=True)``, compute bf16
  lmlab nf4             ``lmlab.quant.Linear4bit.from_linear(lin, "nf4", 64, double_quant=True,
                        compute_dtype=bf16)`` (the public layer: whatever kernel its op dispatches to)
  lmlab nf4 path=P      ``lmlab.quant.kernels.triton_4bit.linear_4bit(..., path=P)`` called directly with the
                        layer's buffers, P in auto / gemv / tiled / dequant
  bnb int8              bitsandbytes ``Linear8bitLt(has_fp16_weights=False, threshold=6.0)``
  lmlab int8            ``lmlab.quant.Linear8bit.from_linear(lin, threshold=6.0)``
  lmlab int8 triton     ``lmlab.quant.kernels.triton_int8.int8_linear(x, w_q, w_scale, 6.0)`` called directly
  (x "outl")            the int8 rows again on an x whose outlier columns (0.1% of K, evenly spaced) hold
                        |x| >= 8 in every row; in "plain" x no entry reaches 6 (|x| clamped to 5.5)

Columns: ``us`` = median of ``triton.testing.do_bench`` (it zeroes a 256 MB buffer before every call, so no
weight is L2-resident: the 8192^2 NF4 weight, 34.6 MB, would fit in L2; never time a hand loop);
``TB/s`` = (weight + x + out bytes) / time, shown for M <= 16; ``TFLOP/s`` = 2 M N K / time, shown for
M > 16; ``%copy`` = TB/s over the device copy bandwidth, measured once with do_bench as a device-to-device
copy of a 1 GiB buffer (read + written bytes) and printed in the header; ``t/dense`` and ``t/bnb`` = time
ratios (below 1: faster) against dense bf16 and against the bitsandbytes row of the same kind and x;
``err`` = relative Frobenius error of the output against an fp32 reference: for 4-bit rows
``x @ dequantize(W).T`` (a kernel check: bf16 rounding, ~1e-3), for dense and int8 rows ``x @ W.T`` (for
int8 its quantization error, ~1e-2). Weight bytes: dense 2NK; NF4 NK/2 + NK/64 (uint8 double-quantized
scales) + 4 NK/64/256 (fp32 nested scales); int8 NK + 4N (int8 codes and fp32 row scales).

Then: NF4 quantize (bf16 W -> packed codes and scales) and dequantize (-> bf16), lmlab's public
``quantize_4bit`` / ``dequantize_4bit`` beside ``bitsandbytes.functional.quantize_4bit`` /
``dequantize_4bit``, with and without double quantization, each with its bandwidth-limit time (bytes read
+ written / copy bandwidth) and the ratio to it, and whether the codes (and decoded values) are identical
to bitsandbytes'. Then M = 1 under CUDA graphs (``triton.testing.do_bench_cudagraph``: launch overhead
removed) beside the eager figure; a graph replays the same call many times without flushing L2, so the
timed call cycles through enough copies of the layer (3x the L2 size) that none is L2-resident. Then a
``torch.compile(fullgraph=True)`` check of ``Linear4bit`` and ``Linear8bit`` (compiles, same output), and
the issue's goals beside the measured figures, "met" / "not met":

  NF4 linear at M=1, 8192^2 <= 15 us; NF4 M=16 <= 2x its M=1; NF4 M=4096 <= 1.05x dense;
  int8 with outlier columns at M=4096 <= 0.7x dense; int8 at M=1 <= dense;
  NF4 dequantize within 1.3x of the bandwidth limit; NF4 quantize >= 5x faster than bitsandbytes.

Peer figures measured earlier on one H200 (8192^2, bf16; /work/shared/FACTS.md): dense 43.8 us at M=1,
0.689 ms at M=4096; bitsandbytes NF4 59.2 us / 0.836 ms; LLM.int8 354 us / 0.956 ms (1.226 ms with outlier
columns); device copy 4.22 TB/s.

Results also go to ``gpu_quant.csv`` and ``gpu_quant.json`` in ``--out DIR`` (default: ``$OUT`` when set),
rewritten after every section, so a run stopped by a time limit keeps what it measured. A failing row
prints its error in the row and the run goes on. Without bitsandbytes its rows say "n/a" (and if
``$BNB_WHEEL`` names a wheel, the line to install it is printed; nothing is installed). ``--smoke`` runs
every code path on CPU tensors at 64x128, M in {1, 16, 40}, with the Triton kernels under
``TRITON_INTERPRET=1`` (set before lmlab's Triton modules are imported) and ``time.perf_counter`` instead of
do_bench: its figures are NOT timings; it is how this script is tested without a GPU.
"""

from __future__ import annotations

import argparse
import copy
import csv
import importlib
import json
import logging
import math
import os
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

if __name__ == "__main__" and "--smoke" in sys.argv[1:]:
    # triton.jit reads this when lmlab's Triton modules define their kernels: set it before anything
    # could import them (main sets it too, for callers of main()).
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

DEFAULT_SHAPES = "8192x8192,4096x4096,14336x4096"  # the goals' shape first: a run cut short has it
DEFAULT_M = "1,16,4096"
SMOKE_SHAPES = "64x128"
SMOKE_M = "1,16,40"
GOAL_SHAPE = (8192, 8192)
PATHS = ("auto", "gemv", "tiled", "dequant")
BLOCK = 64
NESTED_BLOCK = 256
THRESHOLD = 6.0
OUTLIER_FRACTION = 0.001
BF16 = torch.bfloat16
FIELDS = [
    "section",
    "shape",
    "N",
    "K",
    "M",
    "impl",
    "x",
    "us",
    "graph_us",
    "tbps",
    "tflops",
    "pct_copy",
    "vs_dense",
    "vs_bnb",
    "graph_vs_dense",
    "graph_vs_bnb",
    "limit_us",
    "vs_limit",
    "err",
    "note",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--shapes", default=None, help=f"weights N x K = out x in, comma-separated ({DEFAULT_SHAPES})"
    )
    p.add_argument("--m", default=None, help=f"rows of x, comma-separated ({DEFAULT_M})")
    p.add_argument("--quick", action="store_true", help="only 8192x8192")
    p.add_argument(
        "--out", default=os.environ.get("OUT") or None, help="write gpu_quant.csv/json here ($OUT)"
    )
    p.add_argument("--smoke", action="store_true", help="CPU only: all code paths at tiny shapes, no timings")
    p.add_argument("--warmup", type=int, default=10, help="do_bench warm-up, ms (default 10)")
    p.add_argument("--rep", type=int, default=40, help="do_bench repetition time, ms (default 40)")
    p.add_argument("--graph-rep", type=int, default=20, help="do_bench_cudagraph repetition time, ms")
    p.add_argument("--paths", default=",".join(PATHS), help="triton_4bit.linear_4bit paths to time (all)")
    p.add_argument("--no-graph", action="store_true", help="leave out the CUDA-graph section")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile check")
    return p.parse_args(argv)


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"8192x8192,14336x4096"`` -> ``[(8192, 8192), (14336, 4096)]`` as (N out, K in)."""
    shapes = []
    for part in text.split(","):
        n, k = part.lower().strip().split("x")
        shapes.append((int(n), int(k)))
    return shapes


def short(e: BaseException) -> str:
    """One line for an exception: its type and the first line of its message."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


def shape_name(n: int, k: int) -> str:
    return f"{n}x{k}"


# -------------------------------------------------------------------------------- timing


class Clock:
    """Seconds per call: ``do_bench`` / ``do_bench_cudagraph`` medians, or perf_counter under --smoke."""

    def __init__(self, smoke: bool, warmup_ms: int, rep_ms: int, graph_rep_ms: int) -> None:
        self.smoke = smoke
        self.warmup_ms = warmup_ms
        self.rep_ms = rep_ms
        self.graph_rep_ms = graph_rep_ms

    def eager(self, fn: Callable[[], object]) -> float:
        if self.smoke:
            return _perf_counter_median(fn)
        from triton.testing import do_bench

        return do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median") * 1e-3

    def graph(self, fn: Callable[[], object]) -> float:
        if self.smoke:
            return _perf_counter_median(fn)
        from triton.testing import do_bench_cudagraph

        return do_bench_cudagraph(fn, rep=self.graph_rep_ms, return_mode="median") * 1e-3


def _perf_counter_median(fn: Callable[[], object], repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# -------------------------------------------------------------------------------- context


@dataclass
class Bench:
    args: argparse.Namespace
    device: torch.device
    clock: Clock
    shapes: list[tuple[int, int]]
    ms: list[int]
    paths: list[str]
    bnb: object | None = None  # the bitsandbytes module
    bnb_error: str = ""
    tri4: object | None = None  # lmlab.quant.kernels.triton_4bit
    tri4_error: str = ""
    tri8: object | None = None  # lmlab.quant.kernels.triton_int8
    tri8_error: str = ""
    copy_bw: float = float("nan")  # bytes / s
    l2_bytes: int = 50 << 20
    env: dict = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    layers: dict = field(default_factory=dict)  # (N, K) -> {name: layer or Exception}
    compile_lines: list[str] = field(default_factory=list)
    goals: list[dict] = field(default_factory=list)

    @property
    def smoke(self) -> bool:
        return self.args.smoke


def import_optional(module: str) -> tuple[object | None, str]:
    try:
        return importlib.import_module(module), ""
    except Exception as e:  # ImportError, or a CUDA library mismatch at import
        return None, short(e)


def import_bnb() -> tuple[object | None, str]:
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    bnb, error = import_optional("bitsandbytes")
    if bnb is not None:
        importlib.import_module("bitsandbytes.functional")
    return bnb, error


def environment(ctx: Bench) -> None:
    """Fill and print the header: versions, the device, the L2 size and the copy bandwidth."""
    import triton

    ctx.env = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "bitsandbytes": getattr(ctx.bnb, "__version__", f"n/a ({ctx.bnb_error})"),
        "triton_4bit": "importable" if ctx.tri4 is not None else f"n/a ({ctx.tri4_error})",
        "triton_int8": "importable" if ctx.tri8 is not None else f"n/a ({ctx.tri8_error})",
        "smoke": ctx.smoke,
    }
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        ctx.l2_bytes = int(getattr(props, "L2_cache_size", 0) or ctx.l2_bytes)
        ctx.env["gpu"] = (
            f"{props.name}, {props.total_memory / 2**30:.0f} GiB, L2 {ctx.l2_bytes / 2**20:.0f} MiB"
        )
    else:
        ctx.env["gpu"] = f"none: --smoke on CPU, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}"
    print("== environment")
    for key, value in ctx.env.items():
        print(f"{key:<14}{value}")
    if ctx.bnb is None and os.environ.get("BNB_WHEEL"):
        wheel = os.environ["BNB_WHEEL"]
        print("bitsandbytes is not importable; $BNB_WHEEL names a wheel, install it with:")
        print(f"    {shlex.quote(sys.executable)} -m pip install {shlex.quote(wheel)}")
    ctx.copy_bw, size = copy_bandwidth(ctx)
    ctx.env["copy_tbps"] = ctx.copy_bw / 1e12
    print(
        f"{'device copy':<14}{ctx.copy_bw / 1e12:.3f} TB/s (a {size} device-to-device copy, read + write bytes)"
    )
    if ctx.smoke:
        print("SMOKE RUN: figures below are NOT timings (CPU tensors, Triton interpreter, perf_counter)")


def copy_bandwidth(ctx: Bench) -> tuple[float, str]:
    """Bytes per second of a large device-to-device copy (read + write), and the buffer's size."""
    n = (4 << 20) if ctx.smoke else (1 << 30)
    src = torch.ones(n, dtype=torch.uint8, device=ctx.device)
    dst = torch.empty_like(src)
    t = ctx.clock.eager(lambda: dst.copy_(src))
    return 2 * n / t, f"{n >> 20} MiB"


# -------------------------------------------------------------------------------- layers


def make_weight(n: int, k: int, device: torch.device) -> torch.Tensor:
    """A ``(N, K)`` bf16 weight, std 0.02, the same for a given shape on every run."""
    g = torch.Generator(device=device).manual_seed(1000 * n + k)
    return (torch.randn(n, k, generator=g, device=device) * 0.02).to(BF16)


def make_inputs(m: int, k: int, device: torch.device) -> dict[str, torch.Tensor]:
    """``plain``: ``(M, K)`` bf16 with no |x| >= 6; ``outliers``: the same with 0.1% of the columns at |x| >= 8."""
    g = torch.Generator(device=device).manual_seed(m + 7 * k)
    x = torch.randn(m, k, generator=g, device=device).clamp_(-5.5, 5.5)
    count = max(1, round(k * OUTLIER_FRACTION))
    cols = torch.linspace(0, k - 1, count, device=device).round().long()
    xo = x.clone()
    sign = torch.where(xo[:, cols] >= 0, 1.0, -1.0)
    xo[:, cols] = sign * (8.0 + xo[:, cols].abs())
    return {"plain": x.to(BF16), "outliers": xo.to(BF16)}


def _linear(w: torch.Tensor) -> torch.nn.Linear:
    n, k = w.shape
    lin = torch.nn.Linear(k, n, bias=False, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


def lmlab_nf4(w: torch.Tensor) -> torch.nn.Module:
    from lmlab.quant import Linear4bit

    return Linear4bit.from_linear(
        _linear(w), quant_type="nf4", block_size=BLOCK, double_quant=True, compute_dtype=BF16
    ).eval()


def lmlab_int8(w: torch.Tensor) -> torch.nn.Module:
    from lmlab.quant import Linear8bit

    return Linear8bit.from_linear(_linear(w), threshold=THRESHOLD).eval()


def bnb_nf4(bnb, w: torch.Tensor) -> torch.nn.Module:
    """bitsandbytes' NF4 layer; ``.to(device)`` quantizes its Params4bit (its own way of building one)."""
    n, k = w.shape
    layer = bnb.nn.Linear4bit(
        k, n, bias=False, compute_dtype=BF16, compress_statistics=True, quant_type="nf4", device="cpu"
    )
    layer.weight = bnb.nn.Params4bit(
        w.detach().cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True, blocksize=BLOCK
    )
    return layer.to(w.device).eval()


def bnb_int8(bnb, w: torch.Tensor) -> torch.nn.Module:
    """bitsandbytes' LLM.int8() layer; Int8Params quantizes when moved from the CPU to the device."""
    n, k = w.shape
    layer = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=THRESHOLD, device="cpu")
    layer.load_state_dict({"weight": w.detach().cpu()})
    return layer.to(w.device).eval()


def build_layers(ctx: Bench, w: torch.Tensor) -> dict[str, object]:
    """Every layer of one weight: name -> the layer, or the exception that building it raised (None:
    bitsandbytes is missing)."""
    builders: dict[str, Callable[[], object] | None] = {
        "dense": lambda: w,
        "lmlab nf4": lambda: lmlab_nf4(w),
        "lmlab int8": lambda: lmlab_int8(w),
        "bnb nf4": None if ctx.bnb is None else (lambda: bnb_nf4(ctx.bnb, w)),
        "bnb int8": None if ctx.bnb is None else (lambda: bnb_int8(ctx.bnb, w)),
    }
    layers: dict[str, object] = {}
    for name, build in builders.items():
        try:
            layers[name] = None if build is None else build()
        except Exception as e:
            layers[name] = e
    return layers


# -------------------------------------------------------------------------------- the rows


@dataclass(frozen=True)
class Spec:
    """One row kind: ``make(layer) -> fn(x)`` over the layer named ``layer``."""

    impl: str
    layer: str
    kind: str  # "dense" | "nf4" | "int8": which weight bytes and which reference
    x: str = "plain"
    peer: str | None = None  # the bitsandbytes row this one is compared with
    make: Callable[[object], Callable[[torch.Tensor], torch.Tensor]] = lambda layer: layer


def _dense_fn(w: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: F.linear(x, w)


def _tri4_fn(ctx: Bench, path: str) -> Callable[[object], Callable[[torch.Tensor], torch.Tensor]]:
    def make(layer):
        if ctx.tri4 is None:
            raise RuntimeError(f"n/a: lmlab.quant.kernels.triton_4bit not importable ({ctx.tri4_error})")
        shape = (layer.out_features, layer.in_features)

        def fn(x: torch.Tensor) -> torch.Tensor:
            return ctx.tri4.linear_4bit(
                x,
                layer.weight,
                layer.weight_absmax,
                layer.quant_type,
                layer.block_size,
                shape,
                layer.bias,
                offset=layer.weight_offset,
                nested_absmax=layer.weight_nested_absmax,
                nested_code=layer.weight_nested_quant_map,
                nested_block_size=layer.nested_block_size,
                path=path,
            )

        return fn

    return make


def _tri8_fn(ctx: Bench) -> Callable[[object], Callable[[torch.Tensor], torch.Tensor]]:
    def make(layer):
        if ctx.tri8 is None:
            raise RuntimeError(f"n/a: lmlab.quant.kernels.triton_int8 not importable ({ctx.tri8_error})")
        return lambda x: ctx.tri8.int8_linear(x, layer.weight, layer.SCB, layer.threshold)

    return make


def row_specs(ctx: Bench) -> list[Spec]:
    specs = [
        Spec("dense bf16", "dense", "dense", make=_dense_fn),
        Spec("bnb nf4", "bnb nf4", "nf4"),
        Spec("lmlab nf4", "lmlab nf4", "nf4", peer="bnb nf4"),
    ]
    specs += [
        Spec(f"lmlab nf4 path={p}", "lmlab nf4", "nf4", peer="bnb nf4", make=_tri4_fn(ctx, p))
        for p in ctx.paths
    ]
    for x, tag in (("plain", ""), ("outliers", " +outl")):
        specs += [
            Spec(f"bnb int8{tag}", "bnb int8", "int8", x),
            Spec(f"lmlab int8{tag}", "lmlab int8", "int8", x, peer=f"bnb int8{tag}"),
            Spec(
                f"lmlab int8 triton{tag}", "lmlab int8", "int8", x, peer=f"bnb int8{tag}", make=_tri8_fn(ctx)
            ),
        ]
    return specs


def weight_bytes(kind: str, n: int, k: int) -> int:
    numel = n * k
    if kind == "dense":
        return 2 * numel
    if kind == "nf4":
        blocks = math.ceil(numel / BLOCK)
        return (numel + 1) // 2 + blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 4
    return numel + 4 * n  # int8 codes + fp32 row scales


def new_row(section: str, n: int, k: int, m: int | None, impl: str, x: str = "") -> dict:
    row = dict.fromkeys(FIELDS)
    row.update(section=section, shape=shape_name(n, k), N=n, K=k, M=m, impl=impl, x=x, note="")
    return row


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).norm() / ref.norm().clamp_min(1e-30))


class References:
    """fp32 references of one (shape, M), computed on first use: ``x @ W.T`` and ``x @ dequantize(W).T``."""

    def __init__(self, w: torch.Tensor, nf4: object, xs: dict[str, torch.Tensor]) -> None:
        self.w, self.nf4, self.xs = w, nf4, xs
        self.cache: dict[tuple[str, str], torch.Tensor] = {}

    def get(self, kind: str, x: str) -> torch.Tensor:
        key = ("nf4" if kind == "nf4" else "dense", x)
        if key not in self.cache:
            if key[0] == "nf4":
                if isinstance(self.nf4, Exception):
                    raise RuntimeError(f"no NF4 reference: lmlab nf4 not built ({short(self.nf4)})")
                weight = self.nf4.dequantized_weight(torch.float32)
            else:
                weight = self.w.float()
            self.cache[key] = F.linear(self.xs[x].float(), weight)
        return self.cache[key]


def measure_row(ctx: Bench, spec: Spec, layers: dict, xs: dict, refs: References, n: int, k: int) -> dict:
    m = xs["plain"].shape[0]
    row = new_row("linear", n, k, m, spec.impl, spec.x)
    layer = layers.get(spec.layer)
    if layer is None:
        row["note"] = "n/a: bitsandbytes not importable (see the header)"
        return row
    if isinstance(layer, Exception):
        row["note"] = f"n/a: {spec.layer} not built: {short(layer)}"
        return row
    try:
        fn = spec.make(layer)
        x = xs[spec.x]
        with torch.no_grad():
            y = fn(x)
            row["err"] = rel_err(y, refs.get(spec.kind, spec.x))
            t = ctx.clock.eager(lambda: fn(x))
    except Exception as e:
        row["note"] = str(e) if str(e).startswith("n/a") else f"error: {short(e)}"
        return row
    moved = weight_bytes(spec.kind, n, k) + 2 * m * k + 2 * m * n
    row.update(
        us=t * 1e6,
        tbps=moved / t / 1e12,
        tflops=2 * m * n * k / t / 1e12,
        pct_copy=100 * moved / t / ctx.copy_bw,
    )
    return row


def add_ratios(group: list[dict], key: str = "us") -> None:
    """t/dense and t/bnb of each row of one (shape, M), from the column ``key``."""
    by_impl = {row["impl"]: row for row in group}
    dense = by_impl.get("dense bf16", {}).get(key)
    prefix = "" if key == "us" else "graph_"
    for row in group:
        t = row.get(key)
        if t is None:
            continue
        peer = by_impl.get(row.get("_peer"), {}).get(key)
        row[prefix + "vs_dense"] = t / dense if dense else None
        row[prefix + "vs_bnb"] = t / peer if peer else None


def fmt(value: float | None, spec: str, width: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"{'-':>{width}}"
    return f"{value:>{width}{spec}}"


LINEAR_HEAD = f"{'impl':<25}{'x':<6}{'us':>10}{'TB/s':>7}{'TFLOP/s':>9}{'%copy':>7}{'t/dense':>9}{'t/bnb':>8}{'err':>9}  note"


def print_linear_row(row: dict) -> None:
    small = row["M"] <= 16
    line = f"{row['impl']:<25}{'outl' if row['x'] == 'outliers' else row['x']:<6}"
    line += fmt(row["us"], ".1f", 10)
    line += fmt(row["tbps"] if small else None, ".2f", 7)
    line += fmt(None if small else row["tflops"], ".1f", 9)
    line += fmt(row["pct_copy"] if small else None, ".0f", 7)
    line += fmt(row["vs_dense"], ".2f", 9) + fmt(row["vs_bnb"], ".2f", 8) + fmt(row["err"], ".1e", 9)
    print(f"{line}  {row['note']}".rstrip())


def bench_linear(ctx: Bench) -> None:
    print("\n== linear forward, bf16 x (M, K) @ W (N, K).T; N x K = out x in; us = do_bench median")
    print(
        "   ratios are time ratios (below 1 = faster); err: vs fp32 x @ dequantize(W).T (4-bit), x @ W.T (others)"
    )
    specs = row_specs(ctx)
    for n, k in ctx.shapes:
        w = make_weight(n, k, ctx.device)
        layers = build_layers(ctx, w)
        ctx.layers[(n, k)] = layers
        for name, layer in layers.items():
            if isinstance(layer, Exception):
                print(f"   {name} {shape_name(n, k)}: not built: {short(layer)}")
        for m in ctx.ms:
            xs = make_inputs(m, k, ctx.device)
            refs = References(w, layers["lmlab nf4"], xs)
            print(
                f"\n-- N={n} (out) x K={k} (in), M={m}:  weight MB: dense {weight_bytes('dense', n, k) / 1e6:.1f}, "
                f"nf4 {weight_bytes('nf4', n, k) / 1e6:.1f}, int8 {weight_bytes('int8', n, k) / 1e6:.1f}"
            )
            print(LINEAR_HEAD)
            group = []
            for spec in specs:
                row = measure_row(ctx, spec, layers, xs, refs, n, k)
                row["_peer"] = spec.peer
                group.append(row)
            add_ratios(group)
            for row in group:
                print_linear_row(row)
            ctx.rows += group
            write_results(ctx)  # a run stopped by a time limit keeps every finished group
            del refs, xs


# -------------------------------------------------------------------------------- quantize / dequantize


def quant_bytes(numel: int, double_quant: bool) -> tuple[int, int]:
    """Bytes (quantize, dequantize) move: bf16 weight, packed codes, the scales."""
    blocks = math.ceil(numel / BLOCK)
    scales = blocks + 4 * math.ceil(blocks / NESTED_BLOCK) if double_quant else 4 * blocks
    codes = (numel + 1) // 2
    return 2 * numel + codes + scales, codes + scales + 2 * numel


def _quant_cases(ctx: Bench, w: torch.Tensor, dq: bool) -> tuple[dict, str]:
    """name -> fn() for lmlab and bitsandbytes quantize / dequantize, and a note on bit-identity."""
    from lmlab.quant import dequantize_4bit, quantize_4bit

    q = quantize_4bit(w, "nf4", BLOCK, double_quant=dq)
    cases = {
        "lmlab quantize": lambda: quantize_4bit(w, "nf4", BLOCK, double_quant=dq),
        "lmlab dequantize": lambda: dequantize_4bit(q, BF16),
    }
    if ctx.bnb is None:
        return cases, ""
    bf = ctx.bnb.functional
    packed, state = bf.quantize_4bit(w, blocksize=BLOCK, quant_type="nf4", compress_statistics=dq)
    cases["bnb quantize"] = lambda: bf.quantize_4bit(
        w, blocksize=BLOCK, quant_type="nf4", compress_statistics=dq
    )
    cases["bnb dequantize"] = lambda: bf.dequantize_4bit(packed, state)
    same_codes = torch.equal(q.packed.reshape(-1), packed.reshape(-1))
    ours, theirs = dequantize_4bit(q, BF16), bf.dequantize_4bit(packed, state)
    same_values = torch.equal(ours.view(torch.int16), theirs.reshape(ours.shape).view(torch.int16))
    return cases, f"codes identical to bnb: {same_codes}, dequantized identical: {same_values}"


def bench_quant(ctx: Bench) -> None:
    print(
        "\n== NF4 quantize (bf16 W -> codes + scales) and dequantize (-> bf16), block 64; "
        "limit = bytes moved / copy bandwidth"
    )
    print(f"{'shape':<12}{'dq':<4}{'impl':<18}{'us':>10}{'limit us':>10}{'t/limit':>9}{'t/bnb':>7}  note")
    for n, k in ctx.shapes:
        w = make_weight(n, k, ctx.device)
        for dq in (True, False):
            try:
                cases, note = _quant_cases(ctx, w, dq)
            except Exception as e:
                cases, note = {}, f"error: {short(e)}"
                print(f"{shape_name(n, k):<12}{'y' if dq else 'n':<4}{'setup':<18}  {note}")
            rows = {}
            for name, fn in cases.items():
                section = name.split()[-1]
                row = new_row(section, n, k, None, name, "dq" if dq else "")
                limit = quant_bytes(n * k, dq)[0 if section == "quantize" else 1] / ctx.copy_bw
                row["limit_us"] = limit * 1e6
                try:
                    with torch.no_grad():
                        t = ctx.clock.eager(fn)
                    row.update(us=t * 1e6, vs_limit=t / limit)
                except Exception as e:
                    row["note"] = f"error: {short(e)}"
                rows[name] = row
            for name, row in rows.items():
                peer = rows.get(name.replace("lmlab", "bnb")) if name.startswith("lmlab") else None
                if peer and peer["us"] and row["us"]:
                    row["vs_bnb"] = row["us"] / peer["us"]
                if name == "lmlab dequantize" and not row["note"]:
                    row["note"] = note
                line = f"{shape_name(n, k):<12}{'y' if dq else 'n':<4}{name:<18}{fmt(row['us'], '.1f', 10)}"
                line += (
                    fmt(row["limit_us"], ".1f", 10)
                    + fmt(row["vs_limit"], ".2f", 9)
                    + fmt(row["vs_bnb"], ".3f", 7)
                )
                print(f"{line}  {row['note']}".rstrip())
            ctx.rows += rows.values()
        if ctx.bnb is None:
            print(f"{shape_name(n, k):<12}    bnb rows n/a: bitsandbytes not importable ({ctx.bnb_error})")


# -------------------------------------------------------------------------------- CUDA graphs, M = 1


def rotating_call(make: Callable, layer: object, x: torch.Tensor, copies: int) -> Callable[[], torch.Tensor]:
    """``fn(x)`` over ``copies`` copies of ``layer`` in turn: a CUDA graph of many calls then reads each
    weight from memory, not from L2."""
    fns = [make(layer)] + [make(copy.deepcopy(layer)) for _ in range(copies - 1)]
    turn = [0]

    def call() -> torch.Tensor:
        i = turn[0]
        turn[0] = (i + 1) % len(fns)
        return fns[i](x)

    return call


def cuda_healthy(ctx: Bench) -> bool:
    if ctx.device.type != "cuda":
        return True
    try:
        torch.ones(1, device=ctx.device).add_(1).item()
        torch.cuda.synchronize()
        return True
    except Exception:
        return False


def bench_graph(ctx: Bench) -> None:
    if 1 not in ctx.ms or ctx.args.no_graph:
        print("\n== CUDA graphs: skipped (needs M=1 in --m; --no-graph)")
        return
    print(
        "\n== M=1 eager (do_bench) and under a CUDA graph (do_bench_cudagraph, calls cycling through copies "
        "of the layer)"
    )
    print(
        f"{'shape':<12}{'impl':<25}{'x':<6}{'eager us':>10}{'graph us':>10}{'g/eager':>9}{'g/dense':>9}{'g/bnb':>7}  note"
    )
    # bitsandbytes' int8 layer syncs (its outlier columns): a capture of it fails, so it goes last
    specs = sorted(row_specs(ctx), key=lambda spec: spec.layer == "bnb int8")
    broken = False
    for (n, k), layers in ctx.layers.items():
        xs = make_inputs(1, k, ctx.device)
        group = [
            r for r in ctx.rows if r["section"] == "linear" and r["shape"] == shape_name(n, k) and r["M"] == 1
        ]
        by_impl = {r["impl"]: r for r in group}
        for spec in specs:
            row = by_impl.get(spec.impl)
            if row is None or row["us"] is None:
                continue  # not measured eagerly: its note says why
            if broken:
                row["graph_note"] = "skipped: CUDA failed after an earlier capture"
                continue
            weight = weight_bytes(spec.kind, n, k)
            copies = 2 if ctx.smoke else min(64, max(2, math.ceil(3 * ctx.l2_bytes / weight)))
            try:
                with torch.no_grad():
                    fn = rotating_call(spec.make, layers[spec.layer], xs[spec.x], copies)
                    row["graph_us"] = ctx.clock.graph(fn) * 1e6
                del fn
            except Exception as e:
                row["graph_note"] = f"graph error: {short(e)}"
                broken = not cuda_healthy(ctx)
        add_ratios(group, key="graph_us")
        for row in group:
            if row["us"] is None:
                continue
            line = (
                f"{shape_name(n, k):<12}{row['impl']:<25}{'outl' if row['x'] == 'outliers' else row['x']:<6}"
            )
            line += fmt(row["us"], ".1f", 10) + fmt(row.get("graph_us"), ".1f", 10)
            line += fmt(row["graph_us"] / row["us"] if row.get("graph_us") else None, ".2f", 9)
            line += fmt(row.get("graph_vs_dense"), ".2f", 9) + fmt(row.get("graph_vs_bnb"), ".2f", 7)
            print(f"{line}  {row.get('graph_note', '')}".rstrip())


# -------------------------------------------------------------------------------- torch.compile


def compile_check(ctx: Bench) -> None:
    if ctx.args.no_compile:
        return
    n, k = (64, 128) if ctx.smoke else (4096, 4096)
    m = 16
    backend = "aot_eager" if ctx.smoke else "inductor"
    print(
        f"\n== torch.compile(fullgraph=True, backend={backend!r}) of lmlab's layers, {m} x {k} -> {n}, bf16"
    )
    w = make_weight(n, k, ctx.device)
    xs = make_inputs(m, k, ctx.device)
    for name, build, x in (
        ("Linear4bit nf4 double-quant", lmlab_nf4, xs["plain"]),
        ("Linear8bit threshold 6, outlier columns", lmlab_int8, xs["outliers"]),
        ("Linear8bit threshold 6, no outliers", lmlab_int8, xs["plain"]),
    ):
        try:
            layer = build(w)
            torch._dynamo.reset()
            compiled = torch.compile(layer, fullgraph=True, backend=backend)
            with torch.no_grad():
                eager, traced = layer(x), compiled(x)
            diff = float((traced.float() - eager.float()).abs().max())
            rel = diff / max(float(eager.float().abs().max()), 1e-30)
            verdict = "ok" if rel <= 1e-2 and traced.shape == eager.shape else "DIFFERENT OUTPUT"
            line = (
                f"compile {name}: compiles, bit-identical {torch.equal(traced, eager)}, max |diff| {diff:.3g} "
                f"({rel:.2g} of max |y|) -> {verdict}"
            )
        except Exception as e:
            line = f"compile {name}: FAILED: {short(e)}"
        print(line)
        ctx.compile_lines.append(line)


# -------------------------------------------------------------------------------- goals


def find(ctx: Bench, section: str, shape: str, impl: str, m: int | None = None, x: str | None = None):
    for row in ctx.rows:
        same = row["section"] == section and row["shape"] == shape and row["impl"] == impl
        if same and (m is None or row["M"] == m) and (x is None or row["x"] == x):
            return row
    return None


def _time(ctx: Bench, shape: str, impl: str, m: int, x: str = "plain") -> float | None:
    row = find(ctx, "linear", shape, impl, m, x)
    return None if row is None else row["us"]


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def goal_values(ctx: Bench, shape: str, big: int) -> list[tuple[str, float | None, str, float, str]]:
    """(goal, measured value, "<=" or ">=", target, unit) for the issue's goals."""
    t = lambda impl, m, x="plain": _time(ctx, shape, impl, m, x)  # noqa: E731
    dq = find(ctx, "dequantize", shape, "lmlab dequantize", x="dq")
    lq, bq = (
        find(ctx, "quantize", shape, "lmlab quantize", x="dq"),
        find(ctx, "quantize", shape, "bnb quantize", x="dq"),
    )
    return [
        (f"NF4 linear M=1, {shape} <= 15 us", t("lmlab nf4", 1), "<=", 15.0, " us"),
        ("NF4 linear M=16 <= 2x its M=1", _ratio(t("lmlab nf4", 16), t("lmlab nf4", 1)), "<=", 2.0, "x"),
        (
            f"NF4 linear M={big} <= 1.05x dense",
            _ratio(t("lmlab nf4", big), t("dense bf16", big)),
            "<=",
            1.05,
            "x",
        ),
        (
            f"int8 linear with outlier columns M={big} <= 0.7x dense",
            _ratio(t("lmlab int8 +outl", big, "outliers"), t("dense bf16", big)),
            "<=",
            0.7,
            "x",
        ),
        ("int8 linear M=1 <= dense", _ratio(t("lmlab int8", 1), t("dense bf16", 1)), "<=", 1.0, "x"),
        ("NF4 dequantize (double quant) <= 1.3x bandwidth limit", dq and dq["vs_limit"], "<=", 1.3, "x"),
        (
            "NF4 quantize (double quant) >= 5x faster than bitsandbytes",
            _ratio(bq and bq["us"], lq and lq["us"]),
            ">=",
            5.0,
            "x",
        ),
    ]


def goal_shape(ctx: Bench) -> str:
    return shape_name(*(ctx.shapes[0] if ctx.smoke else GOAL_SHAPE))


def compute_goals(ctx: Bench) -> list[dict]:
    """The issue's goals with what was measured so far: goal, measured, status (met / not met / n/a)."""
    shape = goal_shape(ctx)
    big = max(ctx.ms) if ctx.smoke else 4096
    eager1 = find(ctx, "linear", shape, "lmlab nf4", 1)
    goals = []
    for goal, value, op, target, unit in goal_values(ctx, shape, big):
        if value is None:
            status, measured = "n/a", "not measured"
        else:
            ok = value <= target if op == "<=" else value >= target
            status, measured = ("met" if ok else "not met"), f"{value:.3g}{unit}"
        if goal.startswith("NF4 linear M=1,") and eager1 and eager1.get("graph_us"):
            measured += f" (under a CUDA graph {eager1['graph_us']:.1f} us)"
        goals.append({"goal": goal, "measured": measured, "status": status})
    return goals


def evaluate_goals(ctx: Bench) -> None:
    note = " (smoke: NOT timings, only the code path)" if ctx.smoke else " (eager do_bench medians)"
    print(f"\n== issue 16 goals at {goal_shape(ctx)}{note}")
    if not ctx.smoke and GOAL_SHAPE not in ctx.shapes:
        print(f"goal n/a: {goal_shape(ctx)} was not measured (--shapes)")
    ctx.goals = compute_goals(ctx)
    for goal in ctx.goals:
        print(f"goal {goal['status']:<8} {goal['goal']}: {goal['measured']}")


# -------------------------------------------------------------------------------- output


def write_results(ctx: Bench) -> None:
    if not ctx.args.out:
        return
    try:
        os.makedirs(ctx.args.out, exist_ok=True)
        with open(os.path.join(ctx.args.out, "gpu_quant.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
            writer.writeheader()
            for row in ctx.rows:
                note = " ".join(filter(None, [row.get("note"), row.get("graph_note")]))
                writer.writerow({**row, "note": note})
        public = [{k: v for k, v in row.items() if not k.startswith("_")} for row in ctx.rows]
        # the goals as far as measured, so that a run stopped by a time limit still has them
        result = {"env": ctx.env, "rows": public, "compile": ctx.compile_lines, "goals": compute_goals(ctx)}
        with open(os.path.join(ctx.args.out, "gpu_quant.json"), "w") as f:
            json.dump(result, f, indent=1, default=str)
    except OSError as e:
        print(f"could not write results to {ctx.args.out}: {short(e)}")


def make_context(args: argparse.Namespace) -> Bench:
    if args.smoke:
        shapes, ms, device = parse_shapes(args.shapes or SMOKE_SHAPES), args.m or SMOKE_M, torch.device("cpu")
    else:
        shapes = [GOAL_SHAPE] if args.quick else parse_shapes(args.shapes or DEFAULT_SHAPES)
        ms, device = args.m or DEFAULT_M, torch.device("cuda")
    ctx = Bench(
        args=args,
        device=device,
        clock=Clock(args.smoke, args.warmup, args.rep, args.graph_rep),
        shapes=shapes,
        ms=[int(m) for m in ms.split(",")],
        paths=[p for p in args.paths.split(",") if p],
    )
    ctx.bnb, ctx.bnb_error = import_bnb()
    ctx.tri4, ctx.tri4_error = import_optional("lmlab.quant.kernels.triton_4bit")
    ctx.tri8, ctx.tri8_error = import_optional("lmlab.quant.kernels.triton_int8")
    return ctx


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        print(
            "bench/gpu_quant.py needs a CUDA device and none is visible: nothing measured "
            "(--smoke checks the code paths on CPU)"
        )
        return 0
    start = time.perf_counter()
    sys.stdout.reconfigure(line_buffering=True)  # piped through tee under a timeout: keep every line
    warnings.filterwarnings("ignore", message=".*inputs will be cast from.*")  # bitsandbytes, every int8 call
    ctx = make_context(args)
    environment(ctx)
    for section in (bench_linear, bench_quant, bench_graph, compile_check, evaluate_goals):
        try:
            section(ctx)
        except Exception as e:  # one broken section must not lose the others
            print(f"\n{section.__name__} FAILED: {short(e)}")
        write_results(ctx)
    where = f"; results in {args.out}/gpu_quant.csv and .json" if args.out else ""
    print(
        f"\ndone in {time.perf_counter() - start:.0f} s{' (smoke run: no timings)' if args.smoke else ''}{where}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
