"""The Triton 4-bit kernels (lmlab.quant.kernels.triton_4bit) against the references: bit for bit for
quantize / dequantize (bitsandbytes' layout), to float tolerance for the fused matmul paths. On a
GPU machine they run on CUDA; elsewhere under Triton's interpreter on CPU tensors (small shapes)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from quant_helpers import bits

from lmlab.quant import dequantize_4bit as public_dequantize
from lmlab.quant import quantize_4bit as public_quantize
from lmlab.quant.blockwise import (
    decode_scales,
    dequantize_4bit_reference,
    quantize_4bit_reference,
    quantize_blockwise_8bit,
)
from lmlab.quant.codebooks import dynamic_map

QUANT_TYPES = ("nf4", "fp4", "int4")
# The interpreter computes with numpy, which warns where IEEE arithmetic meets Inf / NaN / overflow.
numpy_ieee_warnings = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture
def k(triton_device):
    from lmlab.quant.kernels import triton_4bit

    return triton_4bit


def _weight(shape, device, dtype=torch.float32, seed=0):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3
    w.view(-1)[:64] = 0  # an all-zero block
    return w.to(dtype).to(device)


def _close_bits(got: torch.Tensor, ref: torch.Tensor, device: str) -> None:
    """Equal bit for bit; bfloat16 under the interpreter within one ulp (it truncates fp32 -> bf16)."""
    if got.dtype == torch.bfloat16 and device == "cpu":
        assert (bits(got).long() - bits(ref).long()).abs().max() <= 1
    else:
        assert torch.equal(bits(got), bits(ref))


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize(
    ("shape", "block_size"), [((37, 129), 32), ((16, 128), 64), ((7,), 64), ((3, 100), 256), ((4100,), 4096)]
)
def test_quantize_and_dequantize_are_the_references_bit_for_bit(
    k, triton_device, quant_type, shape, block_size
):
    # partial trailing blocks (37 * 129 = 4773), an odd element count (7), a block bigger than the tensor
    w = _weight(shape, triton_device)
    packed, absmax = k.quantize_4bit(w, quant_type, block_size)
    ref_packed, ref_absmax = quantize_4bit_reference(w.cpu(), quant_type, block_size)
    assert packed.shape == ref_packed.shape and packed.dtype == torch.uint8
    assert torch.equal(packed.cpu(), ref_packed) and torch.equal(bits(absmax.cpu()), bits(ref_absmax))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        got = k.dequantize_4bit(packed, absmax, quant_type, block_size, shape, dtype)
        ref = dequantize_4bit_reference(ref_packed, ref_absmax, quant_type, block_size, shape, dtype)
        assert got.shape == shape and got.dtype == dtype
        _close_bits(got.cpu(), ref, triton_device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_quantize_as_the_reference(k, triton_device, dtype):
    w = _weight((24, 96), triton_device, dtype, seed=1)
    packed, absmax = k.quantize_4bit(w, "nf4", 64)
    ref_packed, ref_absmax = quantize_4bit_reference(w.cpu(), "nf4", 64)
    assert torch.equal(packed.cpu(), ref_packed) and torch.equal(absmax.cpu(), ref_absmax)


@numpy_ieee_warnings
def test_a_nan_or_inf_shows_in_its_blocks_absmax(k, triton_device):
    w = _weight((4, 64), triton_device)
    w[1, 5] = float("nan")
    w[3, 0] = float("inf")
    _, absmax = k.quantize_4bit(w, "nf4", 64)
    assert torch.isnan(absmax[1]) and torch.isinf(absmax[3])
    assert torch.isfinite(absmax[[0, 2]]).all()


@numpy_ieee_warnings
def test_quantize_blockwise_8bit_is_the_reference_bit_for_bit(k, triton_device):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1000, generator=g)
    x[256:512] = 0  # an all-zero block stores code 0
    x[600] = 1e-42  # a subnormal scale: 1 / absmax overflows
    x[700:712] = torch.tensor([1.0, -1.0] * 6) * 0.5  # midpoints of the dynamic map
    code = dynamic_map(triton_device)
    codes, absmax = k.quantize_blockwise_8bit(x.to(triton_device), code)
    ref_codes, ref_absmax = quantize_blockwise_8bit(x, code.cpu())
    assert torch.equal(codes.cpu(), ref_codes) and torch.equal(bits(absmax.cpu()), bits(ref_absmax))


def test_double_quantized_scales_are_decoded_inside_the_kernel(k, triton_device):
    q = public_quantize(_weight((48, 256), "cpu", seed=3), "fp4", 64, double_quant=True)
    qd = q.to(triton_device)
    nested = {"offset": qd.offset, "nested_absmax": qd.nested_absmax, "nested_code": qd.nested_code}
    got = k.dequantize_4bit(qd.packed, qd.absmax, "fp4", 64, (48, 256), torch.float32, **nested)
    assert torch.equal(bits(got.cpu()), bits(public_dequantize(q, torch.float32, impl="reference")))
    out = torch.full((48, 256), float("nan"), device=triton_device)
    assert (
        k.dequantize_4bit(qd.packed, qd.absmax, "fp4", 64, (48, 256), torch.float32, out=out, **nested) is out
    )
    assert torch.equal(out, got)


def _linear_case(device, m, n, kk, dtype, double_quant, seed=0, quant_type="nf4", block_size=64):
    g = torch.Generator().manual_seed(seed)
    q = public_quantize(torch.randn(n, kk, generator=g), quant_type, block_size, double_quant=double_quant)
    x = torch.randn(m, kk, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    w = public_dequantize(q, torch.float32, impl="reference").double()
    ref = x.double() @ w.t() + bias.double()
    qd = q.to(device)
    args = (x.to(device), qd.packed, qd.absmax, quant_type, block_size, (n, kk), bias.to(device))
    nested = {"offset": qd.offset, "nested_absmax": qd.nested_absmax, "nested_code": qd.nested_code}
    return args, nested, ref


TOL = {torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 8e-2}


@pytest.mark.parametrize(
    ("path", "m"), [("gemv", 1), ("tiled", 1), ("tiled", 5), ("tiled", 16), ("dequant", 20)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [False, True])
def test_every_linear_path_matches_the_dequantized_product(k, triton_device, path, m, dtype, double_quant):
    args, nested, ref = _linear_case(triton_device, m, 96, 320, dtype, double_quant)
    y = k.linear_4bit(*args, **nested, path=path)
    assert y.shape == (m, 96) and y.dtype == dtype
    scale = ref.abs().max().item()
    assert (y.cpu().double() - ref).abs().max().item() <= TOL[dtype] * scale


def test_a_forced_gemv_takes_one_input_row_per_program(k, triton_device):
    args, nested, ref = _linear_case(triton_device, 3, 40, 256, torch.float32, True)
    y = k.linear_4bit(*args, **nested, path="gemv")
    assert (y.cpu().double() - ref).abs().max().item() <= 2e-5 * ref.abs().max().item()


def test_auto_picks_a_path_by_rows_and_block_alignment(k, triton_device):
    assert [k.choose_path(m, 4096, 64) for m in (1, 2, 16, 17, 4096)] == [
        "gemv",
        "tiled",
        "tiled",
        "dequant",
        "dequant",
    ]
    assert k.choose_path(1, 100, 64) == "dequant"  # rows would not start a block
    assert [k.choose_path(m, 4096, 64, torch.float32) for m in (1, 2)] == ["gemv", "dequant"]
    args, nested, ref = _linear_case(triton_device, 3, 40, 100, torch.float32, False, block_size=32)
    y = k.linear_4bit(*args, **nested)  # 100 % 32 != 0: the dequant path, still right
    assert (y.cpu().double() - ref).abs().max().item() < 1e-4
    with pytest.raises(ValueError, match="multiple of 32"):
        k.linear_4bit(*args, **nested, path="gemv")
    with pytest.raises(ValueError, match="path must be one of"):
        k.linear_4bit(*args, **nested, path="fastest")


def test_a_batch_of_sequences_and_no_bias(k, triton_device):
    args, nested, _ = _linear_case(triton_device, 6, 64, 128, torch.float32, True)
    x, *rest = args
    rest[-1] = None  # no bias
    x3 = x.reshape(2, 3, 128)
    y = k.linear_4bit(x3, *rest, **nested)
    w = k.dequantize_4bit(*rest[:5], torch.float32, **nested)
    assert y.shape == (2, 3, 64)
    torch.testing.assert_close(y, x3 @ w.t(), rtol=1e-5, atol=1e-5)
    empty = k.linear_4bit(x3[:, :0], *rest, **nested)
    assert empty.shape == (2, 0, 64)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    m=st.integers(1, 16),
    n=st.integers(1, 70),
    blocks=st.integers(1, 6),
    block_size=st.sampled_from([32, 64, 128]),
    quant_type=st.sampled_from(QUANT_TYPES),
    double_quant=st.booleans(),
)
def test_fused_paths_for_any_shape(k, triton_device, m, n, blocks, block_size, quant_type, double_quant):
    kk = blocks * block_size
    args, nested, ref = _linear_case(
        triton_device, m, n, kk, torch.float32, double_quant, quant_type=quant_type, block_size=block_size
    )
    y = k.linear_4bit(*args, **nested)
    assert (y.cpu().double() - ref).abs().max().item() <= 2e-5 * max(1.0, ref.abs().max().item())


def test_the_cuda_entry_points_run_the_kernels_or_the_reference(triton_device, monkeypatch):
    """lmlab.quant.kernels.cuda: what the ops register for "cuda"; without triton, the reference."""
    from lmlab.quant.kernels import cuda

    w = _weight((8, 128), triton_device)
    for available in (True, False):
        if not available:
            monkeypatch.setattr(cuda, "_module", lambda name: None)
        packed, absmax = cuda.quantize_4bit(w, "nf4", 64)
        assert torch.equal(packed.cpu(), quantize_4bit_reference(w.cpu(), "nf4", 64)[0])
        q = public_quantize(w.cpu(), "nf4", 64, double_quant=True).to(triton_device)
        nested = (q.offset, q.nested_absmax, q.nested_code, 256)
        got = cuda.dequantize_4bit(q.packed, q.absmax, "nf4", 64, [8, 128], torch.float32, *nested)
        want = dequantize_4bit_reference(
            q.packed, decode_scales(q.absmax, *nested), "nf4", 64, (8, 128), torch.float32
        )
        assert torch.equal(got, want)
        out = torch.empty(8, 128, device=triton_device)
        cuda.dequantize_4bit_out(q.packed, q.absmax, "nf4", 64, out, *nested)
        assert torch.equal(out, want)
        x = torch.randn(2, 128, generator=torch.Generator().manual_seed(4)).to(triton_device)
        y = cuda.linear_4bit(x, q.packed, q.absmax, "nf4", 64, [8, 128], None, *nested)
        torch.testing.assert_close(y, x @ want.t(), rtol=1e-5, atol=1e-4)
        assert cuda.kernel_available("dequantize_4bit") is available


def test_fast_on_cuda_without_triton_is_a_one_line_error(monkeypatch):
    from lmlab.errors import LmlabError
    from lmlab.quant.functional import use_kernel
    from lmlab.quant.kernels import cuda

    monkeypatch.setattr(cuda, "_module", lambda name: None)
    with pytest.raises(LmlabError, match="impl='fast' does not apply"):
        use_kernel("fast", "dequantize_4bit", torch.device("cuda"), "Linear4bit")
    assert use_kernel("auto", "dequantize_4bit", torch.device("cuda"), "Linear4bit")  # the reference runs


def test_lmlab_on_cpu_loads_no_kernel_module_and_touches_no_device():
    # (torch itself imports the triton package once torch._dynamo loads, where triton is installed)
    code = (
        "import sys, torch; import lmlab, lmlab.quant as q; "
        "l = q.Linear4bit.from_linear(torch.nn.Linear(64, 8)); l(torch.randn(2, 64)); "
        "q.Linear8bit.from_linear(torch.nn.Linear(64, 8))(torch.randn(2, 64)); "
        "loaded = [m for m in sys.modules if m.startswith('lmlab.quant.kernels.triton')]; "
        "assert not loaded, loaded; assert not torch.cuda.is_initialized()"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_tile_configs_are_pruned_by_the_number_of_rows(k, triton_device):
    import triton

    configs = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": kk}, num_warps=w) for m, n, kk, w in k._TILES
    ]
    small = k._prune_tiles(configs, {"M_BUCKET": 16})
    large = k._prune_tiles(configs, {"M_BUCKET": 1024})
    assert small and all(c.kwargs["BLOCK_M"] == 16 for c in small)
    assert large and all(c.kwargs["BLOCK_M"] >= 64 for c in large)
    assert len(small) + len(large) == len(configs)
    assert k._prune_tiles(configs[:1], {"M_BUCKET": 1024}) == configs[:1]  # never none left
    (ieee,) = k._prune_tiles(configs, {"M_BUCKET": 16}, IEEE=True)  # float32 without tf32: the small tile
    assert (ieee.kwargs["BLOCK_M"], ieee.kwargs["BLOCK_N"], ieee.kwargs["BLOCK_K"]) == k._IEEE_TILE[:3]


def test_gemv_steps_are_pruned_to_whole_blocks(k, triton_device):
    import triton

    configs = [triton.Config({"BLOCK_N": n, "BLOCK_K": kk}, num_warps=w) for n, kk, w in k._GEMV_TILES]
    assert k._prune_gemv(configs, {}, BS=64) == configs
    assert all(c.kwargs["BLOCK_K"] >= 512 for c in k._prune_gemv(configs, {}, BS=512))
    (only,) = k._prune_gemv(configs, {}, BS=4096)
    assert only.kwargs["BLOCK_K"] == 4096


@pytest.mark.parametrize(
    ("path", "block_size"), [("gemv", 512), ("gemv", 1024), ("tiled", 256), ("tiled", 1024)]
)
def test_fused_paths_with_blocks_longer_than_a_step(k, triton_device, path, block_size):
    args, nested, ref = _linear_case(triton_device, 1, 24, 2048, torch.float32, True, block_size=block_size)
    y = k.linear_4bit(*args, **nested, path=path)
    assert (y.cpu().double() - ref).abs().max().item() <= 2e-5 * ref.abs().max().item()


def test_every_launch_says_whether_it_fuses_multiply_adds():
    """Triton 3.9 warns on a launch that leaves ``enable_fp_fusion`` to the default (which changes in
    3.10), and the bit-exact kernels must not fuse: every launch in both modules passes it."""
    import ast
    import importlib.util
    from pathlib import Path

    for name in ("triton_4bit", "triton_int8"):
        source = Path(importlib.util.find_spec(f"lmlab.quant.kernels.{name}").origin).read_text()
        launches = [
            node
            for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Subscript)
            and getattr(node.func.value, "id", "").endswith("_kernel")
        ]
        assert launches, name
        for call in launches:
            keywords = {k.arg for k in call.keywords}
            assert "enable_fp_fusion" in keywords, (
                f"{name}: {call.func.value.id} launched at line {call.lineno}"
            )
