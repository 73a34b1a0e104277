"""Model presets: named sizes of T5, BERT, GPT-2 and Llama built from Hugging Face ``transformers`` configs.

Every preset is a plain ``transformers`` model, so a trained one saves with ``save_pretrained``
and loads with the class its family names (:func:`lmlab.models.families.model_class`).  This
module holds the sizes; what a family's config and classes are is its adapter's business
(:mod:`lmlab.models.families`).

* ``t5-*``: T5 v1.1 shapes (Raffel et al. 2020, and the v1.1 release notes): gated-GELU
  feed-forward (tanh GELU, computed by torch's single kernel: ``gated-gelu_pytorch_tanh``), no dropout during pre-training, relative position buckets 32 / distance 128.
  ``t5-small`` (d_model 512, d_ff 1024, 8 + 8 layers, 6 heads) and ``t5-base`` (768, 2048,
  12 + 12, 12 heads) are v1.1's sizes; ``t5-tiny`` (a few million parameters) trains on a
  laptop CPU in minutes.  One deviation: transformers 5 always ties T5's input and output
  embeddings (``T5Config`` forces ``tie_word_embeddings``), so the decoder output keeps T5 1.0's
  d_model^-0.5 rescaling that tied embeddings need, where v1.1 had a separate output matrix.
* ``bert-*``: ``BertForMaskedLM`` at the compact sizes of Turc et al. 2019 ("Well-Read Students
  Learn Better"), with BERT's own dropout 0.1 (Devlin et al. 2019).
* ``gpt-*``: GPT-2 style decoders (Radford et al. 2019); ``gpt`` is the 124M model (768 wide,
  12 layers, 12 heads, 1024 positions), without dropout as in nanoGPT's pre-training runs.
* ``llama-*``: Llama decoders (Touvron et al. 2023: RMSNorm, SwiGLU, RoPE) as wide and deep as
  ``gpt-tiny`` / ``gpt-mini``, the SwiGLU width 8/3 of the model width (rounded up to a multiple
  of 32) so the feed-forward has GPT-2's parameter count; tied embeddings (see
  :mod:`lmlab.models.families.llama`), no dropout.

The vocabulary size and special ids come from the prepared data's tokenizer, not the preset.
Nothing here imports torch or transformers until a model is built.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmlab.errors import LmlabError
from lmlab.models.families import Family, check_trained_class, family_of, get_family, model_class

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class Preset:
    """A named model size: its family's name and the arguments of that family's ``transformers`` config."""

    name: str
    family_name: str  # a key of lmlab.models.families.FAMILIES
    config: dict[str, Any] = field(default_factory=dict)
    seq_len: int = 512  # the default --seq-len (inputs length) for this preset
    max_len: int | None = None  # learned position tables cap the length; T5's and Llama's positions do not

    @property
    def adapter(self) -> Family:
        """The family adapter that builds and trains this preset."""
        return get_family(self.family_name)

    @property
    def kind(self) -> str:
        """``encoder-decoder``, ``encoder`` or ``decoder``."""
        return self.adapter.kind


def _t5(name: str, d_model: int, d_ff: int, d_kv: int, layers: int, heads: int, seq_len: int) -> Preset:
    return Preset(
        name,
        "t5",
        dict(
            d_model=d_model,
            d_ff=d_ff,
            d_kv=d_kv,
            num_layers=layers,
            num_decoder_layers=layers,
            num_heads=heads,
            # v1.1's gated GELU (tanh form); torch's one-kernel GELU-tanh instead of HF's composed "gelu_new"
            # (same function to ~1e-6, ~10% faster CPU steps for t5-tiny).
            feed_forward_proj="gated-gelu_pytorch_tanh",
            dropout_rate=0.0,
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
        ),
        seq_len=seq_len,
    )


def _bert(name: str, hidden: int, layers: int, heads: int) -> Preset:
    return Preset(
        name,
        "bert",
        dict(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=4 * hidden,
            max_position_embeddings=512,
        ),
        seq_len=128 if hidden < 512 else 512,
        max_len=512,
    )


def _gpt(name: str, n_embd: int, layers: int, heads: int, seq_len: int) -> Preset:
    return Preset(
        name,
        "gpt2",
        dict(
            n_embd=n_embd,
            n_layer=layers,
            n_head=heads,
            n_positions=1024,
            activation_function="gelu_pytorch_tanh",  # GPT-2's tanh GELU as one kernel
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        ),
        seq_len=seq_len,
        max_len=1024,
    )


def _llama(name: str, hidden: int, layers: int, heads: int, seq_len: int) -> Preset:
    ffn = -(-8 * hidden // 3 // 32) * 32  # SwiGLU's 8/3 width (Shazeer 2020), a multiple of 32
    return Preset(
        name,
        "llama",
        dict(
            hidden_size=hidden,
            intermediate_size=ffn,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            hidden_act="silu",
            max_position_embeddings=2048,  # RoPE has no table; the longest input lmlab lets it train on
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            attention_dropout=0.0,
        ),
        seq_len=seq_len,
    )


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        _t5("t5-tiny", 128, 384, 32, 2, 4, seq_len=128),
        _t5("t5-small", 512, 1024, 64, 8, 6, seq_len=512),
        _t5("t5-base", 768, 2048, 64, 12, 12, seq_len=512),
        _bert("bert-tiny", 128, 2, 2),
        _bert("bert-mini", 256, 4, 4),
        _bert("bert-small", 512, 4, 8),
        _bert("bert-medium", 512, 8, 8),
        _bert("bert-base", 768, 12, 12),
        _gpt("gpt-tiny", 128, 4, 4, seq_len=128),
        _gpt("gpt-mini", 384, 6, 6, seq_len=256),
        _gpt("gpt", 768, 12, 12, seq_len=1024),
        _llama("llama-tiny", 128, 4, 4, seq_len=128),
        _llama("llama-mini", 384, 6, 6, seq_len=256),
    )
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise LmlabError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def hf_config(preset: str | Preset, vocab_size: int, special_ids: dict[str, int] | None = None, **overrides):
    """The ``transformers`` config of a preset for a vocabulary of ``vocab_size`` ids (its family builds it)."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    ids = {"pad": 0, "eos": 1, **(special_ids or {})}
    return p.adapter.hf_config({**p.config, **overrides}, int(vocab_size), ids)


def build_model(
    preset: str | Preset,
    vocab_size: int,
    special_ids: dict[str, int] | None = None,
    seed: int | None = None,
    **overrides,
) -> nn.Module:
    """A freshly initialised model of ``preset`` (``transformers``' own initialisation), of the class
    its family names (:func:`lmlab.models.families.model_class`).

    ``seed`` seeds the initialisation without touching the caller's global RNG state.
    """
    import torch

    config = hf_config(preset, vocab_size, special_ids, **overrides)
    cls = model_class(config)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return cls(config)


@contextlib.contextmanager
def quiet_hf_progress() -> Iterator[None]:
    """Hugging Face's own progress bars off for the block, restored after.

    ``from_pretrained``'s "Loading weights" and ``save_pretrained``'s "Writing model shards" bars
    flash for a moment on lmlab's small models and print even under ``--no-progress``; lmlab's
    own bars say what is happening.
    """
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return " ".join(lines[:2])[:300] if lines else type(e).__name__


def check_not_quantized(model_dir: str | os.PathLike) -> None:
    """Refuse a directory that already holds a quantized model (lmlab's or transformers + bitsandbytes'),
    or whose ``config.json`` is not a JSON object; needs neither torch nor transformers."""
    from lmlab.io import output_kind, read_json_object

    d = Path(model_dir)
    if output_kind(d) == "run":
        raise LmlabError(f"{model_dir} is a training run, not a saved model; pass its final/ directory")
    if (d / "lmlab_quant.json").is_file():
        raise LmlabError(
            f"{model_dir} is already quantized (written by lmlab quantize); load it with "
            "lmlab.quant.load_quantized, or start from the float model it came from"
        )
    try:
        config = read_json_object(d / "config.json")
    except FileNotFoundError:
        return  # read_hf_config says what is missing
    if config.get("quantization_config"):
        qc = config["quantization_config"]
        how = qc.get("quant_method", "unknown method") if isinstance(qc, dict) else "unknown method"
        raise LmlabError(
            f"{model_dir} is already quantized (config.json has a quantization_config, {how}); "
            "start from the float model it came from"
        )


def read_hf_config(model_dir: str | os.PathLike):
    """The ``transformers`` config of a saved model directory; a missing, damaged or hand-edited
    ``config.json`` (bad JSON, wrong types) is a one-line :class:`LmlabError`."""
    from transformers import AutoConfig

    from lmlab.io import read_json_object

    d = Path(model_dir)
    path = d / "config.json"
    if not path.is_file():
        raise LmlabError(f"{model_dir} is not a saved model (no config.json); pass a run's final/ directory")
    read_json_object(path)  # a one-line error for bad JSON before transformers sees it
    try:
        return AutoConfig.from_pretrained(d)
    except OSError:
        raise
    except Exception as e:  # transformers' and huggingface_hub's validation errors share no base class
        raise LmlabError(f"{path}: cannot read the model config ({_first_line(e)})") from None


def load_pretrained(cls: type, model_dir: str | os.PathLike) -> nn.Module:
    """``cls.from_pretrained(model_dir)``, refusing what transformers would quietly paper over.

    A weight missing from the directory (transformers initialises it at random and carries on), a
    corrupt, truncated or empty weights file, or a tensor of the wrong shape is a one-line
    :class:`LmlabError`. Tied weights that transformers re-ties are not missing.
    """
    model, missing = _load_reporting_missing(cls, model_dir)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise LmlabError(
            f"{model_dir}: the weights file lacks {len(missing)} tensor(s) the model needs "
            f"({', '.join(missing[:3])}{more}); refusing to fill them with random values"
        )
    return model


def _load_reporting_missing(cls: type, model_dir: str | os.PathLike) -> tuple[nn.Module, list[str]]:
    """``cls.from_pretrained(model_dir)`` and the sorted names of the tensors the file lacked."""
    from transformers.utils import logging as hf_logging

    d = Path(model_dir)
    check_not_quantized(d)
    verbosity = hf_logging.get_verbosity()
    # transformers prints a many-line load report before raising or initialising; we say it in one.
    hf_logging.set_verbosity_error()
    try:
        with quiet_hf_progress():
            model, info = cls.from_pretrained(d, output_loading_info=True)
    except OSError as e:
        if e.filename is not None:
            raise
        raise LmlabError(f"{model_dir}: cannot load the model ({_first_line(e)})") from None
    except Exception as e:  # SafetensorError, a shape mismatch (RuntimeError), a bad config value
        what = "does not match the config" if "mismatched" in str(e) else "is damaged or unreadable"
        raise LmlabError(f"{model_dir}: the model's weights {what} ({_first_line(e)})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if info.get("mismatched_keys"):
        raise LmlabError(f"{model_dir}: tensors of the wrong shape ({sorted(info['mismatched_keys'])[:3]})")
    return model, sorted(info.get("missing_keys") or ())


def load_model_with_head(model_dir: str | os.PathLike) -> tuple[nn.Module, list[str]]:
    """:func:`load_model` for training (``--init``): ``(model, names of the tensors that start fresh)``.

    A checkpoint of a family's bare body -- a ``BertModel`` such as all-MiniLM-L6-v2, which has no
    MLM head -- loads into the family's head class (``BertForMaskedLM``): the body's weights from
    the file, the head's own tensors (BERT's transform and bias) initialised by transformers, and its
    output projection tied to the input embeddings, as ``BertForMaskedLM.from_pretrained`` of such a
    checkpoint does (``run_mlm.py`` on a body-only checkpoint).  Every other model loads as
    :func:`load_model` loads it (nothing fresh); a body tensor missing from the file is still refused.
    """
    import transformers

    check_not_quantized(model_dir)
    config = read_hf_config(model_dir)
    family = family_of(config)
    cls = model_class(config)
    try:
        body = transformers.AutoModel._model_mapping[type(config)]
    except (KeyError, AttributeError):
        body = None
    if cls.__name__ in family.head_classes or cls is not body:
        return load_model(model_dir), []
    head = family.model_class(config)
    model, missing = _load_reporting_missing(head, model_dir)
    prefix = f"{head.base_model_prefix}."
    lacking = [k for k in missing if k.startswith(prefix)]
    if lacking:
        raise LmlabError(
            f"{model_dir}: the weights file lacks {len(lacking)} tensor(s) of the {cls.__name__} "
            f"({', '.join(lacking[:3])}); refusing to fill them with random values"
        )
    check_trained_class(model)
    return model, missing


def load_model(model_dir: str | os.PathLike) -> nn.Module:
    """Load a saved model (a run's ``final/`` or any ``save_pretrained`` directory) with the class its
    family names (:func:`lmlab.models.families.model_class`).

    Refused in one line: a quantized directory, a damaged ``config.json`` or weights file, a model
    type lmlab does not train, and a weight missing from the file (never initialised at random).
    """
    check_not_quantized(model_dir)
    config = read_hf_config(model_dir)
    family_of(config)  # a model type lmlab does not train: refused before any weight is read
    model = load_pretrained(model_class(config), model_dir)
    check_trained_class(model)
    return model


def max_positions(model: nn.Module) -> int | None:
    """The longest input the model's position table allows (None for T5's relative buckets)."""
    c = model.config
    return getattr(c, "n_positions", None) or getattr(c, "max_position_embeddings", None)
