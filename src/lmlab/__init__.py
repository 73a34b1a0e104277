"""lmlab: pre-train, evaluate and quantize language models.

Subpackages, one per concern: :mod:`lmlab.data` (corpus, tokenizer, token shards),
:mod:`lmlab.objectives` (BERT / T5 denoising objectives and next-token prediction as pure batch
transforms), :mod:`lmlab.quant` (LLM.int8(), NF4, FP4), :mod:`lmlab.models` (presets over
Hugging Face configs), :mod:`lmlab.train` (the pre-training loop).  Importing ``lmlab`` imports
none of them, so ``import lmlab`` is instant.
"""

__version__ = "0.1.0"

from lmlab.errors import LmlabError  # noqa: E402

__all__ = ["LmlabError", "__version__"]
