"""The compiled CPU 4-bit kernel (``_cpu4bit.c``) behind the blockwise NF4 / FP4 / int4 ops.

One C loop per direction, over whole blocks, split into chunks that ``threads`` pthreads take from
an atomic counter: a thread whose core another process holds delays only its current chunk, where
the torch fast path runs a handful of OpenMP regions per chunk and every region waits for the
slowest worker. The arithmetic is the torch fast path's (:mod:`lmlab.quant.kernels.cpu`), so the
output is bit-identical to it and to the reference of :mod:`lmlab.quant.blockwise`
(``tests/quant/kernels/test_native.py`` holds it to both):

* quantize: per block, ``absmax = max |x|`` (+0.0 for an all-zero block, NaN / inf when the block
  holds one) fused with the codes ``slot = low[j] + (s > mid[j])``, ``j = trunc(K + K * s)``,
  ``s = x * (1 / max(absmax, 1e-38))`` in float32, on the grid tables the caller passes in
  (:mod:`lmlab.quant.codebooks` ``_grid_tables``, and ``_slot_byte_to_code_byte`` where the
  codebook is not sorted), so a new 4-bit format needs no C change;
* dequantize: a 256-entry table of value pairs (``_pair_table``) times the block's absmax, written
  as float32, bfloat16 or float16 with round-to-nearest-even as torch's float32 copy does;
* :func:`all_finite`: the NaN / inf check of the absmax on the calling thread.

Measured on 2 AVX2 cores, 4096^2 float32, block 64 (``bench/quant_cpu.py``): quantize about 20 ms on
2 threads, dequantize into a fresh output about 13 ms, against bitsandbytes' 0.4 s and 0.04 s; with
one core held by another process it stays faster than bitsandbytes on both.

The library is built by ``pip install -e .`` when a C compiler exists (``setup.py``, optional) and is
loaded through ctypes on first use, never at import; ctypes releases the GIL for the call. Where it
is missing, or cannot run the given inputs, the functions return False and write nothing, and the
caller takes the torch path.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util

import torch

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_P = ctypes.c_void_p
_I64 = ctypes.c_int64


def load_extension(name: str) -> ctypes.CDLL | None:
    """The compiled kernel ``lmlab.quant.kernels.<name>`` (built by setup.py) through ctypes, which
    releases the GIL around each call; None where it was not built or does not load."""
    spec = importlib.util.find_spec(f"lmlab.quant.kernels.{name}")
    if spec is None or not spec.origin:
        return None
    try:
        return ctypes.CDLL(spec.origin)
    except OSError:
        return None


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = load_extension("_cpu4bit")
    if lib is None:
        return None
    _INT = ctypes.c_int
    lib.lmlab_quantize_4bit.argtypes = [_P, _INT, _I64, _I64, _I64, _P, _P, _P, _P, _P, _INT, _INT]
    lib.lmlab_quantize_4bit.restype = ctypes.c_int
    lib.lmlab_dequantize_4bit.argtypes = [_P, _P, _P, _I64, _I64, _INT, _P, _INT, _INT]
    lib.lmlab_dequantize_4bit.restype = ctypes.c_int
    lib.lmlab_all_finite.argtypes = [_P, _I64]
    lib.lmlab_all_finite.restype = ctypes.c_int
    return lib


def available() -> bool:
    """Whether the compiled kernel loads (it is built by ``pip install -e .`` where a C compiler exists)."""
    return _library() is not None


def _is(t: object, dtype: torch.dtype, numel: int) -> bool:
    return (
        isinstance(t, torch.Tensor)
        and t.device.type == "cpu"
        and t.dtype == dtype
        and t.numel() == numel
        and t.is_contiguous()
    )


def _threads(threads: int) -> int:
    return max(1, min(int(threads), 256))


def quantize_4bit_blocks(
    w2d: torch.Tensor,
    k: int,
    low_table: torch.Tensor,
    mid_table: torch.Tensor,
    byte_map: torch.Tensor | None,
    packed_out: torch.Tensor,
    absmax_out: torch.Tensor,
    threads: int,
    *,
    plain: bool = False,
) -> bool:
    """Absmax and packed codes of whole blocks, in one pass over the weight.

    ``w2d``: ``(blocks, B)`` contiguous CPU float32 / float16 / bfloat16 (B even); ``k`` and the
    ``(2k+1,) float32`` ``low_table`` / ``mid_table`` as ``_grid_tables`` gives them; ``byte_map``:
    ``(256,) uint8`` slot byte -> code byte, or None where sorted slots are the codes. Writes
    ``packed_out (blocks*B//2,) uint8`` (first element in the high nibble) and ``absmax_out
    (blocks,) float32`` (a NaN or inf there means the block holds one; its codes are then
    meaningless). Returns False, writing nothing, when the library is missing or the inputs are not
    these. ``plain=True`` runs the plain-C loops where the CPU has AVX2 (for the tests: same bits).
    """
    lib = _library()
    if lib is None or not isinstance(w2d, torch.Tensor) or w2d.dim() != 2:
        return False
    blocks, block_size = w2d.shape
    k = int(k)
    if (
        w2d.dtype not in _DTYPE_CODES
        or not _is(w2d, w2d.dtype, blocks * block_size)
        or block_size < 2
        or block_size % 2
        or not 1 <= k <= 1 << 20
        or not _is(low_table, torch.float32, 2 * k + 1)
        or not _is(mid_table, torch.float32, 2 * k + 1)
        or not (byte_map is None or _is(byte_map, torch.uint8, 256))
        or not _is(packed_out, torch.uint8, blocks * block_size // 2)
        or not _is(absmax_out, torch.float32, blocks)
    ):
        return False
    if blocks == 0:
        return True
    rc = lib.lmlab_quantize_4bit(
        w2d.data_ptr(),
        _DTYPE_CODES[w2d.dtype],
        blocks,
        block_size,
        k,
        low_table.data_ptr(),
        mid_table.data_ptr(),
        None if byte_map is None else byte_map.data_ptr(),
        packed_out.data_ptr(),
        absmax_out.data_ptr(),
        _threads(threads),
        int(plain),
    )
    return rc == 0


def dequantize_4bit_blocks(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    pair_table: torch.Tensor,
    block_size: int,
    out: torch.Tensor,
    threads: int,
    *,
    plain: bool = False,
) -> bool:
    """Decode whole blocks: ``out[i] = value(code i) * absmax[i // block_size]``.

    ``packed``: ``(blocks*B//2,) uint8``; ``absmax``: ``(blocks,) float32`` (decoded); ``pair_table``:
    ``_pair_table``'s 256 pairs of float32 (the ``(256,) float64`` view, or ``(256, 2)`` / ``(512,)``
    float32); ``out``: ``(blocks*B,)`` contiguous float32, bfloat16 or float16, rounded to nearest
    even as torch's float32 copy rounds. Returns False, writing nothing, when the library is missing
    or the inputs are not these. ``plain=True`` as for :func:`quantize_4bit_blocks`.
    """
    lib = _library()
    if lib is None or not isinstance(absmax, torch.Tensor) or not isinstance(out, torch.Tensor):
        return False
    blocks, block_size = absmax.numel(), int(block_size)
    table_ok = (
        isinstance(pair_table, torch.Tensor)
        and pair_table.device.type == "cpu"
        and pair_table.is_contiguous()
        and pair_table.dtype in (torch.float64, torch.float32)
        and pair_table.numel() * pair_table.element_size() == 2048
    )
    if (
        not table_ok
        or block_size < 2
        or block_size % 2
        or out.dtype not in _DTYPE_CODES
        or not _is(out, out.dtype, blocks * block_size)
        or not _is(absmax, torch.float32, blocks)
        or not _is(packed, torch.uint8, blocks * block_size // 2)
    ):
        return False
    if blocks == 0:
        return True
    rc = lib.lmlab_dequantize_4bit(
        packed.data_ptr(),
        absmax.data_ptr(),
        pair_table.data_ptr(),
        blocks,
        block_size,
        _DTYPE_CODES[out.dtype],
        out.data_ptr(),
        _threads(threads),
        int(plain),
    )
    return rc == 0


def all_finite(t: torch.Tensor) -> bool | None:
    """Whether a contiguous CPU float32 tensor holds no NaN or inf, on the calling thread; None where
    the library is missing or ``t`` is not such a tensor (then ask torch). For the absmax check after
    quantizing: ``torch.isfinite(absmax).all()`` is two OpenMP regions, each of which waits for a
    preempted worker when another process holds a core (measured: 40-60 ms for 4096^2 / 64 blocks)."""
    lib = _library()
    if lib is None or not _is(t, torch.float32, t.numel() if isinstance(t, torch.Tensor) else -1):
        return None
    return bool(lib.lmlab_all_finite(t.data_ptr(), t.numel()))
