"""The ``quantization_config`` of ``config.json``: lmlab's configs <-> transformers' ``BitsAndBytesConfig``.

transformers + bitsandbytes record how a model was quantized in ``config.json`` under
``quantization_config`` (``BitsAndBytesConfig.to_dict()``, transformers
``utils/quantization_config.py``) and rebuild ``bnb.nn.Linear4bit`` / ``Linear8bitLt`` layers from it
on ``from_pretrained`` (``quantizers/quantizer_bnb_4bit.py``, ``integrations/bitsandbytes.py``).
lmlab's 4-bit state dicts are bitsandbytes' byte for byte and its int8 ones use the same
``weight`` / ``SCB`` keys, so writing the same dict makes ``AutoModel*.from_pretrained(out)`` load an
lmlab output as its own; reading it lets :func:`lmlab.quant.load_quantized` load what transformers
wrote.

    from lmlab.quant.hf import bnb_kwargs
    BitsAndBytesConfig(**bnb_kwargs(NF4Config(double_quant=True)))   # the same settings in transformers

What bitsandbytes cannot hold (lmlab's ``int4``, block sizes other than its 64) is written as
``{"quant_method": "lmlab", ...}``: transformers does not know that method, warns "Unknown
quantization type, got lmlab", builds float layers and then refuses the packed 4-bit tensors with a
size mismatch, so a plain transformers load fails instead of loading garbage; ``lmlab_quant.json``
stays the source of truth for lmlab. This module imports neither torch nor transformers at import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmlab.errors import LmlabError
from lmlab.quant.formats import FLOAT_DTYPE_NAMES, FORMATS, INT8_METHOD

if TYPE_CHECKING:
    from lmlab.quant.api import Config

BNB_METHOD = "bitsandbytes"  # transformers' QuantizationMethod.BITS_AND_BYTES
LMLAB_METHOD = "lmlab"  # unknown to transformers: its load refuses the 4-bit tensors
BNB_BLOCK_SIZE = 64  # bnb.nn.Linear4bit's block size; transformers' BitsAndBytesConfig has no field for it
BNB_QUANT_STORAGE = "uint8"  # the one storage lmlab reads as is (bitsandbytes' default)
DEFAULT_THRESHOLD = 6.0  # BitsAndBytesConfig's llm_int8_threshold default


def _dtype_name(dtype: object) -> str:
    return str(dtype).removeprefix("torch.")


def bnb_kwargs(config: Config, weight_dtype: object = "float32") -> dict[str, Any] | None:
    """The ``transformers.BitsAndBytesConfig`` keyword arguments of ``config``, or None when
    bitsandbytes has no equivalent (``int4``, a block size other than 64).

    ``weight_dtype`` (a torch dtype or its name) stands in for a 4-bit ``compute_dtype`` of None
    (lmlab: "the input's dtype", which is the weights' dtype in a model of one dtype)."""
    method = config.method
    skip = list(config.skip_modules)
    if method == INT8_METHOD:
        return {
            "load_in_8bit": True,
            "llm_int8_threshold": float(config.threshold),
            "llm_int8_skip_modules": skip,
        }
    fmt = FORMATS.get(method)
    if fmt is None or not fmt.bitsandbytes or config.block_size != BNB_BLOCK_SIZE:
        return None
    compute = config.compute_dtype if config.compute_dtype is not None else weight_dtype
    return {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": method,
        "bnb_4bit_use_double_quant": bool(config.double_quant),
        "bnb_4bit_compute_dtype": _dtype_name(compute),
        "llm_int8_skip_modules": skip,
    }


def bnb_quantization_config(
    load_in_4bit: bool,
    *,
    quant_type: str = "fp4",
    double_quant: bool = False,
    compute_dtype: str = "float32",
    threshold: float = DEFAULT_THRESHOLD,
    skip_modules: list[str] | None = None,
) -> dict[str, Any]:
    """Exactly the dict ``BitsAndBytesConfig(...).to_dict()`` gives (and ``save_pretrained`` writes),
    every field, with transformers' defaults for the ones that do not apply."""
    return {
        "quant_method": BNB_METHOD,
        "_load_in_8bit": not load_in_4bit,
        "_load_in_4bit": load_in_4bit,
        "llm_int8_threshold": float(threshold),
        "llm_int8_skip_modules": None if skip_modules is None else list(skip_modules),
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": BNB_QUANT_STORAGE,
        "load_in_4bit": load_in_4bit,
        "load_in_8bit": not load_in_4bit,
    }


def quantization_config_for(
    config: Config, skip_modules: list[str], weight_dtype: object = "float32"
) -> dict:
    """The ``quantization_config`` to write into ``config.json`` for a model quantized with ``config``.

    ``skip_modules`` are the full names of the linear layers left in floating point: written as
    ``llm_int8_skip_modules`` so that transformers converts exactly the layers lmlab quantized (with
    ``None`` it would pick its own: tied weights, the last module, the output embeddings)."""
    kwargs = bnb_kwargs(config, weight_dtype)
    if kwargs is None:
        return {
            "quant_method": LMLAB_METHOD,
            **config.to_json(),
            "skip_modules": list(skip_modules),
            "load_with": "lmlab.quant.load_quantized",
        }
    if kwargs.get("load_in_8bit"):
        return bnb_quantization_config(
            False, threshold=kwargs["llm_int8_threshold"], skip_modules=skip_modules
        )
    return bnb_quantization_config(
        True,
        quant_type=kwargs["bnb_4bit_quant_type"],
        double_quant=kwargs["bnb_4bit_use_double_quant"],
        compute_dtype=kwargs["bnb_4bit_compute_dtype"],
        skip_modules=skip_modules,
    )


def _flag(qc: dict, name: str, where: str) -> bool:
    value = qc.get(name, qc.get(f"_{name}", False))
    if not isinstance(value, bool):
        raise LmlabError(f"{where}: quantization_config {name} must be true or false, got {value!r}")
    return value


def read_bnb_config(qc: object, where: str) -> dict[str, Any]:
    """The settings of a transformers + bitsandbytes ``quantization_config``, every field lmlab uses
    checked: ``{"method": "nf4"|"fp4"|"int8", "double_quant", "compute_dtype" (a name),
    "threshold", "skip_modules" (a list or None)}``. Anything else (another quant_method, a quant
    storage other than uint8, fp16 int8 weights, both or neither of load_in_4bit / load_in_8bit) is a
    one-line :class:`LmlabError` naming ``where``."""
    if not isinstance(qc, dict):
        raise LmlabError(f"{where}: quantization_config must be a JSON object, got {type(qc).__name__}")
    method = qc.get("quant_method")
    four, eight = _flag(qc, "load_in_4bit", where), _flag(qc, "load_in_8bit", where)
    if method not in (BNB_METHOD, None) or not (four or eight):
        raise LmlabError(
            f"{where}: quantization_config is {method or 'of an unknown method'!s}; lmlab reads bitsandbytes' "
            "(load_in_4bit / load_in_8bit) and its own"
        )
    if four and eight:
        raise LmlabError(f"{where}: quantization_config sets both load_in_4bit and load_in_8bit")
    skip = qc.get("llm_int8_skip_modules")
    if skip is not None and (not isinstance(skip, list) or not all(isinstance(s, str) for s in skip)):
        raise LmlabError(
            f"{where}: quantization_config llm_int8_skip_modules must be a list of names or null"
        )
    threshold = qc.get("llm_int8_threshold", DEFAULT_THRESHOLD)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise LmlabError(
            f"{where}: quantization_config llm_int8_threshold must be a number, got {threshold!r}"
        )
    out: dict[str, Any] = {"skip_modules": skip, "threshold": float(threshold)}
    if eight:
        if qc.get("llm_int8_has_fp16_weight", False):
            raise LmlabError(
                f"{where}: quantization_config has llm_int8_has_fp16_weight (float weights kept for training); "
                "lmlab reads int8 weights only"
            )
        return {**out, "method": INT8_METHOD, "double_quant": False, "compute_dtype": None}
    quant_type = qc.get("bnb_4bit_quant_type", "fp4")
    if quant_type not in ("nf4", "fp4"):
        raise LmlabError(
            f"{where}: quantization_config bnb_4bit_quant_type must be nf4 or fp4, got {quant_type!r}"
        )
    storage = qc.get("bnb_4bit_quant_storage", BNB_QUANT_STORAGE)
    if storage != BNB_QUANT_STORAGE:
        raise LmlabError(
            f"{where}: quantization_config bnb_4bit_quant_storage is {storage!r}; lmlab reads uint8 storage only"
        )
    double_quant = qc.get("bnb_4bit_use_double_quant", False)
    if not isinstance(double_quant, bool):
        raise LmlabError(f"{where}: quantization_config bnb_4bit_use_double_quant must be true or false")
    compute = qc.get("bnb_4bit_compute_dtype", "float32")
    compute = None if compute is None else _dtype_name(compute)
    if compute is not None and compute not in FLOAT_DTYPE_NAMES:
        raise LmlabError(
            f"{where}: quantization_config bnb_4bit_compute_dtype must be one of "
            f"{', '.join(FLOAT_DTYPE_NAMES)}, got {compute!r}"
        )
    return {**out, "method": quant_type, "double_quant": double_quant, "compute_dtype": compute}


def quant_method_of(qc: object) -> str:
    """A short name of a ``quantization_config``'s method, for messages (``bitsandbytes 4-bit``, ``gptq``)."""
    if not isinstance(qc, dict):
        return "unknown method"
    if qc.get("load_in_4bit") is True or qc.get("load_in_8bit") is True:
        return f"{BNB_METHOD} {'4' if qc.get('load_in_4bit') is True else '8'}-bit"
    method = qc.get("quant_method")
    return method if isinstance(method, str) and method else "unknown method"
