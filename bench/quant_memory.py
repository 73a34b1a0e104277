"""Peak memory of quantizing a checkpoint to NF4: lmlab's streaming path beside transformers + bitsandbytes.

A Llama-shaped float32 checkpoint is generated on the fly (one safetensors shard per decoder layer,
written shard by shard so that making it never holds more than one layer), then each contender runs
in a fresh Python process that reports its own peak resident memory (``VmHWM`` of
``/proc/self/status``, the same figure as ``getrusage(RUSAGE_SELF).ru_maxrss``) and wall time:

* ``lmlab streaming``  -- :func:`lmlab.quant.streaming.quantize_pretrained` (meta skeleton, one tensor
  at a time);
* ``transformers+bnb`` -- ``AutoModelForCausalLM.from_pretrained(dir, quantization_config=
  BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"), device_map="cpu")``;
* ``lmlab full`` (unless ``--no-full``) -- the non-streaming path: ``from_pretrained`` then
  ``quantize_`` (what ``lmlab quantize`` did before streaming).

``--load-rows`` adds: the streaming quantize followed by ``save_quantized``, then loading that NF4
directory with ``load_quantized`` (which builds a randomly initialised float model first) and with
:func:`lmlab.quant.streaming.load_quantized_streaming` (a meta skeleton, tensors assigned).

Each process also reports its RSS after importing torch and transformers (the fixed cost every row
pays) and a SHA-256 of every quantized layer's packed codes, so the table says whether lmlab's and
bitsandbytes' NF4 codes agree. No cgroup is used (this machine's memory cgroup belongs to the
sandbox, not to the benchmark); ``--limit-gb`` additionally runs the streaming row under
``RLIMIT_AS`` (address space, which counts torch's reservations and the mapped shard as well, so it
is a stricter limit than resident memory) to show it completes below the float size.

    .venv/bin/python bench/quant_memory.py [--layers 8] [--hidden 4096] [--intermediate 11008]
        [--vocab 32000] [--dir DIR] [--keep] [--no-bnb] [--no-full] [--load-rows] [--limit-gb 5]

The defaults make a 7.5 GB float32 checkpoint (8 layers of Llama-7B's shape); check ``df`` first.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GB = 1e9


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument(
        "--dir", default=None, help="where to write the checkpoint (default: a temp dir under /tmp)"
    )
    p.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    p.add_argument("--no-bnb", action="store_true", help="skip transformers + bitsandbytes")
    p.add_argument("--no-full", action="store_true", help="skip the non-streaming lmlab row")
    p.add_argument("--limit-gb", type=float, default=None, help="also run lmlab streaming under RLIMIT_AS")
    p.add_argument(
        "--load-rows",
        action="store_true",
        help="also save lmlab's NF4 model and time loading it: load_quantized vs load_quantized_streaming",
    )
    p.add_argument(
        "--child", choices=("lmlab", "bnb", "full", "save", "load", "load-streaming"), help=argparse.SUPPRESS
    )
    return p.parse_args(argv)


# -------------------------------------------------------------------------------- the checkpoint


def generate_checkpoint(
    directory: Path, layers: int, hidden: int, intermediate: int, vocab: int, heads: int
) -> int:
    """Write a random Llama checkpoint (float32, std 0.02) shard by shard; returns its float bytes."""
    import torch
    import transformers
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        tie_word_embeddings=False,
        dtype="float32",
        architectures=["LlamaForCausalLM"],
    )
    config.save_pretrained(directory)
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).mul_(0.02)

    shards: list[dict[str, callable]] = [{"model.embed_tokens.weight": lambda: rand(vocab, hidden)}]
    for i in range(layers):
        p = f"model.layers.{i}."
        shards.append(
            {
                p + "input_layernorm.weight": lambda: torch.ones(hidden),
                p + "post_attention_layernorm.weight": lambda: torch.ones(hidden),
                **{p + f"self_attn.{n}_proj.weight": (lambda: rand(hidden, hidden)) for n in "qkvo"},
                p + "mlp.gate_proj.weight": lambda: rand(intermediate, hidden),
                p + "mlp.up_proj.weight": lambda: rand(intermediate, hidden),
                p + "mlp.down_proj.weight": lambda: rand(hidden, intermediate),
            }
        )
    shards.append(
        {"model.norm.weight": lambda: torch.ones(hidden), "lm_head.weight": lambda: rand(vocab, hidden)}
    )
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {key: make() for key, make in shard.items()}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


# -------------------------------------------------------------------------------- one contender


def _rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _codes_digest(model) -> tuple[str, int]:
    """SHA-256 over every 4-bit layer's packed codes (by module name), and the model's bytes."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, m in sorted(model.named_modules(), key=lambda nm: nm[0]):
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and w.dtype == torch.uint8:
            h.update(name.encode())
            h.update(w.detach().contiguous().numpy().tobytes())
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    for m in model.modules():  # bitsandbytes keeps a 4-bit weight's scales in its quant_state, not a buffer
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        for t in (getattr(qs, "absmax", None), getattr(qs, "code", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return h.hexdigest()[:16], total


def child(kind: str, directory: Path) -> dict:
    """Run one contender in this (fresh) process; its figures as a dict."""
    import logging

    import torch
    import transformers

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from lmlab.quant import NF4Config, quantize_
    from lmlab.quant.streaming import quantize_pretrained

    torch.set_num_threads(torch.get_num_threads())
    if kind == "bnb":
        import bitsandbytes  # noqa: F401  (imported before the baseline, like lmlab's modules)
    base = _rss_now()
    t0 = time.perf_counter()
    if kind in ("lmlab", "save"):
        model, _ = quantize_pretrained(directory, NF4Config())
        if kind == "save":
            from lmlab.quant import save_quantized

            save_quantized(model, directory / "nf4", NF4Config())
    elif kind == "load":
        from lmlab.quant import load_quantized

        model = load_quantized(directory / "nf4")
    elif kind == "load-streaming":
        from lmlab.quant.streaming import load_quantized_streaming

        model = load_quantized_streaming(directory / "nf4")
    elif kind == "full":
        from lmlab.models.families import model_class
        from lmlab.models.presets import load_pretrained, read_hf_config

        model = load_pretrained(model_class(read_hf_config(directory)), directory)
        quantize_(model, NF4Config())
    else:
        q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
        model = transformers.AutoModelForCausalLM.from_pretrained(
            directory, quantization_config=q, device_map="cpu"
        )
    seconds = time.perf_counter() - t0
    digest, nbytes = _codes_digest(model)
    vm_peak = next(
        int(x.split()[1]) * 1024
        for x in Path("/proc/self/status").read_text().splitlines()
        if x.startswith("VmPeak")
    )
    return {
        "seconds": seconds,
        "peak": _peak_rss(),
        "base": base,
        "vm_peak": vm_peak,
        "codes": digest,
        "model_bytes": nbytes,
    }


def _warm(directory: Path) -> None:
    """Read the checkpoint once so that every row starts from the same page cache (the first would
    otherwise pay the disk)."""
    for f in sorted(directory.glob("*.safetensors")) + sorted(directory.glob("nf4/*.safetensors")):
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def run_child(kind: str, directory: Path, limit_gb: float | None = None) -> dict:
    """``child(kind)`` in a fresh interpreter (niced), optionally under ``RLIMIT_AS``."""
    _warm(directory)

    def limits() -> None:
        os.nice(10)
        if limit_gb is not None:
            n = int(limit_gb * GB)
            resource.setrlimit(resource.RLIMIT_AS, (n, n))

    cmd = [sys.executable, __file__, "--child", kind, "--dir", str(directory)]
    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limits, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"exit {proc.returncode}: {tail[:160]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------------------- the table


def rows(results: dict[str, dict], float_bytes: int) -> list[str]:
    """The printed table: one row per contender, peak RSS and time beside the streaming row's."""
    ref = results.get("lmlab streaming", {})
    out = [
        f"{'':30s} {'peak RSS':>9s} {'x lmlab':>8s} {'after imports':>13s} {'VmPeak':>8s} {'seconds':>8s}"
        f" {'x lmlab':>8s} {'model':>8s}  NF4 codes (sha256 of every layer's)",
    ]
    for name, r in results.items():
        if "error" in r:
            out.append(f"{name:30s} failed ({r['error']})")
            continue
        peak_ratio = r["peak"] / ref["peak"] if ref.get("peak") else float("nan")
        time_ratio = r["seconds"] / ref["seconds"] if ref.get("seconds") else float("nan")
        same = "" if not ref.get("codes") else ("= lmlab" if r["codes"] == ref["codes"] else "DIFFER")
        out.append(
            f"{name:30s} {r['peak'] / GB:7.2f}GB {peak_ratio:7.2f}x {r['base'] / GB:11.2f}GB"
            f" {r['vm_peak'] / GB:6.2f}GB {r['seconds']:8.1f} {time_ratio:7.2f}x {r['model_bytes'] / GB:6.2f}GB  {r['codes']} {same}"
        )
    out.append(
        f"float32 checkpoint {float_bytes / GB:.2f} GB; NF4 model (lmlab) {ref.get('model_bytes', 0) / GB:.2f} GB"
    )
    return out


def run(args: argparse.Namespace) -> list[str]:
    """Generate the checkpoint, run every contender, delete the checkpoint; the table's lines."""
    made = args.dir is None
    directory = Path(args.dir or tempfile.mkdtemp(prefix="lmlab-quant-memory-", dir="/tmp"))
    try:
        t0 = time.perf_counter()
        float_bytes = generate_checkpoint(
            directory, args.layers, args.hidden, args.intermediate, args.vocab, args.heads
        )
        header = [
            f"Llama-shaped checkpoint: {args.layers} layers, hidden {args.hidden}, intermediate "
            f"{args.intermediate}, vocab {args.vocab}; {float_bytes / GB:.2f} GB float32 in "
            f"{args.layers + 2} shards (written in {time.perf_counter() - t0:.0f} s); load average "
            f"{os.getloadavg()[0]:.1f}; peak RSS = VmHWM of a fresh process per row"
        ]
        results = {"lmlab streaming": run_child("lmlab", directory)}
        if not args.no_bnb:
            results["transformers+bnb 4-bit"] = run_child("bnb", directory)
        if not args.no_full:
            results["lmlab full (from_pretrained)"] = run_child("full", directory)
        if args.load_rows:
            results["lmlab streaming + save"] = run_child("save", directory)
            results["load_quantized (today)"] = run_child("load", directory)
            results["load_quantized_streaming"] = run_child("load-streaming", directory)
        if args.limit_gb is not None:
            results[f"lmlab streaming, AS<{args.limit_gb:g}GB"] = run_child("lmlab", directory, args.limit_gb)
        return header + rows(results, float_bytes)
    finally:
        if made and not args.keep:
            shutil.rmtree(directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.child:
        print(json.dumps(child(args.child, Path(args.dir))))
        return 0
    for line in run(args):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
