"""The CPU kernels of ``lmlab::int8_mm`` and ``lmlab::int8_linear`` (registered in :mod:`lmlab.quant.ops`).

The int8 x int8 product must be exact (int32 accumulation, LLM.int8() §3.1). Four exact methods:

* ``"native"`` -- the compiled int16 x int8 GEMM of ``_cpu8bit.c`` (AVX2 ``vpmaddwd``: 16 products
  summed pairwise into int32 lanes per instruction, the way oneDNN / FBGEMM build int8 GEMMs on CPUs
  without VNNI; 4 x 2 register tiles, 64 activation rows kept in L2 while the int8 weight rows stream
  past, weight rows split over torch's OpenMP threads, or pthreads). Its sums are int32, exact for ``K < 2**17`` with no bound
  on the activations, and the int8 weight is read as int8: no float32 copy of it is ever made. The
  dequantization (``int32.float() * sx[i] * (SCB[j] / 127**2)``, the reference's two float32
  multiplies in its order) happens in the tile's store.
* ``"float32"`` -- a float32 GEMM (MKL / oneDNN) of the codes. Every product of two int8 values is
  an integer of at most 128 * 128 = 2**14, and every partial sum a GEMM forms, in whatever order or
  blocking, is bounded by ``sum_k |a_k| * 128``; while that is at most 2**24 every partial sum is an
  integer float32 represents, so no rounding happens anywhere. That holds for any ``K <= 1024``, and
  for longer rows whose L1 norm ``sum_k |a_k|`` is at most 2**17 (the compiled codes pass returns it
  at no cost; otherwise one pass over the activations tells); otherwise ``K`` is cut into blocks of
  1024 whose exact partial products are summed as int32. (The codes are also exact in bfloat16 and
  TF32, so a reduced-precision float32 matmul setting keeps it exact.)
* ``"int_mm"`` -- ``torch._int_mm`` (exact int32, oneDNN's int8 GEMM where the CPU has VNNI);
* ``"float64"`` -- :func:`lmlab.quant.int8.int_mm_reference`, the op's default body.

``"auto"`` picks ``"int_mm"`` on CPUs torch runs with AVX-512 (bitsandbytes 0.50's criterion for
registering ``_int_mm`` on CPU; not measured here), ``"native"`` where ``_cpu8bit`` is built, and
``"float32"`` everywhere else; ``"native"`` itself falls back to ``"float32"`` on a CPU without AVX2
or past ``K = 2**17``. ``METHOD`` is the switch (tests flip it to hold every method to the
reference); ``NATIVE = False`` turns the compiled passes off altogether (the torch route).

Measured on the 2-core AVX2 AMD EPYC (Zen 3: no AVX-512, no VNNI) this was written on, shared with
other jobs; one thread, best of 31 interleaved runs, ms; the product only (activation codes given),
beside float32 ``F.linear`` on the float weight::

    M x K x N           native   float32 route *  (float32 F.linear)
    544 x 384 x 1536      6.77       9.18             8.37
    544 x 1536 x 384      6.16       9.52             8.32
    544 x 384 x 384       1.70       2.43             2.07
    17 x 384 x 1536       0.236      0.551            0.387
    3 x 384 x 1536        0.096      0.335            0.196
    1 x 1536 x 384        0.042      0.224            0.064

(* the whole ``int8_linear`` on the float32 route, codes and rescale included.) ``_int_mm``
without VNNI is a scalar loop (93 ms at 544 x 384 x 384). The float32 route cannot beat the
float32 layer on such a CPU (it *is* a float32 GEMM of the same size, plus the weight's
conversion); the int16 route does: the weight is 4x smaller to stream and ``vpmaddwd`` does
twice the products of an FMA per instruction.

``int8_linear`` fuses the layer: one compiled pass per activation row gives its absmax, its codes
(as integer-valued float32 and as int16, the same values as :func:`lmlab.quant.int8.row_codes`,
whose ``127 / scale`` torch evaluates as ``reciprocal(scale) * 127``; kept), their L1 norm and the
largest absmax (below the threshold: no outlier search at all); the outlier columns are those of
the reference. Its output is bit-identical to :func:`lmlab.quant.int8.int8_linear_reference`'s,
because the integer product is exact on every route and every other step rounds the same way.
Rows whose absmax is NaN, inf or tiny (``127 / absmax`` overflows) take the torch route. The
compiled library is built by ``pip install -e .`` where a C compiler exists and loaded through
ctypes (which releases the GIL) on first use; without it every step is the torch one.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from lmlab.quant.int8 import (
    add_outlier_product,
    dequantize_product_,
    int_mm_reference,
    outlier_columns,
    row_absmax,
    row_codes,
)

METHODS = ("auto", "native", "float32", "int_mm", "float64")
METHOD = "auto"

EXACT_K = 1024  # K * 128 * 128 <= 2**24: a float32 dot product of int8 values is exact
EXACT_SUM = float(2**24)


@functools.cache
def _auto_method() -> str:
    # Asked on the first call, never at import.
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        return "int_mm"
    return "native" if native_available() else "float32"


def method() -> str:
    """The exact method the CPU kernels use now (``METHOD``, with ``"auto"`` resolved)."""
    if METHOD not in METHODS:
        raise ValueError(f"lmlab.quant.kernels.int8_cpu.METHOD must be one of {METHODS}, got {METHOD!r}")
    return _auto_method() if METHOD == "auto" else METHOD


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled passes (``_cpu8bit.c``), loaded on first use; None where they were not built."""
    from lmlab.quant.kernels.native import load_extension

    lib = load_extension("_cpu8bit")
    if lib is None:
        return None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.lmlab_int8_row_codes.argtypes = [p, i64, i64, p, p, p, p, p, p, i32]
    lib.lmlab_int8_row_codes.restype = i32
    lib.lmlab_int8_rescale.argtypes = [p, i64, i64, p, p, i32]
    lib.lmlab_int8_rescale.restype = i32
    lib.lmlab_int8_gemm.argtypes = [p, p, i64, i64, i64, p, p, p, p, i32]
    lib.lmlab_int8_gemm.restype = i32
    return lib


_NO_COLUMNS = torch.empty(0, dtype=torch.long)
NATIVE_K = 2**17  # the int16 GEMM's int32 sums are exact below this K
NATIVE = True  # tests switch the compiled passes off to hold the torch path too


def _threads() -> int:
    return max(1, min(torch.get_num_threads(), 64))


def native_available() -> bool:
    """Whether the compiled passes load (built from ``_cpu8bit.c`` where a C compiler exists)."""
    return _library() is not None


def _native_codes(x2d: torch.Tensor, int16: bool = False, columns: bool = False) -> tuple | None:
    """:func:`lmlab.quant.int8.row_codes` of contiguous float32 ``x2d (M, K)`` in one pass, with the
    row L1 norms of the codes, the codes as int16 too where ``int16``, the largest row absmax (a
    Python float) and, where ``columns``, every column's ``max |x|`` (``(K,)``, else None):
    ``(codes, scale, l1, codes16 or None, top, colmax or None)``; with ``int16`` the float32 codes
    are not written (``codes`` is None: the int16 GEMM needs only those). None (nothing written) where the
    compiled passes are missing or a row needs the torch path (an absmax that is NaN, inf or below
    ``127 / FLT_MAX``)."""
    lib = _library() if NATIVE else None
    if lib is None or x2d.dtype != torch.float32 or not x2d.is_contiguous() or x2d.device.type != "cpu":
        return None
    m, k = x2d.shape
    codes = None if int16 else torch.empty_like(x2d)
    scale = x2d.new_empty(m)
    l1 = x2d.new_empty(m)
    codes16 = torch.empty(x2d.shape, dtype=torch.int16) if int16 else None
    colmax = x2d.new_zeros(k) if columns else None
    top = ctypes.c_float(0.0)
    ptrs = (None if int16 else codes.data_ptr(), scale.data_ptr(), l1.data_ptr())
    ptrs += (codes16.data_ptr() if int16 else None,)
    ptrs += (ctypes.byref(top), colmax.data_ptr() if columns else None, _threads())
    if lib.lmlab_int8_row_codes(x2d.data_ptr(), m, k, *ptrs):
        return None
    return codes, scale, l1, codes16, top.value, colmax


def _rescale_(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """:func:`lmlab.quant.int8.dequantize_product_` (the same two float32 multiplies per element, in
    the same order), in one pass where the compiled passes exist."""
    lib = _library() if NATIVE else None
    if lib is None or not (acc.is_contiguous() and acc.dtype == torch.float32 and x_scale.is_contiguous()):
        return dequantize_product_(acc, x_scale, w_scale)
    wsk = (w_scale.float().unsqueeze(0) * (1.0 / (127.0 * 127.0))).contiguous()
    m, n = acc.shape
    lib.lmlab_int8_rescale(acc.data_ptr(), m, n, x_scale.data_ptr(), wsk.data_ptr(), _threads())
    return acc


def _native_gemm(
    codes16: torch.Tensor,
    w_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The rescaled exact product (``dequantize_product_(int32_product.float(), ...)``, plus the
    float32 ``bias`` where given) by the compiled int16 x int8 GEMM, or None where it cannot run."""
    lib = _library()
    m, k = codes16.shape
    n = w_q.shape[0]
    w_q = w_q.contiguous()
    wsk = (w_scale.float().unsqueeze(0) * (1.0 / (127.0 * 127.0))).contiguous()
    out = torch.empty(m, n)
    b = bias.data_ptr() if bias is not None else None
    ptrs = (x_scale.data_ptr(), wsk.data_ptr(), b, out.data_ptr(), _threads())
    if lib.lmlab_int8_gemm(codes16.data_ptr(), w_q.data_ptr(), m, n, k, *ptrs):
        return None
    return out


def _fits_float32(a: torch.Tensor, n: int) -> bool:
    """Whether one float32 GEMM of ``a (M, K)`` (integer-valued) with ``n`` int8 rows is exact.

    Past ``K = 1024`` the L1 bound costs a pass over ``a``; it is only asked where that pass is
    cheaper than the blocked route's int32 epilogues (two passes over ``(M, n)`` per block)."""
    k = a.shape[1]
    if k <= EXACT_K or a.shape[0] == 0:
        return True
    if k >= 2 * n * -(-k // EXACT_K):
        return False
    return bool(a.abs().sum(dim=1).max() * 128.0 <= EXACT_SUM)


def _blocked_int32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a (M, K) @ b (N, K).T`` as int32, ``K`` in blocks of ``EXACT_K`` (each float32 GEMM exact)."""
    acc = None
    for k0 in range(0, a.shape[1], EXACT_K):
        part = (a[:, k0 : k0 + EXACT_K] @ b[:, k0 : k0 + EXACT_K].float().t()).to(torch.int32)
        acc = part if acc is None else acc.add_(part)
    return acc


def exact_product_float32(a: torch.Tensor, b: torch.Tensor, l1: torch.Tensor | None = None) -> torch.Tensor:
    """``a (M, K) @ b (N, K).T`` for integer-valued float32 ``a`` (|a| <= 128) and int8 ``b``, as
    float32 equal to ``int32_product.float()`` (exact below 2**24, rounded to nearest above).
    ``l1``: the row L1 norms of ``a`` where the caller has them (then no pass over ``a`` is needed)."""
    if a.shape[1] > EXACT_K and l1 is not None and a.shape[0]:
        fits = bool(l1.max() * 128.0 <= EXACT_SUM)
    else:
        fits = _fits_float32(a, b.shape[0])
    if fits:
        return a @ b.float().t()  # (M, N)
    return _blocked_int32(a, b).float()


def _int8_mm_native(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    lib = _library()
    if lib is None:
        return None
    a16 = a.to(torch.int16).contiguous()
    b = b.contiguous()
    out = torch.empty(a.shape[0], b.shape[0], dtype=torch.int32)
    m, k = a16.shape
    if lib.lmlab_int8_gemm(
        a16.data_ptr(), b.data_ptr(), m, b.shape[0], k, None, None, None, out.data_ptr(), _threads()
    ):
        return None
    return out


def int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """CPU kernel of ``lmlab::int8_mm``: ``a (M, K) int8 @ b (N, K).T -> (M, N) int32``, exact."""
    how = method()
    if how == "int_mm":
        return torch._int_mm(a, b.t())
    if how == "float64":
        return int_mm_reference(a, b)
    if how == "native" and (out := _int8_mm_native(a, b)) is not None:
        return out
    af = a.float()
    return (af @ b.float().t()).to(torch.int32) if _fits_float32(af, b.shape[0]) else _blocked_int32(af, b)


def int8_linear(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    threshold: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """CPU kernel of ``lmlab::int8_linear``: ``x (..., K) -> (..., N)`` in ``x.dtype``.

    ``bias`` ``(N,)``: the result is bit-identical to ``int8_linear_reference(...) + bias.to(x.dtype)``
    (the module's sum); for a float32 ``x`` without outlier columns the add happens in the GEMM's store.
    """
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1]).float().contiguous()  # (M, K); not modified below
    how = method()
    int16 = how == "native" and x2d.shape[1] < NATIVE_K
    # codes, scales, row L1 norms (and int16 codes, column max |x|) in one pass
    native = _native_codes(x2d, int16, columns=threshold > 0)
    if native is None:
        scale = row_absmax(x2d)  # (M,): also tells that most inputs hold no outlier at all
        cols = outlier_columns(x2d, threshold, row_max=scale)
    elif 0 < threshold <= native[4]:  # some |x| reaches the threshold: outlier_columns' columns
        cols = (native[5] >= threshold).nonzero().view(-1)
    else:
        cols = _NO_COLUMNS
    if cols.numel():
        regular = x2d.index_fill(1, cols, 0.0)
        native = _native_codes(regular, int16)
    if native is None:
        codes, x_scale = row_codes(regular) if cols.numel() else row_codes(x2d, scale)
        l1 = codes16 = None
    else:
        codes, x_scale, l1, codes16, *_ = native
    fuse = bias is not None and x.dtype == torch.float32 and not cols.numel()
    b32 = bias.to(torch.float32).contiguous() if fuse else None
    out = _native_gemm(codes16, w_q, x_scale, w_scale, b32) if codes16 is not None else None
    if out is not None and fuse:
        bias = None  # added
    if out is None:
        if codes is None:
            codes = codes16.float()
        if how in ("native", "float32"):
            acc = exact_product_float32(codes, w_q, l1)
        else:
            acc = int8_mm(codes.to(torch.int8), w_q).float()
        out = _rescale_(acc, x_scale, w_scale)
    out = add_outlier_product(out, x2d, cols, w_q, w_scale).to(x.dtype)
    if bias is not None:
        out = out.add_(bias.to(out.dtype))  # out is this call's own tensor
    return out.reshape(*lead, w_q.shape[0])
