"""Evaluation on CUDA equals evaluation on the CPU (skipped without a GPU): perplexity in fp32 and bf16,
the KL of an NF4 copy, T5's denoising loss, greedy continuations."""

from __future__ import annotations

import copy

import pytest

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def text(eval_data, eval_tokenizer):
    from lmlab.eval import load_eval_text

    return load_eval_text(eval_tokenizer, data_dir=eval_data)


def test_perplexity_and_compare_on_cuda(tiny_model, eval_tokenizer, text):
    from lmlab.eval import compare, perplexity
    from lmlab.quant import NF4Config, quantize_

    cpu = tiny_model("gpt2")
    gpu = copy.deepcopy(cpu).cuda()
    want = perplexity(cpu, eval_tokenizer, text, max_length=64)
    got = perplexity(gpu, eval_tokenizer, text, max_length=64)
    assert got.tokens == want.tokens and got.mean_nll == pytest.approx(want.mean_nll, rel=1e-4)
    bf16 = perplexity(copy.deepcopy(gpu).bfloat16(), eval_tokenizer, text, max_length=64)
    assert bf16.mean_nll == pytest.approx(want.mean_nll, rel=2e-2)
    nf4 = copy.deepcopy(cpu)
    quantize_(nf4, NF4Config(double_quant=True))
    k_cpu = compare(cpu, nf4, eval_tokenizer, text, max_length=64)
    k_gpu = compare(gpu, nf4.cuda(), eval_tokenizer, text, max_length=64)
    assert k_gpu.kl_mean == pytest.approx(k_cpu.kl_mean, rel=5e-2, abs=1e-6)
    assert k_gpu.top1_agreement == pytest.approx(k_cpu.top1_agreement, abs=1e-2)


def test_denoising_and_memorization_on_cuda(tiny_model, eval_tokenizer, eval_data, text):
    from lmlab.data import load_tokens
    from lmlab.eval import denoising_loss, memorization

    t5 = tiny_model("t5")
    kw = dict(seq_len=32, max_rows=8)
    want = denoising_loss(t5, eval_tokenizer, text, **kw)
    got = denoising_loss(copy.deepcopy(t5).cuda(), eval_tokenizer, text, **kw)
    assert got.target_tokens == want.target_tokens and got.loss == pytest.approx(want.loss, rel=1e-4)
    gpt = tiny_model("gpt2")
    splits = load_tokens(eval_data, "train"), load_tokens(eval_data, "val")
    mk = dict(prefix=8, suffix=8, samples=8)
    a = memorization(gpt, eval_tokenizer, *splits, **mk)
    b = memorization(copy.deepcopy(gpt).cuda(), eval_tokenizer, *splits, **mk)
    assert a.train.partial_mean == pytest.approx(b.train.partial_mean, abs=0.1)
