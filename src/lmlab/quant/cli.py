"""``lmlab quantize MODEL_DIR --method nf4|fp4|int8 --out DIR``: quantize a saved Hugging Face model.

MODEL_DIR is a ``save_pretrained`` directory (T5, BERT, GPT-2, Llama, ...). The model is loaded
with the class its config names (else ``AutoModelForSeq2SeqLM`` / ``AutoModelForMaskedLM`` /
``AutoModelForCausalLM``), quantized with :func:`lmlab.quant.quantize_`, and written with its
config and tokenizer files to --out, atomically; the memory table is printed. The result loads
with ``lmlab.quant.load_quantized(DIR)``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmlab.errors import LmlabError

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
_SKIP_FILES = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="a Hugging Face save_pretrained directory")
    parser.add_argument("--method", required=True, choices=("nf4", "fp4", "int8"), help="quantization format")
    parser.add_argument("--block-size", type=int, default=64, help="4-bit block size (default 64)")
    parser.add_argument(
        "--double-quant", action="store_true", help="8-bit quantize the 4-bit scales too (QLoRA)"
    )
    parser.add_argument(
        "--threshold", type=float, default=6.0, help="LLM.int8() outlier threshold, 0 = none (default 6.0)"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (replaced atomically)")


def _make_config(args: argparse.Namespace):
    from lmlab.quant.api import FP4Config, Int8Config, NF4Config

    if args.method == "int8":
        if args.double_quant or args.block_size != 64:
            raise LmlabError("--block-size and --double-quant apply to nf4 and fp4, not int8")
        return Int8Config(threshold=args.threshold)
    cls = NF4Config if args.method == "nf4" else FP4Config
    return cls(block_size=args.block_size, double_quant=args.double_quant)


def run(args: argparse.Namespace) -> int:
    model_dir = Path(args.model_dir)
    out = Path(args.out)
    if not (model_dir / "config.json").is_file():
        raise LmlabError(f"{model_dir}: not a saved model directory (no config.json)")
    if out.resolve() == model_dir.resolve():
        raise LmlabError("--out must differ from MODEL_DIR")
    config = _make_config(args)

    import transformers

    from lmlab.models import quiet_hf_progress
    from lmlab.quant.api import quantize_
    from lmlab.quant.serialization import hf_model_class, save_quantized

    try:
        hf_config = transformers.AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise LmlabError(f"{model_dir}: cannot read config.json ({e})") from e
    cls = hf_model_class(hf_config)
    try:
        with quiet_hf_progress():
            model = cls.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise LmlabError(f"{model_dir}: cannot load the model ({e})") from e
    model.eval()
    report = quantize_(model, config)
    extra = [
        f
        for f in sorted(model_dir.iterdir())
        if f.is_file() and f.name not in _SKIP_FILES and not f.name.endswith(_WEIGHT_SUFFIXES)
    ]
    save_quantized(model, out, config, extra_files=extra)
    print(f"{cls.__name__} from {model_dir}")
    print(report)
    print(f"saved to {out}")
    return 0
