"""Helpers shared by the quantization tests (tiny Hugging Face models, bit comparisons, peers)."""

from __future__ import annotations

import logging

import pytest
import torch


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns of ``t`` (so -0.0 != +0.0 and NaN payloads count)."""
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(view)


def bnb_functional():
    """bitsandbytes.functional, or a clean skip when bitsandbytes is not installed."""
    pytest.importorskip("bitsandbytes")
    # bitsandbytes logs (not warns) about optional CPU kernels at import; keep test output quiet.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes.functional as F

    return F


def tiny_models():
    """name -> tiny randomly initialised T5 / BERT / GPT-2 / Llama built from configs (no hub)."""
    import transformers as T

    torch.manual_seed(0)
    return {
        "t5": T.T5ForConditionalGeneration(
            T.T5Config(
                vocab_size=128,
                d_model=64,
                d_kv=16,
                d_ff=128,
                num_layers=2,
                num_heads=4,
                decoder_start_token_id=0,
            )
        ),
        "bert": T.BertForMaskedLM(
            T.BertConfig(
                vocab_size=128,
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=128,
                max_position_embeddings=64,
            )
        ),
        "gpt2": T.GPT2LMHeadModel(
            T.GPT2Config(
                vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2
            )
        ),
        "llama": T.LlamaForCausalLM(
            T.LlamaConfig(
                vocab_size=128,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=64,
            )
        ),
    }


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(input_ids=ids, decoder_input_ids=ids[:, : ids.shape[1] // 2]).logits
        return model(input_ids=ids).logits


def tiny_gpt2():
    """A GPT-2 of ~30k parameters (saves to ~125 KB, quantizes to ~45 KB) for the CLI and fault tests."""
    import transformers as T

    torch.manual_seed(0)
    config = T.GPT2Config(
        vocab_size=128, n_embd=32, n_layer=2, n_head=2, n_positions=32, bos_token_id=1, eos_token_id=2
    )
    return T.GPT2LMHeadModel(config).eval()
