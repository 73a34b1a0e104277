"""The quantized 4-bit tensor (:class:`Quantized4bit`) and its state dict in bitsandbytes' layout.

``Quantized4bit.state_dict`` writes bitsandbytes' keys (``QuantState.as_dict(packed=True)``);
``from_state_dict`` reads them back (also from checkpoints written by bitsandbytes) and checks every
tensor against the stored JSON quant state before anything is decoded.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

import torch

from lmlab.errors import LmlabError
from lmlab.quant.formats import NESTED_BLOCK_SIZE, check_block_size, check_quant_type

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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

    quant_type = check_quant_type(field("quant_type", str, "a string"), f"{key}: quant state")
    block_size = check_block_size(field("blocksize", int, "an integer"), f"{key}: quant state")
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
