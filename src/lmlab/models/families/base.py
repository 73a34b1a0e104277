"""The protocol every model family implements, and the pieces the families of one kind share.

A family (T5, GPT-2, BERT, Llama) is the one place that knows a Hugging Face architecture: which
``model_type`` values it claims, how to build its config from a preset's sizes, which class loads
and instantiates that config, what its forward takes for an objective's batch, how its body splits
from its output head (for the fused loss of :mod:`lmlab.train.loss`), its repeated blocks (FSDP's
units) and the FLOPs of a training step.  Each family is a small object in its own module of
:mod:`lmlab.models.families`; nothing here imports torch or transformers until it is used.

The batch vocabulary is Hugging Face's (``input_ids``, ``attention_mask``, ``labels`` with
``-100``, ``decoder_input_ids``), plus lmlab's ``prefix_mask`` for a decoder-only prefix LM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from torch import nn

ENCODER_DECODER, ENCODER, DECODER = "encoder-decoder", "encoder", "decoder"
KINDS = (ENCODER_DECODER, ENCODER, DECODER)


class Family(Protocol):
    """What lmlab needs to know about one Hugging Face architecture.

    ``name``: the family's name (``"t5"``); ``kind``: one of :data:`KINDS`; ``model_types``: the
    ``config.model_type`` values it claims (``("t5", "mt5")``); ``head_classes``: the names of the
    ``transformers`` classes whose body/head split it knows.
    """

    name: str
    kind: str
    model_types: tuple[str, ...]
    head_classes: tuple[str, ...]

    def hf_config(self, sizes: dict[str, Any], vocab_size: int, ids: dict[str, int]) -> Any:
        """The ``transformers`` config for a preset's ``sizes``, a vocabulary and its special ids
        (``ids["pad"]``, ``ids["eos"]``)."""
        ...

    def model_class(self, config: Any) -> type:
        """The ``transformers`` class that instantiates ``config`` and loads a directory saved with it."""
        ...

    def forward_inputs(
        self, model: nn.Module, batch: dict[str, torch.Tensor], start_id: int = 0
    ) -> dict[str, Any]:
        """The keyword arguments of ``model``'s forward for an objective's batch (no labels: lmlab scores)."""
        ...

    def splits(self, model: nn.Module) -> bool:
        """Whether :meth:`hidden_and_head` reproduces ``model``'s own forward (its class, a plain head)."""
        ...

    def hidden_and_head(
        self, model: nn.Module, kw: dict[str, Any], keep: torch.Tensor, impl: str = "auto"
    ) -> tuple[torch.Tensor, nn.Module]:
        """(hidden rows where ``keep`` (B, T) bool is True, (rows, d); the ``nn.Linear`` that maps them
        to logits): the model's forward up to its output projection, on the scored rows only.

        ``impl`` chooses the family's own fast forward where it has one (T5's lean forward)."""
        ...

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The repeated transformer blocks, FSDP2's sharding units."""
        ...

    def flops_per_step(
        self, model: nn.Module, batch_size: int, input_len: int, target_len: int | None = None
    ) -> float:
        """Training FLOPs of one optimizer step over ``batch_size`` rows (see :mod:`lmlab.models.flops`)."""
        ...


def plain_head(model: nn.Module, classes: tuple[str, ...]) -> bool:
    """``model`` is exactly one of ``classes`` (by name: FSDP's wrapper classes are not) and its output
    layer a plain ``nn.Linear`` (the fused loss reads its weight; a quantized layer keeps packed ones)."""
    import torch

    if type(model).__name__ not in classes:
        return False
    return type(model.get_output_embeddings()) is torch.nn.Linear


def on_cpu_in_fp32(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are fp32 on a CPU (where oneDNN's products may apply)."""
    import torch

    p = next(model.parameters(), None)
    return p is not None and p.device.type == "cpu" and p.dtype == torch.float32


def fast_routing(model: nn.Module, impl: str):
    """oneDNN's fp32 products around a Hugging Face forward, unless ``impl`` asks for the reference."""
    from lmlab.models import onednn

    return onednn.routing(impl != "reference" and on_cpu_in_fp32(model))


def shift_right(labels: torch.Tensor, start: int) -> torch.Tensor:
    """T5's decoder inputs: the labels moved one step right, ``start`` first and in place of -100."""
    from lmlab.objectives.base import IGNORE_INDEX

    out = labels.new_full(labels.shape, start)
    out[:, 1:] = labels[:, :-1]
    return out.masked_fill(out == IGNORE_INDEX, start)


def prefix_lm_mask(prefix_mask: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 1, T, T) bool, True where query i may attend to key j: the prefix LM's mask.

    Raffel et al. 2020 §3.2.1, Figure 3 (right): fully visible inside the prefix (``prefix_mask``
    (B, T), 1 on the prefix), causal elsewhere, and never onto padding (``attention_mask``).  A
    prepared 4D mask, which Hugging Face's decoders take as it is.
    """
    import torch

    T = prefix_mask.shape[1]
    p = prefix_mask.bool()
    causal = torch.ones(T, T, dtype=torch.bool, device=p.device).tril_()
    allowed = causal[None] | (p[:, :, None] & p[:, None, :])
    if attention_mask is not None:
        allowed &= attention_mask.bool()[:, None, :]
    return allowed[:, None]


def encoder_decoder_inputs(batch: dict[str, torch.Tensor], start_id: int) -> dict[str, Any]:
    """An encoder–decoder's forward inputs: the decoder's are the batch's, else the labels shifted right."""
    kw = encoder_inputs(batch)
    dec = batch.get("decoder_input_ids")
    kw["decoder_input_ids"] = dec if dec is not None else shift_right(batch["labels"], start_id)
    kw["use_cache"] = False
    return kw


def encoder_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """An encoder's forward inputs: the ids and, where the batch has one, its padding mask."""
    kw: dict[str, Any] = {"input_ids": batch["input_ids"]}
    if "attention_mask" in batch:
        kw["attention_mask"] = batch["attention_mask"]
    return kw


def decoder_inputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A decoder-only model's forward inputs; a ``prefix_mask`` becomes the prefix LM's 4D mask."""
    import torch

    kw = encoder_inputs(batch)
    kw["use_cache"] = False
    if "prefix_mask" in batch:
        mask = prefix_lm_mask(batch["prefix_mask"], batch.get("attention_mask"))
        if model.config._attn_implementation == "eager":
            # Eager attention adds its mask: 0 where attended, the dtype's minimum elsewhere.
            dtype = next(model.parameters()).dtype
            bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
            mask = bias.masked_fill_(~mask, torch.finfo(dtype).min)
        kw["attention_mask"] = mask
    return kw


def decoder_only_flops(model: nn.Module, batch_size: int, input_len: int, layers: int, inner: int) -> float:
    """``B·T·(6N + 12·L·inner·T)``: every matrix sees every token, attention over the full length."""
    from lmlab.models.flops import linear_weights

    n = sum(n for _, n in linear_weights(model))
    T = input_len
    return float(batch_size * T * (6 * n + 12 * layers * inner * T))


@dataclass(frozen=True)
class DecoderOnlyFamily:
    """What the decoder-only families share (GPT-2, Llama): the special ids of the config, the inputs,
    the body/head split over ``model.<body>`` and ``model.lm_head``.  A family names its
    ``transformers`` classes and body, and gives its FSDP blocks and FLOP count."""

    name: str
    model_types: tuple[str, ...]
    head_classes: tuple[str, ...]  # the first is the class lmlab builds and trains
    config_class: str  # the ``transformers`` config class
    body: str  # the attribute of the model that holds the decoder stack
    kind: str = DECODER

    def hf_config(self, sizes: dict[str, Any], vocab_size: int, ids: dict[str, int]) -> Any:
        import transformers

        config = getattr(transformers, self.config_class)
        return config(
            **sizes,
            vocab_size=vocab_size,
            bos_token_id=ids["eos"],
            eos_token_id=ids["eos"],
            pad_token_id=ids["pad"],
        )

    def model_class(self, config: Any) -> type:
        import transformers

        return getattr(transformers, self.head_classes[0])

    def forward_inputs(
        self, model: nn.Module, batch: dict[str, torch.Tensor], start_id: int = 0
    ) -> dict[str, Any]:
        return decoder_inputs(model, batch)

    def splits(self, model: nn.Module) -> bool:
        return plain_head(model, self.head_classes)

    def hidden_and_head(
        self, model: nn.Module, kw: dict[str, Any], keep: torch.Tensor, impl: str = "auto"
    ) -> tuple[torch.Tensor, nn.Module]:
        with fast_routing(model, impl):
            body = getattr(model, self.body)
            h = body(input_ids=kw["input_ids"], attention_mask=kw.get("attention_mask"), use_cache=False)[0]
        return h[keep], model.lm_head
