"""Models: presets (sizes) over Hugging Face ``transformers`` configs, and one adapter per model family.

* :mod:`lmlab.models.presets`: the named sizes (``t5-tiny``, ``gpt``, ``llama-tiny``, ...),
  :func:`build_model`, :func:`load_model`;
* :mod:`lmlab.models.families`: what each architecture (T5, BERT, GPT-2, Llama) needs known —
  :func:`family_of` a model or config, :func:`model_class` (the class that loads a directory);
* :mod:`lmlab.models.flops`: model FLOPs and device peaks for MFU;
* :mod:`lmlab.models.fast_t5`, :mod:`lmlab.models.onednn`: fast paths (lean T5 forward, oneDNN products).

Importing this package imports neither torch nor transformers; building a model does.
"""

from lmlab.models.families import (
    DECODER,
    ENCODER,
    ENCODER_DECODER,
    FAMILIES,
    KINDS,
    Family,
    family_of,
    model_class,
)
from lmlab.models.flops import flops_per_step, peak_flops
from lmlab.models.presets import (
    PRESETS,
    Preset,
    build_model,
    get_preset,
    hf_config,
    load_model,
    max_positions,
    quiet_hf_progress,
)

__all__ = [
    "DECODER",
    "ENCODER",
    "ENCODER_DECODER",
    "FAMILIES",
    "KINDS",
    "PRESETS",
    "Family",
    "Preset",
    "build_model",
    "family_of",
    "flops_per_step",
    "get_preset",
    "hf_config",
    "load_model",
    "max_positions",
    "model_class",
    "peak_flops",
    "quiet_hf_progress",
]
