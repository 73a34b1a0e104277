"""``lmlab quantize MODEL_DIR --method nf4|fp4|int4|int8 --out DIR``: quantize a saved Hugging Face model.

MODEL_DIR is a ``save_pretrained`` directory (T5, BERT, GPT-2, Llama, ...). The model is loaded
with the class its config names (else ``AutoModelForSeq2SeqLM`` / ``AutoModelForMaskedLM`` /
``AutoModelForCausalLM``), quantized with :func:`lmlab.quant.quantize_`, and written with its
config, its ``quantization_config`` (transformers' ``BitsAndBytesConfig`` fields, so NF4 / FP4 /
int8 outputs load with ``AutoModel*.from_pretrained(DIR)`` and bitsandbytes) and every other file and
sub-folder of MODEL_DIR (tokenizer, a sentence-transformers model's ``1_Pooling/``, README) to --out,
atomically; the memory table is printed. The result loads with ``lmlab.quant.load_quantized(DIR)``.

    lmlab quantize gpt2/ --method nf4 --double-quant --compute-dtype bfloat16 --out gpt2-nf4/
    lmlab quantize bert/ --method int8 --skip-modules pooler.dense,cls --out bert-int8/
    lmlab quantize gpt2-nf4/ --from-quantized --method int8 --out gpt2-int8/

``--skip-modules`` names layers to keep in floating point by full name, dotted prefix or dotted
suffix (as transformers' ``llm_int8_skip_modules`` match); a name that matches no linear layer is
refused, not ignored as transformers does: a typo would otherwise quantize the very layer the user
meant to keep. An already quantized MODEL_DIR (lmlab's, or transformers + bitsandbytes') is
refused unless ``--from-quantized`` is given, which dequantizes it first (the error of both
quantizations then adds up).

--out must be new or empty, or an earlier ``lmlab quantize`` output that ``--overwrite`` allows
replacing; it is checked before anything is loaded. A damaged model directory (a missing weight, a
NaN or Inf, a corrupt weights file, an already quantized model without ``--from-quantized``) is
refused in one line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmlab.errors import LmlabError
from lmlab.quant.formats import FORMATS, INT8_METHOD, METHODS

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf", ".onnx")
_SKIP_FILES = {
    "config.json",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
    "manifest.json",
    "lmlab_quant.json",
}
DEFAULT_BLOCK_SIZE = 64
DEFAULT_THRESHOLD = 6.0
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="a Hugging Face save_pretrained directory")
    formats = ", ".join(f"{f.name} ({f.summary})" for f in FORMATS.values())
    parser.add_argument(
        "--method",
        required=True,
        choices=METHODS,
        help=f"quantization format: {formats}, or {INT8_METHOD} (LLM.int8())",
    )
    # Defaults are None so that a flag given with a method it does not apply to can be refused.
    parser.add_argument(
        "--block-size",
        type=int,
        default=None,
        help=f"4-bit formats: block size (default {DEFAULT_BLOCK_SIZE})",
    )
    parser.add_argument(
        "--double-quant",
        action="store_true",
        default=None,
        help="4-bit formats: 8-bit quantize the 4-bit scales too (QLoRA)",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help=f"int8: LLM.int8() outlier threshold, 0 = none (default {DEFAULT_THRESHOLD})",
    )
    parser.add_argument(
        "--compute-dtype",
        choices=COMPUTE_DTYPES,
        default=None,
        help="4-bit formats: dtype the weights are decoded to for the product (default: the input's)",
    )
    parser.add_argument(
        "--skip-modules",
        metavar="A,B,...",
        default=None,
        help="layers kept in floating point: full names, dotted prefixes or suffixes (default lm_head; "
        "the output head always stays in floating point)",
    )
    parser.add_argument(
        "--from-quantized",
        action="store_true",
        help="MODEL_DIR may be quantized (lmlab's or transformers + bitsandbytes'): dequantize it first",
    )
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="output directory: new, empty, or see --overwrite"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace DIR if it is an earlier lmlab quantize output"
    )


def _check_flags(args: argparse.Namespace) -> None:
    """Refuse a flag given with a method it does not apply to (before torch is imported)."""
    if args.method == INT8_METHOD:
        flags = (
            ("--block-size", args.block_size),
            ("--double-quant", args.double_quant),
            ("--compute-dtype", args.compute_dtype),
        )
        given = [flag for flag, value in flags if value is not None]
        if given:
            raise LmlabError(
                f"{' and '.join(given)} apply to the 4-bit formats ({', '.join(FORMATS)}), not int8"
            )
    elif args.threshold is not None:
        raise LmlabError(f"--threshold applies to int8 (LLM.int8()), not {args.method}")
    _skip_modules(args)


def _skip_modules(args: argparse.Namespace) -> tuple[str, ...] | None:
    """--skip-modules as a tuple of names (None when not given); an empty name is refused."""
    if args.skip_modules is None:
        return None
    names = tuple(n.strip() for n in args.skip_modules.split(","))
    if not all(names):
        raise LmlabError(
            f"--skip-modules: an empty name in {args.skip_modules!r} (give A,B,... without gaps)"
        )
    return names


def _make_config(args: argparse.Namespace):
    from lmlab.quant.api import config_for

    _check_flags(args)
    import torch

    cls = config_for(args.method)  # the config's constructor checks every value
    skip = _skip_modules(args)
    common = {} if skip is None else {"skip_modules": skip}
    if args.method == INT8_METHOD:
        return cls(threshold=DEFAULT_THRESHOLD if args.threshold is None else args.threshold, **common)
    block_size = DEFAULT_BLOCK_SIZE if args.block_size is None else args.block_size
    compute = None if args.compute_dtype is None else getattr(torch, args.compute_dtype)
    return cls(block_size=block_size, double_quant=bool(args.double_quant), compute_dtype=compute, **common)


def _check_finite(model, model_dir: Path) -> None:
    """Refuse a model with a NaN or Inf anywhere: quantized or kept in float, it would be carried on."""
    import torch

    for kind, items in (("weight", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
                raise LmlabError(
                    f"{model_dir}: {kind} {name} contains {bad}; refusing to quantize a damaged model"
                )


def run(args: argparse.Namespace) -> int:
    from lmlab.io import DirLock, check_writable

    model_dir = Path(args.model_dir)
    _check_flags(args)
    if not model_dir.is_dir():
        raise LmlabError(
            f"{model_dir}: no such directory (MODEL_DIR must be a saved model directory, with a config.json)"
        )
    if not (model_dir / "config.json").is_file():
        raise LmlabError(f"{model_dir}: not a saved model directory (no config.json)")
    quantized = _quantized_input(model_dir)
    if quantized is None:
        from lmlab.models.presets import check_not_quantized

        check_not_quantized(model_dir)  # a training run, a damaged config.json
    elif not args.from_quantized:
        raise LmlabError(
            f"{model_dir} is already quantized ({quantized}); pass --from-quantized to dequantize it and "
            "quantize again, or start from the float model it came from"
        )
    check_writable(args.out)
    # One writer per --out, from the checks to the swap (a second quantize gets a one-line error).
    with DirLock(args.out, "quantized model directory", beside=True):
        return _quantize_locked(args, model_dir)


def _quantized_input(model_dir: Path) -> str | None:
    """How ``model_dir`` is quantized, in words for a message, or None when it is not."""
    from lmlab.io import read_json_object
    from lmlab.quant.hf import quant_method_of

    if (model_dir / "lmlab_quant.json").is_file():
        method = read_json_object(model_dir / "lmlab_quant.json").get("config")
        method = method.get("method") if isinstance(method, dict) else None
        return f"written by lmlab quantize{f' --method {method}' if isinstance(method, str) else ''}"
    config = read_json_object(model_dir / "config.json")
    qc = config.get("quantization_config")
    return None if qc is None else f"config.json has a quantization_config, {quant_method_of(qc)}"


def _extra_entries(model_dir: Path) -> list[Path]:
    """What MODEL_DIR holds besides what lmlab quantize writes itself: files and sub-folders (the
    tokenizer, a sentence-transformers model's ``1_Pooling/``, README), copied, never moved."""
    return [
        f
        for f in sorted(model_dir.iterdir())
        if not f.name.startswith(".")
        and f.name not in _SKIP_FILES
        and not (f.name.endswith(_WEIGHT_SUFFIXES) and not f.is_dir())
    ]


def _load_and_quantize(model_dir: Path, config, filter_fn=None, *, from_quantized: bool = False, skip=None):
    """Load MODEL_DIR's float model (dequantizing a quantized one when ``from_quantized``) and
    quantize it: ``(model, report)``. A safetensors checkpoint streams in one tensor at a time
    (:func:`lmlab.quant.streaming.quantize_pretrained`: peak memory about the quantized model plus
    one tensor); pickled weights and quantized inputs are loaded whole first.

    ``skip``: the user's --skip-modules, each of which must match a linear layer."""
    from lmlab.quant.api import dequantize_, quantize_, unmatched_skip_modules

    def check_skip(model) -> None:
        unmatched = unmatched_skip_modules(model, skip or ())
        if unmatched:
            raise LmlabError(
                f"--skip-modules: no linear layer of {type(model).__name__} matches {', '.join(unmatched)} "
                "(give full names, dotted prefixes or suffixes, e.g. lm_head, attn.c_attn, encoder.layer.0)"
            )

    if from_quantized and _quantized_input(model_dir) is not None:
        from lmlab.quant.serialization import load_quantized

        model = dequantize_(load_quantized(model_dir))
    elif _has_safetensors(model_dir):
        from lmlab.quant.streaming import quantize_pretrained

        return quantize_pretrained(model_dir, config, filter_fn, inspect=check_skip)
    else:
        from lmlab.models.families import model_class
        from lmlab.models.presets import load_pretrained, read_hf_config

        model = load_pretrained(model_class(read_hf_config(model_dir)), model_dir)
    model.eval()
    _check_finite(model, model_dir)
    check_skip(model)
    return model, quantize_(model, config, filter_fn)


def _has_safetensors(model_dir: Path) -> bool:
    return (model_dir / "model.safetensors").is_file() or (
        model_dir / "model.safetensors.index.json"
    ).is_file()


def _quantize_locked(args: argparse.Namespace, model_dir: Path) -> int:
    from lmlab.io import check_output_dir, remove_stale_temps

    out = check_output_dir(args.out, "quantized", overwrite=args.overwrite, inputs=[model_dir])
    config = _make_config(args)  # imports torch: after the checks that need none
    remove_stale_temps(out.resolve().parent)  # what a killed quantize left beside DIR

    from lmlab.quant.serialization import save_quantized

    from_quantized = bool(args.from_quantized) and _quantized_input(model_dir) is not None
    model, report = _load_and_quantize(
        model_dir, config, from_quantized=from_quantized, skip=_skip_modules(args)
    )
    save_quantized(model, out, config, extra_files=_extra_entries(model_dir), overwrite=args.overwrite)
    print(f"{type(model).__name__} from {model_dir}{' (dequantized first)' if from_quantized else ''}")
    print(report)
    print(f"saved to {out}")
    return 0
