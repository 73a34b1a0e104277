"""Offline GPU compile check of every lmlab Triton kernel: registers, spills and tensor-core instructions.

Triton's interpreter (``TRITON_INTERPRET=1``, how the tests run on CPU) executes a kernel's Python body
with numpy; it never lowers it to PTX. A kernel can therefore pass every interpreter test and still fail
to compile on a GPU, or compile to code that spills registers to local memory (slow, and the spill is
invisible without a profiler). This script compiles each kernel of ``lmlab.quant.kernels.triton_4bit``
(QLoRA: Dettmers et al. 2023 §3) and ``lmlab.quant.kernels.triton_int8`` (LLM.int8(): Dettmers et al.
2022 §3) for an NVIDIA target with the ptxas that ships inside the triton wheel, no GPU or driver
needed, and reads the register count and spill stack of each cubin with the bundled ``cuobjdump
-res-usage``. One line per compile: kernel, variant, config, registers, spill bytes, seconds, and the
number of ``mma.sync`` / ``wgmma.mma_async`` instructions in the PTX (0 where a kernel meant for
tensor cores fell back to FMAs).

Full mode compiles every autotune config the kernel's own pruning keeps for each variant (the
constexpr switches and operand dtypes that change the generated code); ``--quick`` compiles the first
config of the first variant of each kernel (a smoke test, run by ``tests/quant/kernels/
test_compile_sm90.py``). Exit status 1 if any compile fails or any config spills, 0 otherwise (also
when triton or its bundled ptxas / cuobjdump is missing: then nothing is checked, and it says so).

Signatures are built from each kernel's own parameter list: a pointer takes its dtype from the
module's table below (a variant may override it), a scalar its type from a sample value through
Triton's own specialisation rule (an int equal to 1, a unit stride, becomes a constexpr; one divisible
by 16 gets the divisibility hint), as the JIT specialises them for aligned shapes. A parameter in
neither table is reported by name, never guessed.

Run:  .venv/bin/python bench/triton_compile_check.py [--quick] [--arch 90|80] [--kernel NAME]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

ARCHS = {90: "H100 / H200 (sm_90)", 80: "A100 (sm_80)"}
MODULES = ("triton_4bit", "triton_int8")

# ------------------------------------------------------------------------------ per-module tables

# Pointer dtypes by parameter name (the common case; variants override), and sample scalar values
# (a 4096 x 4096 weight, a few rows of activations) whose types and alignment Triton derives.
POINTERS = {
    "triton_4bit": {
        "w_ptr": "*bf16",
        "packed_ptr": "*u8",
        "absmax_ptr": "*fp32",
        "mid_ptr": "*fp32",
        "order_ptr": "*i32",
        "x_ptr": "*bf16",
        "codes_ptr": "*u8",
        "lut_ptr": "*i32",
        "code_ptr": "*fp32",
        "out_ptr": "*bf16",
        "bias_ptr": "*bf16",
        "offset_ptr": "*fp32",
        "nested_absmax_ptr": "*fp32",
        "nested_code_ptr": "*fp32",
    },
    "triton_int8": {
        "x_ptr": "*bf16",
        "flags_ptr": "*i32",
        "codes_ptr": "*i8",
        "scale_ptr": "*fp32",
        "w_ptr": "*i8",
        "ws_ptr": "*fp32",
        "out_ptr": "*bf16",
        "a_ptr": "*i8",
        "b_ptr": "*i8",
        "xs_ptr": "*fp32",
        "add_ptr": "*fp32",
    },
}
SCALARS = {
    "triton_4bit": {
        "n": 4096 * 4096,
        "n_blocks": 4096 * 4096 // 64,
        "block_size": 64,
        "NESTED_BS": 256,
        "M": 7,
        "N": 4096,
        "K": 4096,
        "M_BUCKET": 16,
    },
    "triton_int8": {
        "M": 7,
        "N": 4096,
        "K": 4096,
        "M_BUCKET": 1024,
        "stride_xm": 4096,
        "stride_xk": 1,
        "stride_am": 4096,
        "stride_ak": 1,
        "stride_bn": 4096,
        "stride_bk": 1,
        "threshold": 6.0,
        "inv_scale_sq": 1.0 / (127.0 * 127.0),
    },
}


@dataclass(frozen=True)
class Variant:
    """One code-changing choice: pointer dtype overrides, constexprs, and sample scalar overrides."""

    label: str
    pointers: dict = field(default_factory=dict)
    consts: dict = field(default_factory=dict)
    scalars: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Launch:
    """The meta-parameters a launcher passes to a kernel that is not autotuned."""

    consts: dict
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class Spec:
    """A kernel, its variants, its launches (autotuned kernels: the autotuner's configs) and whether its
    launcher lets Triton fuse multiply-adds (``enable_fp_fusion``, Triton's default True)."""

    module: str
    name: str
    variants: tuple[Variant, ...]
    launches: tuple[Launch, ...] = ()
    fp_fusion: bool = True


def _x(dtype: str) -> dict:
    """Activation, bias and output pointers of one floating dtype (``linear`` returns ``x.dtype``)."""
    return {"x_ptr": dtype, "bias_ptr": dtype, "out_ptr": dtype}


_NESTED = {"absmax_ptr": "*u8"}  # double quantization: the scales are 8-bit codes
_4BIT_LINEAR = (  # gemv and tiled: the first is what a QLoRA checkpoint in bf16 runs
    Variant("bf16 nested bias", {**_x("*bf16"), **_NESTED}, {"BS": 64, "NESTED": True, "HAS_BIAS": True}),
    Variant("bf16 plain", _x("*bf16"), {"BS": 64, "NESTED": False, "HAS_BIAS": False}),
    Variant("fp16 nested", {**_x("*fp16"), **_NESTED}, {"BS": 64, "NESTED": True, "HAS_BIAS": False}),
    Variant("fp32 nested", {**_x("*fp32"), **_NESTED}, {"BS": 64, "NESTED": True, "HAS_BIAS": False}),
    Variant("bf16 nested bs256", {**_x("*bf16"), **_NESTED}, {"BS": 256, "NESTED": True, "HAS_BIAS": False}),
)
_TILED_FLAGS = {"*bf16": {"IEEE": False}, "*fp16": {"IEEE": False}, "*fp32": {"IEEE": True}}
_SMALL_ROWS = {"M_BUCKET": 16}  # the tiled path's 16-row tiles; 1024 keeps the big ones
_FLAGS_OFF = {"flags_ptr": "*fp32"}  # without outlier columns the launchers pass the scale as a dummy


def _tiled_variants() -> tuple[Variant, ...]:
    out = []
    for v in _4BIT_LINEAR:
        consts = {**v.consts, **_TILED_FLAGS[v.pointers["x_ptr"]], "UPCAST": False}
        out.append(Variant(v.label, v.pointers, consts, _SMALL_ROWS))
    big = Variant("bf16 nested bias M>16", {**_x("*bf16"), **_NESTED}, {**out[0].consts}, {"M_BUCKET": 1024})
    return (*out, big)


SPECS = (
    Spec(
        "triton_4bit",
        "_quantize_4bit_kernel",
        (
            Variant("bf16 bs64", {"w_ptr": "*bf16"}, {"BS": 64, "ROWS": 32}),
            Variant("bf16 bs4096", {"w_ptr": "*bf16"}, {"BS": 4096, "ROWS": 1}),
            Variant("fp16 bs64", {"w_ptr": "*fp16"}, {"BS": 64, "ROWS": 32}),
            Variant("fp32 bs64", {"w_ptr": "*fp32"}, {"BS": 64, "ROWS": 32}),
        ),
        (Launch({}),),
        fp_fusion=False,
    ),
    Spec(
        "triton_4bit",
        "_quantize_8bit_kernel",
        (Variant("fp32 bs256", {"x_ptr": "*fp32"}, {"BS": 256}, {"n": 65536, "n_blocks": 256}),),
        (Launch({}),),
        fp_fusion=False,
    ),
    Spec(
        "triton_4bit",
        "_dequantize_4bit_kernel",
        (
            Variant("nested bf16", {**_NESTED, "out_ptr": "*bf16"}, {"NESTED": True}),
            Variant("plain bf16", {"out_ptr": "*bf16"}, {"NESTED": False}),
            Variant("nested fp16", {**_NESTED, "out_ptr": "*fp16"}, {"NESTED": True}),
            Variant("nested fp32", {**_NESTED, "out_ptr": "*fp32"}, {"NESTED": True}),
            Variant("plain fp32", {"out_ptr": "*fp32"}, {"NESTED": False}),
        ),
        (Launch({"BLOCK": 1024}),),
        fp_fusion=False,
    ),
    Spec("triton_4bit", "_gemv_4bit_kernel", _4BIT_LINEAR),
    Spec("triton_4bit", "_tiled_4bit_kernel", _tiled_variants()),
    Spec(
        "triton_int8",
        "_column_flags_kernel",
        (Variant("bf16"), Variant("fp16", _x("*fp16")), Variant("fp32", _x("*fp32"))),
        (Launch({"BLOCK_M": 64, "BLOCK_K": 128}), Launch({"BLOCK_M": 16, "BLOCK_K": 128})),
        fp_fusion=False,
    ),
    Spec(
        "triton_int8",
        "_quantize_rows_kernel",
        (
            Variant("bf16 flags", consts={"HAS_FLAGS": True}),
            Variant("bf16", _FLAGS_OFF, {"HAS_FLAGS": False}),
            Variant("fp16 flags", _x("*fp16"), {"HAS_FLAGS": True}),
            Variant("fp32 flags", _x("*fp32"), {"HAS_FLAGS": True}),
        ),
        (Launch({"BLOCK_M": 4, "BLOCK_K": 1024}), Launch({"BLOCK_M": 1, "BLOCK_K": 8192}, num_warps=8)),
        fp_fusion=False,
    ),
    Spec(
        "triton_int8",
        "_prepass_kernel",
        (
            Variant("bf16 flags", consts={"HAS_FLAGS": True}),
            Variant("bf16", _FLAGS_OFF, {"HAS_FLAGS": False}),
            Variant("fp16 flags", _x("*fp16"), {"HAS_FLAGS": True}),
            Variant("fp32 flags", _x("*fp32"), {"HAS_FLAGS": True}),
        ),
        tuple(Launch({"BLOCK_M": m, "BLOCK_K": 8192 // m}, num_warps=8) for m in (1, 2, 4, 8, 16)),
        fp_fusion=False,
    ),
    Spec(
        "triton_int8",
        "_gemv_kernel",
        (
            Variant("bf16 flags", consts={"HAS_FLAGS": True}),
            Variant("bf16", _FLAGS_OFF, {"HAS_FLAGS": False}),
            Variant("fp16 flags", _x("*fp16"), {"HAS_FLAGS": True}),
            Variant("fp32 flags", _x("*fp32"), {"HAS_FLAGS": True}),
            Variant("bf16 flags M=1", consts={"HAS_FLAGS": True}, scalars={"M": 1}),
        ),
        fp_fusion=False,
    ),
    Spec(
        "triton_int8",
        "_int8_gemm_kernel",
        (
            Variant("bf16 dequant", {"add_ptr": "*bf16"}, {"DEQUANT": True, "HAS_ADDEND": False}),
            Variant("bf16 dequant+addend", consts={"DEQUANT": True, "HAS_ADDEND": True}),
            Variant(
                "int32",
                {"out_ptr": "*i32", "xs_ptr": "*i32", "ws_ptr": "*i32", "add_ptr": "*i32"},
                {"DEQUANT": False, "HAS_ADDEND": False},
            ),
            Variant("fp16 dequant+addend", {"out_ptr": "*fp16"}, {"DEQUANT": True, "HAS_ADDEND": True}),
            Variant("fp32 dequant+addend", {"out_ptr": "*fp32"}, {"DEQUANT": True, "HAS_ADDEND": True}),
            Variant(
                "bf16 dequant+addend ragged K",
                consts={"DEQUANT": True, "HAS_ADDEND": True},
                scalars={"K": 4000, "stride_am": 4000, "stride_bn": 4000},
            ),
        ),
        fp_fusion=False,
    ),
)

# ------------------------------------------------------------------------------ compile one


class CheckError(Exception):
    """A kernel's parameters do not match this script's tables: fix the tables, not the kernel."""


@dataclass(frozen=True)
class Job:
    spec: Spec
    variant: Variant
    consts: dict  # the config's or launch's meta-parameters
    num_warps: int
    num_stages: int
    label: str


def _chain(kernel):
    """``(jit_fn, autotuner or None, heuristics)`` through the decorator wrappers."""
    import triton

    tuner, heuristics = None, []
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        if isinstance(kernel, triton.runtime.autotuner.Autotuner):
            tuner = kernel
        elif isinstance(kernel, triton.runtime.autotuner.Heuristics):
            heuristics.append(kernel.values)
        elif not hasattr(kernel, "fn"):
            raise CheckError(f"{kernel!r} is no JIT kernel: was it defined under TRITON_INTERPRET=1?")
        kernel = kernel.fn
    return kernel, tuner, heuristics


def _sample(spec: Spec, variant: Variant) -> dict:
    return {**SCALARS[spec.module], **variant.scalars}


def _signature(jit, spec: Spec, variant: Variant, consts: dict, heuristics: list):
    """``(signature, constexprs, attrs)`` for ``ASTSource``, as the JIT would specialise the launch."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    pointers = {**POINTERS[spec.module], **variant.pointers}
    samples = _sample(spec, variant)
    values = dict(consts)
    for rule in heuristics:  # e.g. EVEN_K from the sample K and the config's BLOCK_K
        for name, fn in rule.items():
            values.setdefault(name, fn({**samples, **values}))
    sig, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(jit.params):
        if p.is_constexpr:
            if p.name not in values and not p.has_default:
                raise CheckError(f"{spec.name}: constexpr {p.name!r} has no value (add it to its variants)")
            sig[p.name] = "constexpr"
            constexprs[p.name] = values.get(p.name, p.default)
        elif p.name in pointers:
            sig[p.name] = pointers[p.name]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif p.name in samples:
            kind, spec_attr = native_specialize_impl(BaseBackend, samples[p.name], False, True, True)
            sig[p.name] = kind
            if kind == "constexpr":  # an int 1 (a unit stride)
                constexprs[p.name] = spec_attr
            elif spec_attr == "D":
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            raise CheckError(
                f"{spec.module}.{spec.name}: parameter {p.name!r} is in neither POINTERS[{spec.module!r}] "
                f"nor SCALARS[{spec.module!r}] of {os.path.basename(__file__)}: add its dtype or a sample"
            )
    return sig, constexprs, attrs


def _usage(cubin: bytes, cuobjdump: str) -> tuple[int, int]:
    """``(registers, stack frame bytes)`` per thread, from ``cuobjdump -res-usage``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    regs = [int(r) for r in re.findall(r"REG:(\d+)", text)]
    stack = [int(s) for s in re.findall(r"STACK:(\d+)", text)]
    if not regs or not stack:
        raise CheckError(f"cuobjdump -res-usage printed no REG / STACK: {text[:200]!r}")
    return max(regs), max(stack)


def _ptxas(arch: int, cuobjdump: str) -> str:
    """The ptxas Triton itself assembles ``sm_<arch>`` with (Triton 3.9 picks ``ptxas-blackwell`` for
    sm_90 and newer, whose PTX the legacy ``ptxas`` rejects); the bundled ``ptxas`` before that."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError:
        return os.path.join(os.path.dirname(cuobjdump), "ptxas")
    return get_ptxas(arch).path


def _spills(ptx: str, ptxas: str) -> int:
    """Spill-store bytes per thread from ``ptxas -v`` on the kernel's PTX. (A stack frame alone is not
    a spill: a kernel can keep a few bytes of stack with 0 bytes spilled.)"""
    target = re.search(r"^\.target\s+(\S+)", ptx, re.M)
    if target is None:
        raise CheckError("the PTX names no .target")
    with tempfile.NamedTemporaryFile(suffix=".ptx", mode="w") as f:
        f.write(ptx)
        f.flush()
        out = subprocess.run(
            [ptxas, f"-arch={target.group(1)}", "-v", f.name, "-o", os.devnull],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    stores = [int(v) for v in re.findall(r"(\d+) bytes spill stores", out)]
    if not stores:
        raise CheckError(f"ptxas -v printed no spill line: {out[:200]!r}")
    return max(stores)


def compile_one(job: Job, arch: int, cuobjdump: str) -> dict:
    """Compile ``job`` for ``sm_<arch>``; the record of one output line."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = importlib.import_module(f"lmlab.quant.kernels.{job.spec.module}")
    jit, _, heuristics = _chain(getattr(module, job.spec.name))
    sig, constexprs, attrs = _signature(jit, job.spec, job.variant, job.consts, heuristics)
    options = {
        "enable_fp_fusion": job.spec.fp_fusion,
        "num_warps": job.num_warps,
        "num_stages": job.num_stages,
    }
    t0 = time.perf_counter()
    k = triton.compile(
        ASTSource(jit, sig, constexprs, attrs), target=GPUTarget("cuda", arch, 32), options=options
    )
    seconds = time.perf_counter() - t0
    regs, stack = _usage(k.asm["cubin"], cuobjdump)
    ptx = k.asm["ptx"]
    return {
        "regs": regs,
        "stack": stack,
        "spill": _spills(ptx, _ptxas(arch, cuobjdump)),
        "seconds": seconds,
        "mma": len(re.findall(r"\bmma\.sync\.", ptx)),
        "wgmma": len(re.findall(r"\bwgmma\.mma_async\.", ptx)),
    }


# ------------------------------------------------------------------------------ the plan


def _config_label(consts: dict, warps: int, stages: int) -> str:
    return " ".join([*(f"{k}={v}" for k, v in consts.items()), f"w{warps}", f"s{stages}"])


def jobs_of(spec: Spec, quick: bool) -> list[Job]:
    """Every (variant, config) pair to compile; ``quick``: the first config of the first variant."""
    module = importlib.import_module(f"lmlab.quant.kernels.{spec.module}")
    jit, tuner, _ = _chain(getattr(module, spec.name))
    jobs = []
    for variant in spec.variants[:1] if quick else spec.variants:
        if tuner is None:
            launches = [(dict(L.consts), L.num_warps, L.num_stages) for L in spec.launches]
        else:
            configs = tuner.configs
            if tuner.early_config_prune:  # the configs the autotuner would try for this variant
                named = {**_sample(spec, variant), **variant.consts}
                configs = tuner.early_config_prune(configs, named, **variant.consts)
            launches = [(dict(c.kwargs), c.num_warps, c.num_stages) for c in configs]
        for consts, warps, stages in launches[:1] if quick else launches:
            label = _config_label(consts, warps, stages)
            jobs.append(Job(spec, variant, {**variant.consts, **consts}, warps, stages, label))
    return jobs


def undeclared_kernels() -> list[str]:
    """Kernels of the modules (``*_kernel`` objects) that this script has no spec for."""
    import triton

    kinds = (
        triton.runtime.jit.JITFunction,
        triton.runtime.autotuner.Autotuner,
        triton.runtime.autotuner.Heuristics,
    )
    declared = {(s.module, s.name) for s in SPECS}
    missing = []
    for mod in MODULES:
        module = importlib.import_module(f"lmlab.quant.kernels.{mod}")
        for name, obj in vars(module).items():
            if name.endswith("_kernel") and isinstance(obj, kinds) and (mod, name) not in declared:
                missing.append(f"{mod}.{name}")
    return missing


# ------------------------------------------------------------------------------ main


HEADER = """\
lmlab Triton compile check for {target}: every kernel lowered to PTX and assembled by the ptxas
bundled with triton {version}, no GPU needed. Why: the interpreter (TRITON_INTERPRET=1, the CPU tests)
runs a kernel's Python body but never compiles it, so a kernel can pass every interpreter test and still
fail to compile, or spill registers (ptxas -v spill stores > 0: slow local-memory traffic; a small stack
frame alone is not a spill), on a GPU. mma / wgmma: tensor
core instructions in the PTX. Exit 1 on any failure or spill. Mode: {mode}."""


def _tools():
    """``(cuobjdump path, None)``, or ``(None, why)`` when triton or its bundled tools are missing."""
    if importlib.util.find_spec("triton") is None:
        return None, "triton is not installed"
    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for tool in ("ptxas", "cuobjdump"):
        if not os.access(os.path.join(bin_dir, tool), os.X_OK):
            return None, f"triton's bundled {tool} is missing ({bin_dir})"
    return os.path.join(bin_dir, "cuobjdump"), None


def _line(job: Job, rec: dict) -> str:
    name = f"{job.spec.module}.{job.spec.name}"
    return (
        f"{name:36s} {job.variant.label:28s} {job.label:44s} regs {rec['regs']:>3d} spill {rec['spill']:>5d} "
        f"stack {rec['stack']:>5d} {rec['seconds']:5.1f}s mma {rec['mma']:>3d} wgmma {rec['wgmma']:>3d}"
    )


def run(quick: bool, arch: int, kernel: str | None) -> int:
    cuobjdump, why = _tools()
    if cuobjdump is None:
        print(f"triton_compile_check: skipped, {why}; nothing was checked")
        return 0
    import triton

    mode = "quick (first config of each kernel)" if quick else "full (every config and variant)"
    print(HEADER.format(target=ARCHS[arch], version=triton.__version__, mode=mode), flush=True)
    problems = [f"{name}: no Spec in {os.path.basename(__file__)}" for name in undeclared_kernels()]
    specs = [s for s in SPECS if kernel is None or kernel in s.name]
    if not specs:
        problems.append(f"no kernel matches --kernel {kernel!r}")
    t0 = time.perf_counter()
    count = 0
    for spec in specs:
        try:
            jobs = jobs_of(spec, quick)
        except Exception as e:  # a broken table or prune function: name it and go on
            problems.append(f"{spec.module}.{spec.name}: {type(e).__name__}: {e}")
            continue
        for job in jobs:
            count += 1
            where = f"{job.spec.module}.{job.spec.name} [{job.variant.label}] {job.label}"
            try:
                rec = compile_one(job, arch, cuobjdump)
            except Exception as e:  # every failure is reported, the others still compile
                first = (str(e).strip().splitlines() or [""])[0][:300]
                print(f"FAILED {where}: {type(e).__name__}: {first}", flush=True)
                problems.append(f"{where}: compile failed ({type(e).__name__}: {first[:160]})")
                continue
            print(_line(job, rec), flush=True)
            if rec["spill"] > 0:
                problems.append(f"{where}: spills {rec['spill']} bytes per thread")
    print(f"{count} compiles in {time.perf_counter() - t0:.1f}s")
    if problems:
        print(f"FAIL: {len(problems)} problem(s):")
        for p in problems:
            print(f"  {p}")
        return 1
    print("OK: every compile succeeded without spills")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the first config of each kernel only")
    parser.add_argument("--arch", type=int, default=90, choices=sorted(ARCHS), help="SM version (default 90)")
    parser.add_argument("--kernel", help="only kernels whose name contains this string")
    args = parser.parse_args(argv)
    # The kernels must be defined for a real target: the interpreter would replace them.
    os.environ.pop("TRITON_INTERPRET", None)
    with tempfile.TemporaryDirectory(prefix="lmlab-compile-check-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # compile for real: no hits from earlier runs
        return run(args.quick, args.arch, args.kernel)


if __name__ == "__main__":
    sys.exit(main())
