"""The CPU kernels of ``lmlab::quantize_4bit`` / ``lmlab::dequantize_4bit`` (registered in :mod:`lmlab.quant.ops`).

Whole blocks go to the compiled kernel of :mod:`lmlab.quant.kernels.native` where it is built, else
to the chunked torch path below; a trailing partial block goes to the reference
(:mod:`lmlab.quant.blockwise`), whose arithmetic for it is bitsandbytes' (``x / absmax``). Every
route is bit-identical to the reference.

The chunked torch path works in chunks that stay in cache, replaces the binary search by a
uniform-grid lookup (one exact comparison per element, see
:func:`lmlab.quant.codebooks._grid_tables`) and decodes whole bytes through a 256-entry table of
value pairs. Each chunk costs a handful of torch ops, each one OpenMP parallel region; on a machine
where other processes hold the cores those regions wait for a preempted worker, which the compiled
kernel (one parallel region per call) does not.
"""

from __future__ import annotations

import math

import torch

from lmlab.quant.blockwise import dequantize_4bit_reference, quantize_4bit_reference
from lmlab.quant.codebooks import _grid_tables, _pair_table, _slot_byte_to_code_byte, _sorted_tables
from lmlab.quant.kernels import native
from lmlab.quant.kernels.hugepages import _advise_hugepages

CHUNK_ELEMENTS = (
    1 << 19
)  # 2 MiB of float32 per temporary: near L2, few parallel regions (measured 2^16..2^20)
HUGEPAGE_MIN_BYTES = 8 << 20


def _fast_absmax(w2d: torch.Tensor) -> torch.Tensor:
    # max |x| = max(max x, -min x): two cheap reductions instead of materialising |x|; abs_()
    # turns a -0.0 maximum (all-zero block) into +0.0 like the reference.
    return torch.maximum(w2d.amax(dim=1), w2d.amin(dim=1).neg()).float().abs_()


def _quantize_full_blocks_fast(
    w2d: torch.Tensor, absmax: torch.Tensor, quant_type: str, out: torch.Tensor
) -> None:
    """Codes of ``w2d (blocks, B)`` (any float dtype) into ``out (blocks * B // 2,) uint8``."""
    blocks, block_size = w2d.shape
    device = w2d.device
    k, low_table, mid_table = _grid_tables(quant_type, device)
    _, _, identity = _sorted_tables(quant_type, device)
    recip = absmax.clamp(min=1e-38).reciprocal_()
    k_tensor = torch.tensor(float(k), device=device)
    rows = max(1, CHUNK_ELEMENTS // block_size)
    m = min(rows, blocks) * block_size
    scaled_buf = torch.empty(m, device=device)
    grid_buf = torch.empty(m, device=device)
    index_buf = torch.empty(m, dtype=torch.int64, device=device)
    low_buf = torch.empty(m, device=device)
    mid_buf = torch.empty(m, device=device)
    byte_buf = torch.empty(m // 2, device=device)
    byte_index_buf = torch.empty(0 if identity else m // 2, dtype=torch.int64, device=device)
    byte_map = None if identity else _slot_byte_to_code_byte(quant_type, device)
    for r0 in range(0, blocks, rows):
        r1 = min(blocks, r0 + rows)
        n = (r1 - r0) * block_size
        s = scaled_buf[:n]
        torch.mul(w2d[r0:r1], recip[r0:r1, None], out=s.view(r1 - r0, block_size))  # (n,) in [-1, 1]
        g = torch.add(k_tensor, s, alpha=k, out=grid_buf[:n])  # K + K*s == fl(s + 1) * K exactly (K = 2^j)
        j = index_buf[:n]
        j.copy_(g)  # truncation toward zero: the cell index (int64: gathers of float32 run faster)
        low = torch.index_select(low_table, 0, j, out=low_buf[:n])
        mid = torch.index_select(mid_table, 0, j, out=mid_buf[:n])
        torch.gt(s, mid, out=mid)
        slots = low.add_(mid).view(-1, 2)  # (n/2, 2) sorted slots as float 0..15
        byte = torch.add(slots[:, 1], slots[:, 0], alpha=16, out=byte_buf[: n // 2])
        dst = out[r0 * block_size // 2 : r1 * block_size // 2]
        if identity:
            dst.copy_(byte)
        else:
            bi = byte_index_buf[: n // 2]
            bi.copy_(byte)
            torch.index_select(byte_map, 0, bi, out=dst)


def _empty_output(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(n, dtype=dtype, device=device)
    nbytes = n * out.element_size()
    if device.type == "cpu" and nbytes >= HUGEPAGE_MIN_BYTES:
        _advise_hugepages(out.data_ptr(), nbytes)
    return out


def _dequantize_full_blocks_fast(
    packed: torch.Tensor, absmax: torch.Tensor, quant_type: str, block_size: int, out: torch.Tensor
) -> None:
    """Decode ``packed (blocks * B // 2,) uint8`` into ``out (blocks * B,)`` of any float dtype."""
    device = packed.device
    table = _pair_table(quant_type, device)
    blocks = absmax.numel()
    rows = max(1, CHUNK_ELEMENTS // block_size)
    m = min(rows, blocks) * block_size
    # int32 indices: the uint8 -> int32 copy is half the traffic of int64, the gather as fast
    index_buf = torch.empty(m // 2, dtype=torch.int32, device=device)
    direct = out.dtype == torch.float32
    tmp_buf = None if direct else torch.empty(m, device=device)
    for r0 in range(0, blocks, rows):
        r1 = min(blocks, r0 + rows)
        n = (r1 - r0) * block_size
        j = index_buf[: n // 2]
        j.copy_(packed[r0 * block_size // 2 : r1 * block_size // 2])
        dst = out[r0 * block_size : r1 * block_size] if direct else tmp_buf[:n]
        torch.index_select(table, 0, j, out=dst.view(torch.float64))  # (n/2,) value pairs
        dst.view(-1, block_size).mul_(absmax[r0:r1, None])
        if not direct:
            out[r0 * block_size : r1 * block_size].copy_(dst)


def all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN or Inf: on the calling thread where the compiled kernel can (a
    torch reduction is OpenMP regions that wait for a preempted worker), else by torch."""
    ok = native.all_finite(t)
    return bool(torch.isfinite(t).all()) if ok is None else ok


def _quantize_full_blocks(
    w2d: torch.Tensor, quant_type: str, packed: torch.Tensor, absmax: torch.Tensor
) -> None:
    """Codes and absmax of whole blocks ``w2d (blocks, B)``: the compiled kernel, else chunked torch."""
    device = w2d.device
    k, low_table, mid_table = _grid_tables(quant_type, device)
    _, _, identity = _sorted_tables(quant_type, device)
    byte_map = None if identity else _slot_byte_to_code_byte(quant_type, device)
    threads = torch.get_num_threads()
    if native.quantize_4bit_blocks(w2d, k, low_table, mid_table, byte_map, packed, absmax, threads):
        return
    absmax.copy_(_fast_absmax(w2d))
    # A NaN or Inf scale would index the grid tables out of range; the caller refuses such a weight
    # from the absmax (max propagates them), so its codes may stay unwritten.
    if all_finite(absmax):
        _quantize_full_blocks_fast(w2d, absmax, quant_type, packed)


def quantize_4bit(w: torch.Tensor, quant_type: str, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU kernel of ``lmlab::quantize_4bit``: ``(packed ((n+1)//2, 1) uint8, absmax (blocks,) f32)``."""
    flat = w.detach().reshape(-1)
    n = flat.numel()
    full = n - n % block_size
    if full == 0:
        return quantize_4bit_reference(w, quant_type, block_size)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=w.device)
    absmax = torch.empty(-(-n // block_size), dtype=torch.float32, device=w.device)
    w2d = flat[:full].view(-1, block_size)  # (blocks, B)
    _quantize_full_blocks(w2d, quant_type, packed[: full // 2], absmax[: full // block_size])
    if full < n:
        tail_packed, tail_absmax = quantize_4bit_reference(flat[full:], quant_type, block_size)
        packed[full // 2 :] = tail_packed.reshape(-1)
        absmax[-1:] = tail_absmax
    return packed.reshape(-1, 1), absmax


def _dequantize_full_blocks(
    packed: torch.Tensor, absmax: torch.Tensor, quant_type: str, block_size: int, out: torch.Tensor
) -> None:
    table = _pair_table(quant_type, packed.device)
    if native.dequantize_4bit_blocks(packed, absmax, table, block_size, out, torch.get_num_threads()):
        return
    _dequantize_full_blocks_fast(packed, absmax, quant_type, block_size, out)


def dequantize_4bit_into(
    packed: torch.Tensor, absmax: torch.Tensor, quant_type: str, block_size: int, out: torch.Tensor
) -> None:
    """CPU kernel of ``lmlab::dequantize_4bit_out``: decode into contiguous ``out`` (its numel elements)."""
    flat = out.view(-1)
    n = flat.numel()
    full = n - n % block_size
    packed = packed.reshape(-1)
    absmax = absmax.float().contiguous()
    if full > 0:
        _dequantize_full_blocks(
            packed[: full // 2], absmax[: full // block_size], quant_type, block_size, flat[:full]
        )
    if full < n:
        flat[full:] = dequantize_4bit_reference(
            packed[full // 2 :], absmax[-1:], quant_type, block_size, (n - full,), out.dtype
        )


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_type: str,
    block_size: int,
    shape: list[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """CPU kernel of ``lmlab::dequantize_4bit``: ``shape`` of ``dtype`` (absmax decoded, float32)."""
    out = _empty_output(math.prod(shape), dtype, packed.device)
    dequantize_4bit_into(packed, absmax, quant_type, block_size, out)
    return out.view(shape)
