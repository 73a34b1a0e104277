"""The quantization API on a CUDA device: the Triton kernels (where triton is installed, else the
references) give the CPU's results, at transformer shapes, through torch.compile, and bit for bit
bitsandbytes' 4-bit layout on the same GPU. Skipped without CUDA (the kernels themselves are
checked on CPU under Triton's interpreter in tests/quant/kernels)."""

from __future__ import annotations

import copy

import pytest
import torch
from quant_helpers import bits, logits, tiny_models

from lmlab.quant import (
    Int8Config,
    Linear4bit,
    Linear8bit,
    NF4Config,
    dequantize_4bit,
    int8_matmul,
    int8_vectorwise,
    load_quantized,
    quantize_,
    quantize_4bit,
    save_quantized,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_4bit_on_cuda_is_bit_identical_to_cpu(quant_type, dtype):
    g = torch.Generator().manual_seed(0)
    for shape in [(4096, 1000), (33, 65), (7,)]:
        w = (torch.randn(shape, generator=g) * 2).to(dtype)
        w.view(-1)[:64] = 0
        cpu = quantize_4bit(w, quant_type, 64)
        gpu = quantize_4bit(w.cuda(), quant_type, 64)
        assert gpu.packed.is_cuda and torch.equal(gpu.packed.cpu(), cpu.packed)
        assert torch.equal(bits(gpu.absmax.cpu()), bits(cpu.absmax))
        assert torch.equal(bits(dequantize_4bit(gpu).cpu()), bits(dequantize_4bit(cpu)))
        # double quant: the GPU's mean of the absmax vector may round differently in the last bit,
        # which can move a scale across an 8-bit grid point (one dynamic-map step, ~1%).
        cpu2 = quantize_4bit(w, quant_type, 64, double_quant=True)
        gpu2 = quantize_4bit(w.cuda(), quant_type, 64, double_quant=True)
        assert torch.equal(gpu2.packed.cpu(), cpu2.packed)
        assert gpu2.offset.item() == pytest.approx(cpu2.offset.item(), rel=1e-6)
        assert (gpu2.absmax.cpu() != cpu2.absmax).float().mean() < 0.01
        torch.testing.assert_close(dequantize_4bit(gpu2).cpu(), dequantize_4bit(cpu2), rtol=0.02, atol=1e-6)


def test_int8_matmul_on_cuda_matches_cpu():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 256, generator=g)
    x[:, 9] *= 20
    w_q, w_scale = int8_vectorwise(torch.randn(128, 256, generator=g))
    cpu = int8_matmul(x, w_q, w_scale, 6.0)
    gpu = int8_matmul(x.cuda(), w_q.cuda(), w_scale.cuda(), 6.0)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-4)


def test_layers_and_models_move_to_cuda(tmp_path):
    lin = torch.nn.Linear(128, 64)
    x = torch.randn(8, 128)
    for layer in (Linear4bit.from_linear(lin, double_quant=True), Linear8bit.from_linear(lin)):
        ref = layer(x)
        moved = copy.deepcopy(layer).cuda()
        xg = x.cuda().requires_grad_(True)
        out = moved(xg)
        out.sum().backward()
        assert xg.grad is not None
        torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)
    model = tiny_models()["gpt2"].eval().cuda()
    ids = torch.randint(0, 128, (2, 12), device="cuda")
    for config in (NF4Config(double_quant=True), Int8Config()):
        qmodel = copy.deepcopy(model)
        quantize_(qmodel, config)
        out = logits(qmodel, ids)
        save_quantized(qmodel, tmp_path / config.method, config)
        loaded = load_quantized(tmp_path / config.method, device="cuda")
        assert torch.equal(logits(loaded, ids), out)


def _nf4_layer(out_features, in_features, double_quant=True, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(in_features, out_features, dtype=torch.float32)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_features, in_features, generator=g) * 0.02)
    return Linear4bit.from_linear(lin.to(dtype).cuda(), "nf4", 64, double_quant=double_quant)


@pytest.mark.parametrize("m", [1, 7, 16, 4096])
def test_linear4bit_at_transformer_shapes_matches_its_dequantized_product(m):
    layer = _nf4_layer(4096, 4096)
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    y = layer(x)
    w = layer.dequantized_weight(torch.float32)
    ref = x.float() @ w.t() + layer.bias.float()
    assert y.dtype == torch.bfloat16 and y.shape == (m, 4096)
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)


def test_the_4bit_layout_is_bitsandbytes_on_the_same_gpu():
    F = pytest.importorskip("bitsandbytes.functional")
    w = (torch.randn(1024, 4096, device="cuda") * 0.05).to(torch.bfloat16)
    for quant_type in ("nf4", "fp4"):
        ours = quantize_4bit(w, quant_type, 64, double_quant=True)
        packed, state = F.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=True)
        assert torch.equal(ours.packed.reshape(-1), packed.reshape(-1))
        theirs = F.dequantize_4bit(packed, state, quant_type=quant_type)
        mine = dequantize_4bit(ours, torch.bfloat16)
        # the nested scales' float32 mean may round differently on the GPU (see the test above)
        torch.testing.assert_close(mine.float(), theirs.float(), rtol=2e-2, atol=1e-4)


def test_torch_compile_fullgraph_runs_through_the_kernels():
    lin = torch.nn.Linear(512, 256).cuda()
    x = torch.randn(4, 512, device="cuda")
    for layer in (Linear4bit.from_linear(lin, double_quant=True), Linear8bit.from_linear(lin)):
        compiled = torch.compile(layer, fullgraph=True)
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)
        xg = x.clone().requires_grad_(True)
        compiled(xg).sum().backward()
        assert xg.grad is not None and torch.isfinite(xg.grad).all()
