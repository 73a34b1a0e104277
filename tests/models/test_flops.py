"""Model FLOPs per training step against known figures and hand counts; the device peak's override."""

from __future__ import annotations

import pytest

from lmlab.models import build_model, flops_per_step, peak_flops


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.slow  # builds the 124M model
def test_flops_match_the_6n_rule():
    gpt = build_model("gpt", 50304, seed=0)
    # nanoGPT's estimate: 6 N + 12 L d T per token, N without the position table.
    N = n_params(gpt) - gpt.transformer.wpe.weight.numel()
    want = 16 * 1024 * (6 * N + 12 * 12 * 768 * 1024)
    assert flops_per_step(gpt, 16, 1024) == pytest.approx(want, rel=0.002)  # biases and norms left out


def test_gpt_and_t5_flops_by_hand():
    gpt = build_model("gpt-tiny", 512, seed=0)
    d, L, V, B, T = 128, 4, 512, 2, 48
    matrices = L * (4 * d * d + 8 * d * d) + V * d  # q, k, v, o; the feed-forward's two; the tied head
    assert flops_per_step(gpt, B, T) == B * T * (6 * matrices + 12 * L * d * T)
    t5 = build_model("t5-tiny", 512, seed=0)
    d, f, inner, L, S = 128, 384, 4 * 32, 2, 16
    enc = L * (4 * d * inner + 3 * d * f)  # self-attention; gated feed-forward (wi_0, wi_1, wo)
    cross_kv = L * 2 * d * inner  # cross-attention's k and v read the encoder output: T tokens
    dec = L * (4 * d * inner + 2 * d * inner + 3 * d * f) + V * d  # self; cross q, o; feed-forward; head
    attn = 12 * L * inner * T * T + 12 * L * inner * S * (S + T)
    assert flops_per_step(t5, B, T, S) == B * (6 * (enc + cross_kv) * T + 6 * dec * S + attn)
    # Encoder matrices see inputs, decoder matrices targets: more targets cost more.
    assert flops_per_step(t5, 4, 64, 32) < flops_per_step(t5, 4, 64, 64)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_llama_flops_by_hand(kv_heads):
    """Per layer q, o (d·d), k, v (d·d·kv/heads), gate, up, down (d·f); the tied head V·d once."""
    B, T, V = 3, 40, 512
    m = build_model("llama-tiny", V, seed=0, num_key_value_heads=kv_heads)
    d, f, L = 128, 352, 4
    kv = d * kv_heads // 4
    matrices = L * (2 * d * d + 2 * d * kv + 3 * d * f) + V * d
    assert flops_per_step(m, B, T) == B * T * (6 * matrices + 12 * L * d * T)


def test_bert_counts_every_matrix_on_every_token():
    m = build_model("bert-tiny", 300, seed=0)
    d, L = 128, 2
    # per layer q, k, v, o (d·d), the feed-forward (2 · d · 4d); the head's transform (d·d) and projection
    matrices = L * (4 * d * d + 8 * d * d) + d * d + 300 * d
    assert flops_per_step(m, 2, 16) == 2 * 16 * (6 * matrices + 12 * L * d * 16)


def test_peak_is_unknown_on_cpu_unless_given():
    assert peak_flops("cpu") is None
    assert peak_flops("cpu", override_tflops=2.5) == 2.5e12
