"""The op contract (lmlab.quant.ops): opcheck of every op, the registered CPU kernel against the
reference, the impl switch, and torch.compile seeing one lmlab op per quantized layer."""

from __future__ import annotations

import pytest
import torch
from quant_helpers import bits
from torch import nn

from lmlab.errors import LmlabError
from lmlab.quant import Linear4bit, Linear8bit, blockwise, dequantize_4bit, int8_matmul, ops, quantize_4bit
from lmlab.quant.functional import decoded_absmax
from lmlab.quant.int8 import int8_linear_reference, int8_vectorwise, int_mm_reference, row_codes
from lmlab.quant.kernels import cpu, int8_cpu
from lmlab.quant.kernels import cuda as cuda_kernels

lmlab_ops = torch.ops.lmlab

# (shape, block_size): whole blocks, a partial last block, fewer elements than a block, odd count
CASES = [((4, 64), 64), ((5, 30), 64), ((3,), 32), ((7, 9), 32)]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _weight(shape, dtype, seed=0):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2).to(dtype)


@pytest.mark.parametrize(
    "shape,block_size,dtype", [(*case, dtype) for case, dtype in zip(CASES, DTYPES * 2, strict=False)]
)
def test_opcheck_quantize_and_dequantize(shape, block_size, dtype):
    w = _weight(shape, dtype)
    torch.library.opcheck(lmlab_ops.quantize_4bit, (w, "nf4", block_size))
    packed, absmax = lmlab_ops.quantize_4bit(w, "fp4", block_size)
    torch.library.opcheck(lmlab_ops.dequantize_4bit, (packed, absmax, "fp4", block_size, list(shape), dtype))
    out = torch.empty(shape, dtype=dtype)
    torch.library.opcheck(lmlab_ops.dequantize_4bit_out, (packed, absmax, "fp4", block_size, out))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_linear_4bit_with_its_input_gradient(dtype):
    w = _weight((6, 40), torch.float32)
    packed, absmax = lmlab_ops.quantize_4bit(w, "nf4", 32)  # 240 = 7.5 blocks: a partial one
    x = torch.randn(3, 40).to(dtype).requires_grad_(True)
    bias = torch.randn(6).to(dtype)
    torch.library.opcheck(lmlab_ops.linear_4bit, (x, packed, absmax, "nf4", 32, [6, 40], bias))
    torch.library.opcheck(lmlab_ops.linear_4bit, (x, packed, absmax, "nf4", 32, [6, 40], None))


def test_opcheck_the_double_quantized_forms():
    """The decoding ops take double-quantized scales as stored (a device kernel decodes them inside)."""
    w = _weight((6, 64), torch.float32)
    q = quantize_4bit(w, "nf4", 32, double_quant=True)
    nested = (q.offset, q.nested_absmax, q.nested_code, 256)
    torch.library.opcheck(lmlab_ops.quantize_blockwise_8bit, (torch.randn(300), q.nested_code, 256))
    torch.library.opcheck(
        lmlab_ops.dequantize_4bit, (q.packed, q.absmax, "nf4", 32, [6, 64], torch.float32, *nested)
    )
    out = torch.empty(6, 64)
    torch.library.opcheck(lmlab_ops.dequantize_4bit_out, (q.packed, q.absmax, "nf4", 32, out, *nested))
    lmlab_ops.dequantize_4bit_out(q.packed, q.absmax, "nf4", 32, out, *nested)
    assert torch.equal(out, dequantize_4bit(q, impl="reference"))
    x = torch.randn(3, 64, requires_grad=True)
    torch.library.opcheck(lmlab_ops.linear_4bit, (x, q.packed, q.absmax, "nf4", 32, [6, 64], None, *nested))
    y = lmlab_ops.linear_4bit(x, q.packed, q.absmax, "nf4", 32, [6, 64], None, *nested)
    assert torch.equal(y, x @ dequantize_4bit(q, impl="reference").t())


def test_opcheck_int8_ops():
    w_q, w_scale = int8_vectorwise(torch.randn(12, 16))
    a, _ = int8_vectorwise(torch.randn(5, 16))
    torch.library.opcheck(lmlab_ops.int8_mm, (a, w_q))
    x = torch.randn(5, 16, requires_grad=True)
    x.data[:, 3] = 8.0  # an outlier column
    torch.library.opcheck(lmlab_ops.int8_linear, (x, w_q, w_scale, 6.0))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("shape,block_size", [*CASES, ((33, 128), 128)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_registered_cpu_kernel_equals_the_reference(quant_type, shape, block_size, dtype):
    w = _weight(shape, dtype, seed=1)
    ref_packed, ref_absmax = blockwise.quantize_4bit_reference(w, quant_type, block_size)
    for packed, absmax in (
        cpu.quantize_4bit(w, quant_type, block_size),  # the kernel itself
        lmlab_ops.quantize_4bit(w, quant_type, block_size),  # what the op dispatches to on CPU
    ):
        assert torch.equal(packed, ref_packed) and torch.equal(bits(absmax), bits(ref_absmax))
    for out_dtype in DTYPES:
        ref = blockwise.dequantize_4bit_reference(
            ref_packed, ref_absmax, quant_type, block_size, shape, out_dtype
        )
        got = cpu.dequantize_4bit(ref_packed, ref_absmax, quant_type, block_size, list(shape), out_dtype)
        assert torch.equal(bits(got), bits(ref))
        assert torch.equal(
            bits(lmlab_ops.dequantize_4bit(ref_packed, ref_absmax, quant_type, block_size, shape, out_dtype)),
            bits(ref),
        )


def test_op_default_is_the_reference():
    # The op's own body (CompositeExplicitAutograd) is what runs on a device without a kernel.
    w = _weight((5, 30), torch.float32)
    packed, absmax = ops.quantize_4bit._init_fn(w, "nf4", 64)
    ref_packed, ref_absmax = blockwise.quantize_4bit_reference(w, "nf4", 64)
    assert torch.equal(packed, ref_packed) and torch.equal(absmax, ref_absmax)
    a, _ = int8_vectorwise(torch.randn(4, 8))
    assert torch.equal(ops.int8_mm._init_fn(a, a), int_mm_reference(a, a))


def test_impl_switch():
    w = _weight((8, 64), torch.float32)
    for impl in ("auto", "reference", "fast"):
        q = quantize_4bit(w, impl=impl)
        assert torch.equal(bits(dequantize_4bit(q, impl=impl)), bits(dequantize_4bit(q, impl="reference")))
    with pytest.raises(LmlabError, match="impl must be one of"):
        quantize_4bit(w, impl="fastest")
    w_q, w_scale = int8_vectorwise(torch.randn(4, 8))
    x = torch.randn(2, 8)
    x[:, 1] = 7.0  # an outlier column
    ref = int8_matmul(x, w_q, w_scale, impl="reference")
    for impl in ("auto", "fast"):  # int8 has a CPU kernel: "fast" applies, bit-identical
        assert torch.equal(bits(int8_matmul(x, w_q, w_scale, impl=impl)), bits(ref))


def test_decoded_absmax_of_double_quant_is_the_state_s():
    q = quantize_4bit(_weight((40, 64), torch.float32), double_quant=True)
    absmax = decoded_absmax(q.absmax, q.offset, q.nested_absmax, q.nested_code, q.nested_block_size)
    w = blockwise.dequantize_4bit_reference(q.packed, absmax, "nf4", 64, q.shape, torch.float32)
    assert torch.equal(bits(dequantize_4bit(q)), bits(w))


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_reference_and_op_layers_agree_with_gradients(kind):
    torch.manual_seed(0)
    lin = nn.Linear(64, 24)
    make = Linear4bit.from_linear if kind == "4bit" else Linear8bit.from_linear
    layers = [make(lin, impl=impl) for impl in ("auto", "reference")]
    x = torch.randn(5, 64)
    x[:, 2] = 9.0
    grads = []
    for layer in layers:
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        y.pow(2).sum().backward()
        grads.append((y.detach(), xi.grad))
    assert torch.equal(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 16)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _lmlab_nodes(model: nn.Module, x: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    """The lmlab ops in the graph torch.compile(fullgraph=True) captures, and the compiled output."""
    seen: list[str] = []

    def backend(gm: torch.fx.GraphModule, example_inputs):
        for node in gm.graph.nodes:
            if node.op == "call_function" and str(node.target).startswith("lmlab."):
                seen.append(str(node.target))
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(model, backend=backend, fullgraph=True)(x)
    return seen, out


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_compiled_model_holds_one_lmlab_op_per_layer(kind):
    torch.manual_seed(0)
    model = _Tiny()
    for name in ("up", "down"):
        lin = getattr(model, name)
        q = Linear4bit.from_linear(lin, double_quant=True) if kind == "4bit" else Linear8bit.from_linear(lin)
        setattr(model, name, q)
    x = torch.randn(4, 32)
    seen, out = _lmlab_nodes(model, x)
    op = "lmlab.linear_4bit.default" if kind == "4bit" else "lmlab.int8_linear.default"
    assert seen == [op, op]
    assert torch.equal(out, model(x))


@pytest.mark.slow
def test_aot_eager_compile_gives_the_eager_result_and_gradient():
    torch.manual_seed(0)
    model = _Tiny()
    model.up = Linear4bit.from_linear(model.up)
    model.down = Linear8bit.from_linear(model.down)
    x = torch.randn(4, 32, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    y.sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    y2 = model(x2)
    y2.sum().backward()
    assert torch.equal(y, y2)
    assert torch.equal(x.grad, x2.grad)


@pytest.mark.gpu
def test_cuda_kernels_dispatch_and_equal_the_reference():
    a, _ = int8_vectorwise(torch.randn(32, 64))
    b, b_scale = int8_vectorwise(torch.randn(16, 64))
    assert torch.equal(lmlab_ops.int8_mm(a.cuda(), b.cuda()).cpu(), int_mm_reference(a, b))
    torch.library.opcheck(lmlab_ops.int8_mm, (a.cuda(), b.cuda()))
    x = torch.randn(32, 64)
    got = int8_matmul(x.cuda(), b.cuda(), b_scale.cuda(), impl="fast").cpu()
    torch.testing.assert_close(got, int8_matmul(x, b, b_scale, impl="reference"), rtol=1e-6, atol=1e-6)
    # the 4-bit ops: Triton kernels where triton is installed, else their reference body ("auto")
    w = _weight((5, 30), torch.float32)
    packed, absmax = lmlab_ops.quantize_4bit(w.cuda(), "nf4", 64)
    ref_packed, ref_absmax = blockwise.quantize_4bit_reference(w, "nf4", 64)
    assert torch.equal(packed.cpu(), ref_packed) and torch.equal(absmax.cpu(), ref_absmax)
    if cuda_kernels.kernel_available("quantize_4bit"):
        assert torch.equal(quantize_4bit(w.cuda(), impl="fast").packed.cpu(), ref_packed)
    else:
        with pytest.raises(LmlabError, match="no quantize_4bit kernel for cuda"):
            quantize_4bit(w.cuda(), impl="fast")


def _int64_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.long()[:, None, :] * b.long()[None, :, :]).sum(-1).to(torch.int32)  # (M, N), exact


def _int8_operands():
    """(a, b) pairs: K under, at and over the float32 limit (1024), not multiples of it; random,
    all +-127 (partial sums far past 2**24), and -128."""
    g = torch.Generator().manual_seed(5)
    for k in (1, 1000, 1025, 3001):
        yield (
            torch.randint(-128, 128, (3, k), generator=g, dtype=torch.int8),
            torch.randint(-128, 128, (5, k), generator=g, dtype=torch.int8),
        )
        yield (
            torch.randint(-30, 31, (2, k), generator=g, dtype=torch.int8),
            torch.full((2, k), -128, dtype=torch.int8),
        )  # small activations: one float32 GEMM even past K = 1024 (the L1 bound)
    extreme = torch.full((2, 2049), 127, dtype=torch.int8)
    extreme[1, ::2] = -127
    yield extreme, torch.full((3, 2049), 127, dtype=torch.int8)  # 2049 * 127**2 > 2**24, odd


@pytest.mark.parametrize("method", ["auto", "native", "float32", "int_mm", "float64"])
def test_every_cpu_int8_method_is_exact(method, monkeypatch):
    monkeypatch.setattr(int8_cpu, "METHOD", method)
    for a, b in _int8_operands():
        want = _int64_product(a, b)
        assert torch.equal(int8_cpu.int8_mm(a, b), want), (method, a.shape)
        assert torch.equal(lmlab_ops.int8_mm(a, b), want)
        got = int8_cpu.exact_product_float32(a.float(), b)  # what int8_linear uses: want.float()
        assert torch.equal(bits(got), bits(want.float()))


@pytest.mark.parametrize("method", ["native", "float32", "int_mm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_int8_linear_is_bit_identical_to_the_reference(method, dtype, monkeypatch):
    monkeypatch.setattr(int8_cpu, "METHOD", method)
    g = torch.Generator().manual_seed(6)
    for k, threshold in ((40, 0.0), (40, 6.0), (1500, 6.0)):
        w_q, w_scale = int8_vectorwise(torch.randn(24, k, generator=g))
        x = torch.randn(2, 3, k, generator=g)
        x[..., 3] *= 20  # an outlier column
        x[0, 0] = 0.0  # an all-zero row
        x = x.to(dtype)
        got = int8_cpu.int8_linear(x, w_q, w_scale, threshold)
        want = int8_linear_reference(x, w_q, w_scale, threshold)
        assert got.dtype == dtype and got.shape == (2, 3, 24)
        assert torch.equal(bits(got), bits(want)), (k, threshold)


def test_cpu_int8_method_switch_is_checked(monkeypatch):
    monkeypatch.setattr(int8_cpu, "METHOD", "float16")
    with pytest.raises(ValueError, match="METHOD must be one of"):
        int8_cpu.method()


def _native_int8():
    if not int8_cpu.native_available():
        pytest.skip("lmlab.quant.kernels._cpu8bit is not built (no C compiler at install)")


@pytest.mark.parametrize("k", [1, 7, 40, 1500])
def test_native_int8_row_codes_equal_the_torch_ones(k):
    _native_int8()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(9, k, generator=g)
    x[0] = 0.0  # an all-zero row: scale 0, codes 0
    x[1] = -x[1].abs()  # -0.0 codes in the product
    x[2] = x[2].to(torch.bfloat16).float()  # bfloat16 inputs hit x * (127 / scale) = n + 0.5 - ulp
    x[3, 0] = 1e-30  # a tiny row: 127 / scale is still finite
    x[3, 1:] = 0.0
    codes, scale, l1, _, top, colmax = int8_cpu._native_codes(x, columns=True)
    want_codes, want_scale = row_codes(x)
    assert torch.equal(bits(codes), bits(want_codes)) and torch.equal(scale, want_scale)
    assert torch.equal(l1, want_codes.abs().sum(dim=1))
    assert top == float(want_scale.max()) and torch.equal(colmax, x.abs().amax(dim=0))
    none, scale16, l1_16, codes16, *_ = int8_cpu._native_codes(x, int16=True)
    assert none is None and torch.equal(codes16, want_codes.to(torch.int16))
    assert torch.equal(scale16, want_scale) and torch.equal(l1_16, l1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e-39])
def test_native_int8_row_codes_leave_odd_rows_to_torch(bad):
    _native_int8()
    x = torch.randn(4, 33)
    x[2] = 0.0
    x[2, 5] = bad  # NaN / inf absmax, or 127 / absmax overflowing float32
    assert int8_cpu._native_codes(x) is None
    w_q, w_scale = int8_vectorwise(torch.randn(5, 33))
    got = int8_cpu.int8_linear(x, w_q, w_scale, 0.0)
    assert torch.equal(bits(got), bits(int8_linear_reference(x, w_q, w_scale, 0.0)))


@pytest.mark.parametrize("threads", [1, 3])
def test_native_int8_passes_are_bit_identical_with_and_without_threads(threads, monkeypatch):
    _native_int8()
    g = torch.Generator().manual_seed(8)
    x = torch.randn(300, 384, generator=g)  # 300 * 384 > 2**15: the rows are split over threads
    x[:, 3] *= 20
    w_q, w_scale = int8_vectorwise(torch.randn(200, 384, generator=g))
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = int8_cpu.int8_linear(x, w_q, w_scale, 6.0)
        monkeypatch.setattr(int8_cpu, "NATIVE", False)
        torch_path = int8_cpu.int8_linear(x, w_q, w_scale, 6.0)
    finally:
        torch.set_num_threads(old)
    want = int8_linear_reference(x, w_q, w_scale, 6.0)
    assert torch.equal(bits(got), bits(want)) and torch.equal(bits(torch_path), bits(want))


def test_native_int8_gemm_tiles_and_tails(monkeypatch):
    """Every tile shape of the compiled int16 x int8 GEMM (4 x 2 full tiles, row / column / K tails),
    rescaled and raw int32, against the reference."""
    _native_int8()
    monkeypatch.setattr(int8_cpu, "METHOD", "native")
    g = torch.Generator().manual_seed(9)
    for m, n, k in ((1, 1, 1), (4, 2, 16), (7, 5, 33), (9, 3, 47), (5, 201, 400)):
        x = torch.randn(m, k, generator=g)
        w_q, w_scale = int8_vectorwise(torch.randn(n, k, generator=g))
        got = int8_cpu.int8_linear(x, w_q, w_scale, 0.0)
        assert torch.equal(bits(got), bits(int8_linear_reference(x, w_q, w_scale, 0.0))), (m, n, k)
        a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
        assert torch.equal(int8_cpu.int8_mm(a, w_q), _int64_product(a, w_q)), (m, n, k)


@pytest.mark.parametrize("method", ["native", "float32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_int8_linear_bias_is_the_modules_sum(method, dtype, monkeypatch):
    """The kernel's bias (fused into the GEMM's store for float32 without outliers) gives the bits of
    ``reference + bias``, as Linear8bit adds it."""
    monkeypatch.setattr(int8_cpu, "METHOD", method)
    g = torch.Generator().manual_seed(10)
    w_q, w_scale = int8_vectorwise(torch.randn(13, 50, generator=g))
    bias = torch.randn(13, generator=g)
    for threshold in (0.0, 6.0):
        x = torch.randn(7, 50, generator=g)
        x[:, 4] *= 20
        x = x.to(dtype)
        got = int8_cpu.int8_linear(x, w_q, w_scale, threshold, bias)
        want = int8_linear_reference(x, w_q, w_scale, threshold) + bias.to(dtype)
        assert got.dtype == dtype and torch.equal(bits(got), bits(want)), threshold
