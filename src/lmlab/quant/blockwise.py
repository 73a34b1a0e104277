"""Blockwise 4-bit quantization (NF4 / FP4) with optional double quantization.

Dettmers et al. 2023, QLoRA §3: the weight is flattened row-major and cut into blocks of
``block_size`` values; each block is divided by its absolute maximum (kept in float32) and every
value is replaced by the index of the nearest codebook entry (ties go to the lower entry). Two
4-bit codes share a byte, the first element in the high nibble. *Double quantization* subtracts
the mean of the absmax vector and stores it with bitsandbytes' dynamic 8-bit map in blocks of 256
(4 + 32/64 = 4.5 bits per parameter become 4 + 8/64 + 32/(64*256) = 4.127).

The output is bit-identical to ``bitsandbytes.functional.quantize_4bit`` / ``dequantize_4bit``
on the same input, including their quirks: the scale is ``x * (1 / absmax)`` for full blocks but
``x / absmax`` for a trailing partial block, an all-zero block keeps ``absmax = 0`` and decodes
to zeros, an odd element count is padded with the code of 0.0, and the double-quantization step
reproduces their CPU kernel's 65536-point lookup table (see :func:`quantize_blockwise_8bit`).
Two places where bitsandbytes 0.50's CPU dequantization disagrees with itself, we follow its
definition and torch fallback: its vector loop looks scales up per *row*, which is wrong when a
block straddles two rows (a last dimension that is a multiple of 16 but not of the block size);
its scalar loop decodes FP4 pattern 0b1000 as -0.0. The tests spell out both cases.

Two implementations of each direction live here:

* ``quantize_4bit_reference`` / ``dequantize_4bit_reference`` -- plain, obviously correct torch
  (``torch.bucketize`` against the codebook midpoints). Tests compare the fast path to these.
* the fast path used by :func:`quantize_4bit` / :func:`dequantize_4bit`: it works in chunks that
  stay in cache, replaces the binary search by a uniform-grid lookup (one exact comparison per
  element, see :func:`_grid_tables`) and decodes whole bytes through a 256-entry table of value
  pairs. Set ``USE_FAST_PATH = False`` to run the reference everywhere.

Run ``python bench/quant_cpu.py`` for the timings against bitsandbytes and torchao. Each chunk
costs a handful of torch ops, each one OpenMP parallel region; on a machine where other processes
hold the cores those regions wait for a preempted worker (measured here: 5 ms each, a 100x
slow-down), where a single C kernel waits once. On a shared machine use
``torch.set_num_threads(1)``: the fast path then runs about 1.4x slower than with two idle cores
and never stalls.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import math
import sys
from dataclasses import dataclass, replace

import torch

from lmlab.errors import LmlabError
from lmlab.quant.codebooks import codebook, dynamic_map

BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QUANT_TYPES = ("nf4", "fp4", "int4")  # int4 is lmlab's own; bitsandbytes stores nf4 and fp4
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NESTED_BLOCK_SIZE = 256

USE_FAST_PATH = True  # tests flip this to run the reference implementation end to end
CHUNK_ELEMENTS = (
    1 << 19
)  # 2 MiB of float32 per temporary: near L2, few parallel regions (measured 2^16..2^20)
HUGEPAGE_MIN_BYTES = 8 << 20


# --------------------------------------------------------------------------------------------
# The quantized tensor
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Quantized4bit:
    """A blockwise 4-bit tensor and everything needed to decode it.

    ``packed`` is ``((numel + 1) // 2, 1) uint8``; ``absmax`` is ``(blocks,) float32``, or
    ``(blocks,) uint8`` codes of the dynamic map when double quantized, in which case ``offset``
    (``() float32``), ``nested_absmax`` (``(ceil(blocks / 256),) float32``) and ``nested_code``
    (``(256,) float32``) are set. ``code`` is the ``(16,) float32`` codebook.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    quant_type: str
    block_size: int
    shape: torch.Size
    dtype: torch.dtype
    offset: torch.Tensor | None = None
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_block_size: int = NESTED_BLOCK_SIZE

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor this state holds (codes, scales and code tables)."""
        tensors = [self.packed, self.absmax, self.code, self.offset, self.nested_absmax, self.nested_code]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def to(self, device: torch.device | str) -> Quantized4bit:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return replace(
            self,
            packed=move(self.packed),
            absmax=move(self.absmax),
            code=move(self.code),
            offset=move(self.offset),
            nested_absmax=move(self.nested_absmax),
            nested_code=move(self.nested_code),
        )

    # bitsandbytes' serialized layout (``QuantState.as_dict(packed=True)``), keys under "weight."
    def quant_state_json(self) -> dict:
        meta = {
            "quant_type": self.quant_type,
            "blocksize": self.block_size,
            "dtype": _dtype_name(self.dtype),
            "shape": list(self.shape),
        }
        if self.double_quant:
            meta.update(
                {
                    "nested_blocksize": self.nested_block_size,
                    "nested_dtype": "float32",
                    "nested_offset": float(self.offset.item()),
                }
            )
        return meta

    def state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """Tensors in bitsandbytes' key layout: ``weight``, ``weight.absmax``, ``weight.quant_map``,
        ``weight.nested_absmax``, ``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``."""
        out = {prefix: self.packed, f"{prefix}.absmax": self.absmax, f"{prefix}.quant_map": self.code}
        if self.double_quant:
            out[f"{prefix}.nested_absmax"] = self.nested_absmax
            out[f"{prefix}.nested_quant_map"] = self.nested_code
        blob = json.dumps(self.quant_state_json()).encode("utf-8")
        out[f"{prefix}.quant_state.bitsandbytes__{self.quant_type}"] = torch.tensor(
            list(blob), dtype=torch.uint8, device=self.packed.device
        )
        return out

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], prefix: str = "weight") -> Quantized4bit:
        """Inverse of :meth:`state_dict`; accepts checkpoints written by bitsandbytes.

        Every tensor is checked against the stored quant state before it is used: presence, dtype
        and size for the shape and block size, finite scales. A damaged or hand-edited entry raises
        a one-line :class:`LmlabError` naming the key, never decodes to garbage.
        """
        blob_keys = [k for k in tensors if k.startswith(f"{prefix}.quant_state.bitsandbytes__")]
        if len(blob_keys) != 1:
            raise LmlabError(
                f"{prefix}: not a 4-bit quantized entry (need exactly one {prefix}.quant_state.bitsandbytes__*"
                f" tensor, found {len(blob_keys)})"
            )
        if prefix not in tensors:
            raise LmlabError(f"{prefix}: the packed 4-bit weight {prefix!r} is missing")
        meta = _read_quant_state(tensors[blob_keys[0]], blob_keys[0])
        quant_type = meta["quant_type"]
        if blob_keys[0].rpartition("__")[2] != quant_type:
            raise LmlabError(
                f"{blob_keys[0]}: names {blob_keys[0].rpartition('__')[2]!r} but holds {quant_type!r}"
            )
        shape = torch.Size(meta["shape"])
        n = math.prod(shape)
        blocks = -(-n // meta["blocksize"])
        packed = tensors[prefix]
        if not isinstance(packed, torch.Tensor):
            raise LmlabError(f"{prefix}: expected a tensor, got {type(packed).__name__}")
        if packed.dtype != torch.uint8:  # bitsandbytes' quant_storage option: same bytes
            if packed.dtype.is_complex or packed.dtype == torch.bool:
                raise LmlabError(f"{prefix}: packed 4-bit codes cannot be {packed.dtype}")
            packed = packed.contiguous().view(torch.uint8)
        _expect(packed, f"{prefix}", torch.uint8, (n + 1) // 2, "packed 4-bit codes")
        packed = packed.reshape(-1, 1)
        nested_keys = [k for k in (f"{prefix}.nested_absmax", f"{prefix}.nested_quant_map") if k in tensors]
        nested = bool(nested_keys)
        if nested and len(nested_keys) != 2:
            raise LmlabError(f"{prefix}: double quantization needs both .nested_absmax and .nested_quant_map")
        if nested != ("nested_offset" in meta):
            raise LmlabError(
                f"{blob_keys[0]}: the quant state {'lacks' if nested else 'has'} nested_offset but the "
                f"nested tensors are {'present' if nested else 'missing'}"
            )
        absmax = _get(tensors, f"{prefix}.absmax")
        code = _get(tensors, f"{prefix}.quant_map")
        _expect(code, f"{prefix}.quant_map", "float", 16, "codebook", finite=True)
        device = packed.device
        if nested:
            nested_block_size = meta["nested_blocksize"]
            _expect(absmax, f"{prefix}.absmax", torch.uint8, blocks, "8-bit scale codes")
            nested_absmax = tensors[f"{prefix}.nested_absmax"]
            nested_code = tensors[f"{prefix}.nested_quant_map"]
            _expect(
                nested_absmax,
                f"{prefix}.nested_absmax",
                "float",
                -(-blocks // nested_block_size),
                "nested scales",
                finite=True,
            )
            _expect(nested_code, f"{prefix}.nested_quant_map", "float", 256, "8-bit map", finite=True)
            return cls(
                packed=packed,
                absmax=absmax,
                code=code.float(),
                quant_type=quant_type,
                block_size=meta["blocksize"],
                shape=shape,
                dtype=meta["dtype"],
                offset=torch.tensor(meta["nested_offset"], device=device),
                nested_absmax=nested_absmax.float(),
                nested_code=nested_code.float(),
                nested_block_size=nested_block_size,
            )
        _expect(absmax, f"{prefix}.absmax", "float", blocks, "block scales", finite=True)
        return cls(
            packed=packed,
            absmax=absmax.float(),
            code=code.float(),
            quant_type=quant_type,
            block_size=meta["blocksize"],
            shape=shape,
            dtype=meta["dtype"],
        )


def _get(tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in tensors:
        raise LmlabError(f"{key} is missing")
    return tensors[key]


def _expect(
    t: object, key: str, dtype: torch.dtype | str, numel: int, what: str, finite: bool = False
) -> None:
    """Refuse ``t`` unless it is a tensor of ``dtype`` ("float": any floating dtype) with ``numel`` values."""
    if not isinstance(t, torch.Tensor):
        raise LmlabError(f"{key}: expected a tensor ({what}), got {type(t).__name__}")
    ok = t.is_floating_point() if dtype == "float" else t.dtype == dtype
    if not ok:
        want = "a floating-point dtype" if dtype == "float" else str(dtype).removeprefix("torch.")
        raise LmlabError(f"{key}: {what} must be {want}, got {str(t.dtype).removeprefix('torch.')}")
    if t.numel() != numel:
        raise LmlabError(
            f"{key}: {what} must hold {numel} values for this shape and block size, got {t.numel()}"
        )
    if finite and not bool(torch.isfinite(t).all()):
        raise LmlabError(f"{key}: {what} contain NaN or Inf")


def _read_quant_state(blob: object, key: str) -> dict:
    """The JSON quant state of a bitsandbytes 4-bit entry, every field checked and normalised."""
    if not isinstance(blob, torch.Tensor) or blob.dtype != torch.uint8 or blob.dim() != 1:
        raise LmlabError(f"{key}: the quant state must be a 1-D uint8 tensor of JSON bytes")
    try:
        meta = json.loads(bytes(blob.cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise LmlabError(f"{key}: the quant state is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise LmlabError(f"{key}: the quant state must be a JSON object")

    def field(name: str, types: type | tuple[type, ...], what: str):
        v = meta.get(name)
        if isinstance(v, bool) or not isinstance(v, types):
            raise LmlabError(f"{key}: quant state field {name!r} must be {what}, got {v!r}")
        return v

    quant_type = field("quant_type", str, "a string")
    if quant_type not in ("nf4", "fp4"):
        raise LmlabError(f"{key}: unsupported quant_type {quant_type!r}")
    block_size = field("blocksize", int, "an integer")
    if block_size not in BLOCK_SIZES:
        raise LmlabError(
            f"{key}: blocksize must be one of {', '.join(map(str, BLOCK_SIZES))}, got {block_size}"
        )
    shape = field("shape", list, "a list of sizes")
    if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise LmlabError(
            f"{key}: quant state shape must be a non-empty list of positive integers, got {shape!r}"
        )
    dtype_name = field("dtype", str, "a dtype name")
    try:
        dtype = _dtype_from_name(dtype_name)
    except LmlabError:
        raise LmlabError(f"{key}: unsupported dtype {dtype_name!r} in the quant state") from None
    out = {"quant_type": quant_type, "blocksize": block_size, "shape": shape, "dtype": dtype}
    if "nested_offset" in meta or "nested_blocksize" in meta:
        offset = field("nested_offset", (int, float), "a number")
        if not math.isfinite(offset):
            raise LmlabError(f"{key}: quant state nested_offset must be finite, got {offset!r}")
        nested_block_size = meta.get("nested_blocksize", NESTED_BLOCK_SIZE)
        if (
            isinstance(nested_block_size, bool)
            or not isinstance(nested_block_size, int)
            or nested_block_size <= 0
        ):
            raise LmlabError(f"{key}: quant state nested_blocksize must be a positive integer")
        if meta.get("nested_dtype", "float32") != "float32":
            raise LmlabError(f"{key}: unsupported nested_dtype {meta.get('nested_dtype')!r}")
        out.update(nested_offset=float(offset), nested_blocksize=nested_block_size)
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or dtype not in FLOAT_DTYPES:
        raise LmlabError(f"unsupported dtype {name!r} in quantization state")
    return dtype


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _check_args(w: torch.Tensor, quant_type: str, block_size: int, name: str) -> None:
    if not isinstance(w, torch.Tensor):
        raise LmlabError(f"{name}: expected a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in FLOAT_DTYPES:
        raise LmlabError(f"{name}: 4-bit quantization needs float32, float16 or bfloat16, got {w.dtype}")
    if quant_type not in QUANT_TYPES:
        raise LmlabError(f"{name}: quant_type must be one of {', '.join(QUANT_TYPES)}, got {quant_type!r}")
    if block_size not in BLOCK_SIZES:
        raise LmlabError(
            f"{name}: block_size must be one of {', '.join(map(str, BLOCK_SIZES))}, got {block_size!r}"
        )
    if w.numel() == 0:
        raise LmlabError(f"{name}: cannot quantize an empty tensor")


def _raise_not_finite(w: torch.Tensor, name: str) -> None:
    flat = w.detach().reshape(-1)
    bad = (~torch.isfinite(flat)).nonzero()
    i = int(bad[0]) if bad.numel() else -1
    kind = "NaN" if i >= 0 and torch.isnan(flat[i]) else "Inf"
    index = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), w.shape)) if i >= 0 else ()
    raise LmlabError(f"{name} contains {kind} (first at index {list(index)}); cannot quantize it")


# --------------------------------------------------------------------------------------------
# Tables (constant per codebook and device, cached)
# --------------------------------------------------------------------------------------------


@functools.cache
def _sorted_tables(quant_type: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(midpoints (15,) f32, order (16,) int64, order-is-identity) for nearest-code search.

    ``order[k]`` is the code whose value is the k-th smallest; a value belongs to sorted slot
    ``#{midpoints < value}`` (ties to the lower slot). Stable sort: for FP4's two zeros the
    plain +0 pattern (0b0000) comes first, as in bitsandbytes.
    """
    code = codebook(quant_type, device)
    order = torch.sort(code, stable=True).indices
    values = code[order]
    midpoints = (values[:-1] + values[1:]) / 2
    identity = bool(torch.equal(order, torch.arange(16, device=device)))
    return midpoints, order, identity


@functools.cache
def _grid_tables(quant_type: str, device: torch.device) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Exact nearest-code lookup on a uniform grid: (K, low (2K+1,) f32, midpoint (2K+1,) f32).

    A scaled value ``s`` in [-1, 1] falls into cell ``j = trunc(fl(s + 1) * K)``; that map is
    monotone in ``s``. With K large enough that no two midpoints share a cell, every midpoint in
    a lower cell is ``< s`` and every one in a higher cell is ``> s``, so
    ``slot(s) = low[j] + (s > midpoint[j])`` where ``low[j]`` counts the midpoints in lower cells
    and ``midpoint[j]`` is the one in cell j (+inf if none). This is exactly
    ``torch.bucketize(s, midpoints)`` with one gather pair and one comparison instead of a
    binary search.
    """
    midpoints, _, _ = _sorted_tables(quant_type, device)
    mids = midpoints.cpu()
    for log_k in range(4, 16):
        k = 1 << log_k
        cells = ((mids + 1) * k).long()  # same float32 arithmetic as the fast path
        if torch.unique(cells).numel() == cells.numel():
            break
    else:  # pragma: no cover - every built-in codebook separates by K = 1024
        raise RuntimeError(f"codebook {quant_type} has midpoints too close for the grid lookup")
    n_cells = 2 * k + 1
    low = torch.zeros(n_cells)
    mid = torch.full((n_cells,), math.inf)
    for slot, c in enumerate(cells.tolist()):
        low[c + 1 :] += 1
        mid[c] = mids[slot]
    return k, low.to(device), mid.to(device)


def _decode_values(quant_type: str, device: torch.device) -> torch.Tensor:
    """(16,) float32 values a code decodes to: the codebook itself. (bitsandbytes' scalar CPU
    loop, used for its partial blocks, decodes FP4 pattern 0b1000 as -0.0 instead of +0.0; its
    vector loop, torch fallback and stored ``quant_map`` all say +0.0, which we follow.)"""
    return codebook(quant_type, device)


@functools.cache
def _pair_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """(256,) float64 *view* of (256, 2) float32: byte -> (value of high nibble, low nibble)."""
    code = _decode_values(quant_type, device)
    byte = torch.arange(256, device=device)
    pairs = torch.stack([code[byte >> 4], code[byte & 15]], dim=1).contiguous()  # (256, 2)
    return pairs.view(torch.float64).reshape(256)


@functools.cache
def _slot_byte_to_code_byte(quant_type: str, device: torch.device) -> torch.Tensor:
    """(256,) uint8: a byte of two sorted slots -> the byte of the two codes (FP4, int4)."""
    _, order, _ = _sorted_tables(quant_type, device)
    byte = torch.arange(256, device=device)
    return ((order[byte >> 4] << 4) | order[byte & 15]).to(torch.uint8)


# --------------------------------------------------------------------------------------------
# Reference implementation
# --------------------------------------------------------------------------------------------


def _block_absmax(flat: torch.Tensor, block_size: int) -> torch.Tensor:
    """(blocks,) float32 absolute maximum of each block of a flat float32 tensor."""
    n = flat.numel()
    full = n - n % block_size
    absmax = flat[:full].abs().reshape(-1, block_size).amax(dim=1)
    if full < n:
        absmax = torch.cat([absmax, flat[full:].abs().amax().reshape(1)])
    return absmax


def _scale_blocks_reference(flat: torch.Tensor, absmax: torch.Tensor, block_size: int) -> torch.Tensor:
    n = flat.numel()
    full = n - n % block_size
    safe = absmax.clamp(min=1e-38)  # an all-zero block scales to zeros, never 0/0
    scaled = (flat[:full].reshape(-1, block_size) * safe[: full // block_size, None].reciprocal()).reshape(-1)
    if full < n:  # bitsandbytes divides the trailing partial block instead of multiplying
        scaled = torch.cat([scaled, flat[full:] / safe[-1]])
    return scaled


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(n,) integer codes 0..15 (n even) -> (n // 2, 1) uint8, first element in the high nibble."""
    c = codes.to(torch.uint8)
    return ((c[0::2] << 4) | c[1::2]).reshape(-1, 1)


def _unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    p = packed.reshape(-1)
    codes = torch.stack([p >> 4, p & 15], dim=1).reshape(-1)  # (2 * bytes,)
    return codes[:n].long()


def quantize_4bit_reference(
    w: torch.Tensor, quant_type: str = "nf4", block_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch blockwise 4-bit quantization: ``(packed ((n+1)//2, 1) uint8, absmax (blocks,) f32)``."""
    flat = w.detach().reshape(-1).float()
    absmax = _block_absmax(flat, block_size)
    scaled = _scale_blocks_reference(flat, absmax, block_size)
    if scaled.numel() % 2:
        scaled = torch.cat([scaled, scaled.new_zeros(1)])  # padding is the code of 0.0
    midpoints, order, _ = _sorted_tables(quant_type, flat.device)
    slots = torch.bucketize(scaled, midpoints)  # right=False: value == midpoint -> lower slot
    return _pack_nibbles(order[slots]), absmax


def dequantize_4bit_reference(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_type: str,
    block_size: int,
    shape: torch.Size | tuple[int, ...],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Plain-torch inverse of :func:`quantize_4bit_reference` (absmax already decoded, float32)."""
    n = math.prod(shape)
    code = _decode_values(quant_type, packed.device)
    values = code[_unpack_nibbles(packed, n)]  # (n,) f32
    block = torch.arange(n, device=packed.device) // block_size
    return (values * absmax.float()[block]).to(dtype).reshape(shape)


# --------------------------------------------------------------------------------------------
# Double quantization: bitsandbytes' 8-bit blockwise quantization of the absmax vector
# --------------------------------------------------------------------------------------------


def _lut_8bit(code: torch.Tensor) -> torch.Tensor:
    """(65536,) int64: grid point -> nearest code entry, the table bitsandbytes' CPU kernel uses.

    Grid point ``i`` stands for ``-1 + 2i / 65535`` (float32); its entry is the number of
    midpoints strictly below it.
    """
    midpoints = 0.5 * (code[:-1] + code[1:])
    i = torch.arange(65536, dtype=torch.float32, device=code.device)
    return torch.searchsorted(midpoints, -1.0 + (2.0 * i) / 65535.0)


def quantize_blockwise_8bit(
    x: torch.Tensor, code: torch.Tensor, block_size: int = NESTED_BLOCK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization against a sorted 256-value ``code`` (the double-quant step).

    ``x``: ``(n,) float32``. Returns ``(codes (n,) uint8, absmax (blocks,) float32)``. Matches the
    bitsandbytes 0.50 CPU kernel, which is *not* an exact nearest search: the scaled value
    ``x * (1 / absmax)``, clamped to [-1, 1], is rounded to a 65536-point grid
    (``trunc((v + 1) * 0.5 * 65535 + 0.5)``) and the grid point's nearest entry is stored; an
    all-zero block stores code 0.
    """
    flat = x.reshape(-1).float()
    n = flat.numel()
    blocks = -(-n // block_size)
    padded = torch.cat([flat.abs(), flat.new_zeros(blocks * block_size - n)])
    absmax = padded.reshape(blocks, block_size).amax(dim=1)
    inverse = torch.where(absmax == 0, torch.zeros_like(absmax), 1.0 / absmax)  # no 0 * inf
    per_element = absmax.repeat_interleave(block_size)[:n]
    scaled = (flat * inverse.repeat_interleave(block_size)[:n]).clamp(-1.0, 1.0)
    # 0 * (1 / a subnormal absmax) = 0 * inf = NaN would index the table out of range; it is a 0.
    scaled = torch.nan_to_num(scaled, nan=0.0)
    grid = ((scaled + 1.0) * 0.5 * 65535.0 + 0.5).long()
    codes = _lut_8bit(code)[grid]
    codes = torch.where(per_element == 0, torch.zeros_like(codes), codes)
    return codes.to(torch.uint8), absmax


def dequantize_blockwise_8bit(
    codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, block_size: int = NESTED_BLOCK_SIZE
) -> torch.Tensor:
    """``code[codes] * absmax[block]`` in float32, ``(n,)``."""
    n = codes.numel()
    block = torch.arange(n, device=codes.device) // block_size
    return code[codes.reshape(-1).long()] * absmax[block]


def _decoded_absmax(q: Quantized4bit) -> torch.Tensor:
    if not q.double_quant:
        return q.absmax.float()
    absmax = dequantize_blockwise_8bit(q.absmax, q.nested_absmax, q.nested_code, q.nested_block_size)
    return absmax + q.offset.float()


# --------------------------------------------------------------------------------------------
# Fast path
# --------------------------------------------------------------------------------------------


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


@functools.lru_cache(maxsize=1)
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        fn.restype = ctypes.c_int
        return fn
    return None


def _advise_hugepages(ptr: int, nbytes: int) -> None:
    # A fresh multi-megabyte output is otherwise faulted in 4 KiB at a time, which costs more
    # than decoding it. Asking for transparent huge pages on the 2 MiB-aligned interior of the
    # untouched allocation is only advice: where the kernel says no, nothing changes.
    fn = _madvise()
    if fn is None:
        return
    huge = 1 << 21
    start = (ptr + huge - 1) & ~(huge - 1)
    end = (ptr + nbytes) & ~(huge - 1)
    if end > start:
        fn(start, end - start, 14)  # MADV_HUGEPAGE


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


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def quantize_4bit(
    w: torch.Tensor,
    quant_type: str = "nf4",
    block_size: int = 64,
    double_quant: bool = False,
    *,
    name: str = "weight",
) -> Quantized4bit:
    """Blockwise 4-bit quantization of ``w`` (any shape; float32, float16 or bfloat16).

    Bit-identical to ``bitsandbytes.functional.quantize_4bit(w, blocksize=block_size,
    quant_type=quant_type, compress_statistics=double_quant)``. ``name`` is used in error
    messages (a NaN or Inf anywhere raises :class:`LmlabError` naming it).
    """
    _check_args(w, quant_type, block_size, name)
    w = w.detach()
    flat = w.reshape(-1)
    n = flat.numel()
    full = n - n % block_size
    if USE_FAST_PATH and full > 0:
        w2d = flat[:full].view(-1, block_size)
        absmax = _fast_absmax(w2d)
        if full < n:
            absmax = torch.cat([absmax, flat[full:].float().abs().amax().reshape(1)])
        if not bool(torch.isfinite(absmax).all()):  # max propagates NaN and Inf: no extra pass
            _raise_not_finite(w, name)
        packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=w.device)
        _quantize_full_blocks_fast(w2d, absmax[: full // block_size], quant_type, packed[: full // 2])
        if full < n:
            tail_packed, _ = quantize_4bit_reference(flat[full:], quant_type, block_size)
            packed[full // 2 :] = tail_packed.reshape(-1)
        packed = packed.reshape(-1, 1)
    else:
        packed, absmax = quantize_4bit_reference(w, quant_type, block_size)
        if not bool(torch.isfinite(absmax).all()):
            _raise_not_finite(w, name)
    code = codebook(quant_type, w.device)
    if not double_quant:
        return Quantized4bit(packed, absmax, code, quant_type, block_size, w.shape, w.dtype)
    offset = absmax.mean()
    if not bool(torch.isfinite(offset)):
        # The float32 sum overflowed (scales near float32's maximum): take the mean in float64. Only
        # then, so that ordinary weights keep bitsandbytes' float32 mean bit for bit.
        offset = absmax.double().mean().float()
    nested_code = dynamic_map(w.device)
    codes, nested_absmax = quantize_blockwise_8bit(absmax - offset, nested_code, NESTED_BLOCK_SIZE)
    return Quantized4bit(
        packed,
        codes,
        code,
        quant_type,
        block_size,
        w.shape,
        w.dtype,
        offset=offset,
        nested_absmax=nested_absmax,
        nested_code=nested_code,
    )


def dequantize_4bit(
    q: Quantized4bit, dtype: torch.dtype | None = None, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Decode ``q`` to a tensor of ``q.shape`` and ``dtype`` (default: the original dtype).

    Bit-identical to ``bitsandbytes.functional.dequantize_4bit``. ``out`` (optional, contiguous,
    right shape and dtype) is written and returned instead of allocating.
    """
    dtype = dtype or q.dtype
    if dtype not in FLOAT_DTYPES:
        raise LmlabError(f"dequantize_4bit: dtype must be float32, float16 or bfloat16, got {dtype}")
    if q.block_size not in BLOCK_SIZES or q.quant_type not in QUANT_TYPES:
        raise LmlabError(f"dequantize_4bit: bad state (block_size {q.block_size}, {q.quant_type!r})")
    absmax = _decoded_absmax(q)
    n = q.numel
    if out is not None and (out.dtype != dtype or out.numel() != n or not out.is_contiguous()):
        raise LmlabError(f"dequantize_4bit: out must be a contiguous {dtype} tensor of {n} elements")
    if not USE_FAST_PATH:
        result = dequantize_4bit_reference(q.packed, absmax, q.quant_type, q.block_size, q.shape, dtype)
        return result if out is None else out.view(q.shape).copy_(result)
    flat = out.view(-1) if out is not None else _empty_output(n, dtype, q.device)
    full = n - n % q.block_size
    packed = q.packed.reshape(-1)
    if full > 0:
        _dequantize_full_blocks_fast(
            packed[: full // 2], absmax[: full // q.block_size], q.quant_type, q.block_size, flat[:full]
        )
    if full < n:
        flat[full:] = dequantize_4bit_reference(
            packed[full // 2 :], absmax[-1:], q.quant_type, q.block_size, (n - full,), dtype
        )
    return flat.view(q.shape)
