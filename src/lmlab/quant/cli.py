"""``lmlab quantize MODEL_DIR --method nf4|fp4|int4|int8 --out DIR``: quantize a saved Hugging Face model.

MODEL_DIR is a ``save_pretrained`` directory (T5, BERT, GPT-2, Llama, ...). The model is loaded
with the class its config names (else ``AutoModelForSeq2SeqLM`` / ``AutoModelForMaskedLM`` /
``AutoModelForCausalLM``), quantized with :func:`lmlab.quant.quantize_`, and written with its
config and tokenizer files to --out, atomically; the memory table is printed. The result loads
with ``lmlab.quant.load_quantized(DIR)``.

--out must be new or empty, or an earlier ``lmlab quantize`` output that ``--overwrite`` allows
replacing; it is checked before anything is loaded. A damaged model directory (a missing weight, a
NaN or Inf, a corrupt weights file, an already quantized model) is refused in one line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmlab.errors import LmlabError
from lmlab.quant.formats import FORMATS, INT8_METHOD, METHODS

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
_SKIP_FILES = {
    "config.json",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
    "manifest.json",
    "lmlab_quant.json",
}
DEFAULT_BLOCK_SIZE = 64
DEFAULT_THRESHOLD = 6.0


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
        "--out", required=True, metavar="DIR", help="output directory: new, empty, or see --overwrite"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace DIR if it is an earlier lmlab quantize output"
    )


def _check_flags(args: argparse.Namespace) -> None:
    """Refuse a flag given with a method it does not apply to (before torch is imported)."""
    if args.method == INT8_METHOD:
        flags = (("--block-size", args.block_size), ("--double-quant", args.double_quant))
        given = [flag for flag, value in flags if value is not None]
        if given:
            raise LmlabError(
                f"{' and '.join(given)} apply to the 4-bit formats ({', '.join(FORMATS)}), not int8"
            )
    elif args.threshold is not None:
        raise LmlabError(f"--threshold applies to int8 (LLM.int8()), not {args.method}")


def _make_config(args: argparse.Namespace):
    from lmlab.quant.api import config_for

    _check_flags(args)
    cls = config_for(args.method)  # the config's constructor checks every value
    if args.method == INT8_METHOD:
        return cls(threshold=DEFAULT_THRESHOLD if args.threshold is None else args.threshold)
    block_size = DEFAULT_BLOCK_SIZE if args.block_size is None else args.block_size
    return cls(block_size=block_size, double_quant=bool(args.double_quant))


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
    from lmlab.models.presets import check_not_quantized

    check_not_quantized(model_dir)
    check_writable(args.out)
    # One writer per --out, from the checks to the swap (a second quantize gets a one-line error).
    with DirLock(args.out, "quantized model directory", beside=True):
        return _quantize_locked(args, model_dir)


def _quantize_locked(args: argparse.Namespace, model_dir: Path) -> int:
    from lmlab.io import check_output_dir, remove_stale_temps

    out = check_output_dir(args.out, "quantized", overwrite=args.overwrite, inputs=[model_dir])
    config = _make_config(args)  # imports torch: after the checks that need none
    remove_stale_temps(out.resolve().parent)  # what a killed quantize left beside DIR

    from lmlab.models.families import model_class
    from lmlab.models.presets import load_pretrained, read_hf_config
    from lmlab.quant.api import quantize_
    from lmlab.quant.serialization import save_quantized

    hf_config = read_hf_config(model_dir)
    cls = model_class(hf_config)
    model = load_pretrained(cls, model_dir)
    model.eval()
    _check_finite(model, model_dir)
    report = quantize_(model, config)
    extra = [
        f
        for f in sorted(model_dir.iterdir())
        if f.is_file()
        and not f.name.startswith(".")
        and f.name not in _SKIP_FILES
        and not f.name.endswith(_WEIGHT_SUFFIXES)
    ]
    save_quantized(model, out, config, extra_files=extra, overwrite=args.overwrite)
    print(f"{cls.__name__} from {model_dir}")
    print(report)
    print(f"saved to {out}")
    return 0
