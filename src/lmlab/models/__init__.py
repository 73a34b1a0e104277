"""Model presets over Hugging Face ``transformers`` configs (see :mod:`lmlab.models.presets`).

Importing this package imports neither torch nor transformers; building a model does.
"""

from lmlab.models.flops import flops_per_step, peak_flops
from lmlab.models.presets import (
    DECODER,
    ENCODER,
    ENCODER_DECODER,
    FAMILIES,
    PRESETS,
    Preset,
    build_model,
    get_preset,
    hf_config,
    load_model,
    max_positions,
    model_family,
    quiet_hf_progress,
)

__all__ = [
    "DECODER",
    "ENCODER",
    "ENCODER_DECODER",
    "FAMILIES",
    "PRESETS",
    "Preset",
    "build_model",
    "flops_per_step",
    "get_preset",
    "hf_config",
    "load_model",
    "max_positions",
    "model_family",
    "peak_flops",
    "quiet_hf_progress",
]
