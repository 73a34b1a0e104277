"""Damaged, tampered and incomplete quantized directories are refused in one line, never decoded.

``load_quantized`` checks every file against ``manifest.json`` and, independently, every tensor's
presence, dtype and size against its layer (so a tamperer who also rewrites the manifest is still
caught); ``save_quantized`` never replaces a directory that is not an earlier quantized model.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from lmlab_cli_harness import tree_hashes
from quant_helpers import bnb_functional, logits, tiny_gpt2

from lmlab.errors import LmlabError
from lmlab.quant import (
    Int8Config,
    NF4Config,
    Quantized4bit,
    dequantize_4bit,
    int8_matmul,
    int8_vectorwise,
    load_quantized,
    quantize_,
    quantize_4bit,
    save_quantized,
)
from lmlab.quant.serialization import load_config

IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
LAYER = "transformer.h.0.attn.c_attn"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("q")
    out = {}
    for name, config in (
        ("nf4", NF4Config()),
        ("nf4-dq", NF4Config(double_quant=True)),
        ("int8", Int8Config()),
    ):
        model = tiny_gpt2()
        quantize_(model, config)
        out[name] = save_quantized(model, root / name, config)
    return out


def _copy(saved: dict[str, Path], name: str, tmp: Path) -> Path:
    return Path(shutil.copytree(saved[name], tmp / name))


def remanifest(d: Path) -> None:
    """Rewrite manifest.json for the files as they now are (a tamperer covering their tracks)."""
    files = {}
    for p in sorted(d.iterdir()):
        if p.is_file() and p.name != "manifest.json":
            files[p.name] = {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "bytes": p.stat().st_size}
    (d / "manifest.json").write_text(json.dumps({"files": files}))


def edit_tensors(d: Path, edit: Callable[[dict], None]) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(d / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    remanifest(d)


def edit_header_dtype(d: Path, key: str, dtype: str, cover: bool) -> None:
    """Change one tensor's dtype in the safetensors header, bytes untouched (F32 -> I32: same size)."""
    path = d / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header[key]["dtype"] = dtype
    new = json.dumps(header, separators=(",", ":")).encode()
    assert len(new) <= n
    path.write_bytes(raw[:8] + new + b" " * (n - len(new)) + raw[8 + n :])
    if cover:
        remanifest(d)


def edit_json(d: Path, name: str, edit: Callable[[object], object], cover: bool = True) -> None:
    obj = json.loads((d / name).read_text())
    obj = edit(obj)
    (d / name).write_text(json.dumps(obj))
    if cover:
        remanifest(d)


def set_quant_state(key: str, **fields) -> Callable[[dict], None]:
    def edit(t: dict) -> None:
        state = json.loads(bytes(t[key].tolist()).decode())
        state.update(fields)
        t[key] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)

    return edit


def _pop(key):
    return lambda t: t.pop(key)


def _replace(key, fn):
    def edit(t):
        t[key] = fn(t[key])

    return edit


def _layers(f):
    def edit(meta):
        f(meta["layers"][LAYER])
        return meta

    return edit


W = f"{LAYER}.weight"
QS = f"{W}.quant_state.bitsandbytes__nf4"
TAMPERED = [
    # (id, directory, damage, words the error must hold)
    ("packed-weight-missing", "nf4", lambda d: edit_tensors(d, _pop(W)), [W, "missing"]),
    ("absmax-missing", "nf4", lambda d: edit_tensors(d, _pop(f"{W}.absmax")), [f"{W}.absmax", "missing"]),
    ("absmax-too-short", "nf4", lambda d: edit_tensors(d, _replace(f"{W}.absmax", lambda a: a[:-3])), ["absmax", "shape"]),
    ("nested-absmax-too-short", "nf4-dq", lambda d: edit_tensors(d, _replace(f"{W}.nested_absmax", lambda a: a[:0])), ["nested_absmax"]),
    ("quant-map-missing", "nf4", lambda d: edit_tensors(d, _pop(f"{W}.quant_map")), ["quant_map", "missing"]),
    ("nested-in-plain-layer", "nf4", lambda d: edit_tensors(d, lambda t: t.update({f"{W}.nested_absmax": torch.ones(1)})), ["nested_absmax", "does not belong"]),
    ("absmax-nan", "nf4", lambda d: edit_tensors(d, _replace(f"{W}.absmax", lambda a: a.index_fill(0, torch.tensor([2]), float("nan")))), ["absmax", "NaN"]),
    ("header-F32-to-I32-absmax", "nf4", lambda d: edit_header_dtype(d, f"{W}.absmax", "I32", cover=True), [f"{W}.absmax", "I32", "F32"]),
    ("header-F32-to-I32-embedding", "nf4", lambda d: edit_header_dtype(d, "transformer.wpe.weight", "I32", cover=True), ["transformer.wpe.weight", "I32"]),
    ("header-edit-fails-checksum", "nf4", lambda d: edit_header_dtype(d, f"{W}.absmax", "I32", cover=False), ["model.safetensors", "checksum"]),
    ("quant-state-block-size", "nf4", lambda d: edit_tensors(d, set_quant_state(QS, blocksize=128)), [QS, "block_size"]),
    ("quant-state-quant-type", "nf4", lambda d: edit_tensors(d, set_quant_state(QS, quant_type="fp4")), ["quant_type"]),
    ("quant-state-bad-json-type", "nf4", lambda d: edit_tensors(d, set_quant_state(QS, blocksize="64")), ["blocksize", "integer"]),
    ("quant-state-shape", "nf4", lambda d: edit_tensors(d, set_quant_state(QS, shape=[32, 96])), ["shape"]),
    ("meta-block-size", "nf4", lambda d: edit_json(d, "lmlab_quant.json", _layers(lambda m: m.update(block_size=128))), ["absmax"]),
    ("meta-double-quant", "nf4", lambda d: edit_json(d, "lmlab_quant.json", _layers(lambda m: m.update(double_quant=True))), ["absmax"]),
    ("scb-too-short", "int8", lambda d: edit_tensors(d, _replace(f"{LAYER}.SCB", lambda s: s[:-1])), ["SCB", "shape"]),
    ("scb-nan", "int8", lambda d: edit_tensors(d, _replace(f"{LAYER}.SCB", lambda s: s.index_fill(0, torch.tensor([0]), float("nan")))), ["SCB", "NaN"]),
    ("int8-weight-as-float", "int8", lambda d: edit_tensors(d, _replace(W, lambda w: w.float())), [W, "F32", "I8"]),
    ("flipped-byte", "nf4", lambda d: (d / "model.safetensors").write_bytes(_flip((d / "model.safetensors").read_bytes())), ["checksum"]),
    ("truncated", "nf4", lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-100]), ["bytes", "damaged"]),
    ("manifest-files-empty", "nf4", lambda d: (d / "manifest.json").write_text('{"files": {}}'), ["does not list", "model.safetensors"]),
    ("manifest-files-list", "nf4", lambda d: (d / "manifest.json").write_text('{"files": []}'), ["manifest.json", "files"]),
    ("manifest-a-list", "nf4", lambda d: (d / "manifest.json").write_text("[]"), ["manifest.json"]),
    ("manifest-not-json", "nf4", lambda d: (d / "manifest.json").write_text("{"), ["manifest.json", "not valid JSON"]),
    ("manifest-wrong-types", "nf4", lambda d: edit_json(d, "manifest.json", lambda m: {"files": {k: {"sha256": 5, "bytes": "9"} for k in m["files"]}}, cover=False), ["sha256"]),
    ("manifest-lists-absent-file", "nf4", lambda d: edit_json(d, "manifest.json", lambda m: {"files": {**m["files"], "tokenizer.json": m["files"]["config.json"]}}, cover=False), ["tokenizer.json", "missing"]),
    ("manifest-path-escape", "nf4", lambda d: edit_json(d, "manifest.json", lambda m: {"files": {**m["files"], "../x": m["files"]["config.json"]}}, cover=False), ["bad file name"]),
    ("meta-not-json", "nf4", lambda d: ((d / "lmlab_quant.json").write_text("{"), remanifest(d)), ["lmlab_quant.json", "not valid JSON"]),
    ("meta-layers-list", "nf4", lambda d: edit_json(d, "lmlab_quant.json", lambda m: {**m, "layers": []}), ["layers"]),
    ("meta-in-features-string", "nf4", lambda d: edit_json(d, "lmlab_quant.json", _layers(lambda m: m.update(in_features="32"))), ["in_features", "integer"]),
    ("meta-block-size-bool", "nf4", lambda d: edit_json(d, "lmlab_quant.json", _layers(lambda m: m.update(block_size=True))), ["block_size"]),
    ("meta-threshold-string", "int8", lambda d: edit_json(d, "lmlab_quant.json", _layers(lambda m: m.update(threshold="6"))), ["threshold"]),
    ("meta-kind", "nf4", lambda d: edit_json(d, "lmlab_quant.json", _layers(lambda m: m.update(kind="linear2bit"))), ["kind"]),
]  # fmt: skip


def _flip(data: bytes) -> bytes:
    i = len(data) - 50
    return data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1 :]


@pytest.mark.parametrize("name,damage,words", [pytest.param(*c[1:], id=c[0]) for c in TAMPERED])
def test_load_quantized_refuses_tampered_files(saved, tmp_path, name, damage, words):
    d = _copy(saved, name, tmp_path)
    damage(d)
    with pytest.raises(LmlabError) as e:
        load_quantized(d)
    msg = str(e.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w.lower() in msg.lower(), (w, msg)


def test_untouched_directories_load_and_match(saved):
    for name in saved:
        model = load_quantized(saved[name])
        assert torch.isfinite(logits(model, IDS)).all()
    assert load_config(saved["nf4-dq"]) == NF4Config(double_quant=True)


def test_directory_without_manifest_loads_with_a_warning(saved, tmp_path):
    d = _copy(saved, "nf4", tmp_path)
    (d / "manifest.json").unlink()
    with pytest.warns(UserWarning, match="no manifest.json"):
        model = load_quantized(d)
    assert torch.equal(logits(model, IDS), logits(load_quantized(saved["nf4"]), IDS))


def test_hand_edited_config_in_lmlab_quant_json(saved, tmp_path):
    d = _copy(saved, "nf4", tmp_path)
    edit_json(d, "lmlab_quant.json", lambda m: {**m, "config": {"method": "nf4", "block_size": "x"}})
    with pytest.raises(LmlabError, match="lmlab_quant.json"):
        load_config(d)


# ------------------------------------------------------------------ save_quantized never clobbers


def test_save_quantized_refuses_a_directory_it_did_not_write(tmp_path):
    model = tiny_gpt2()
    quantize_(model, NF4Config())
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me\n")
    before = tree_hashes(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(LmlabError, match="not empty"):
            save_quantized(model, mine, overwrite=overwrite)
    with pytest.raises(LmlabError, match="exists and is not a directory"):
        save_quantized(model, mine / "notes.txt")
    tiny_gpt2().save_pretrained(tmp_path / "float")
    before = tree_hashes(tmp_path)
    with pytest.raises(LmlabError, match="holds a saved model"):
        save_quantized(model, tmp_path / "float", overwrite=True)
    assert tree_hashes(tmp_path) == before


def test_save_quantized_replaces_an_earlier_output_only_when_told(tmp_path):
    model = tiny_gpt2()
    quantize_(model, NF4Config())
    save_quantized(model, tmp_path / "q")
    with pytest.raises(LmlabError, match=r"overwrite=True"):
        save_quantized(model, tmp_path / "q")
    (tmp_path / "empty").mkdir()
    save_quantized(model, tmp_path / "empty")  # an empty directory is fine
    save_quantized(model, tmp_path / "q", overwrite=True)
    load_quantized(tmp_path / "q")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------ the primitives check their inputs


def _bnb_state(double_quant: bool) -> dict[str, torch.Tensor]:
    F = bnb_functional()
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    return {"weight": packed} | {f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda t: t.pop("weight"), "packed 4-bit weight"),
        (lambda t: t.update({"weight": t["weight"][:-1]}), "packed"),
        (lambda t: t.update({"weight.absmax": t["weight.absmax"][:-1]}), "absmax"),
        (lambda t: t.update({"weight.absmax": t["weight.absmax"].int()}), "absmax"),
        (lambda t: t.update({"weight.quant_map": t["weight.quant_map"][:8]}), "quant_map"),
        (lambda t: t.pop("weight.quant_map"), "quant_map"),
        (lambda t: t.pop("weight.quant_state.bitsandbytes__nf4"), "quant_state"),
        (lambda t: t.update({"weight.quant_state.bitsandbytes__nf4": torch.tensor([1, 2], dtype=torch.uint8)}), "JSON"),
    ],
)  # fmt: skip
def test_from_state_dict_checks_what_it_is_given(edit, match):
    tensors = _bnb_state(double_quant=False)
    Quantized4bit.from_state_dict(dict(tensors))  # intact: accepted
    edit(tensors)
    with pytest.raises(LmlabError, match=match):
        Quantized4bit.from_state_dict(tensors)


def test_from_state_dict_checks_double_quantized_states():
    tensors = _bnb_state(double_quant=True)
    Quantized4bit.from_state_dict(dict(tensors))
    for key in ("weight.nested_absmax", "weight.nested_quant_map"):
        broken = dict(tensors)
        broken.pop(key)
        with pytest.raises(LmlabError, match="nested"):
            Quantized4bit.from_state_dict(broken)
    broken = dict(tensors, **{"weight.absmax": tensors["weight.absmax"].float()})
    with pytest.raises(LmlabError, match="absmax"):
        Quantized4bit.from_state_dict(broken)


@pytest.mark.parametrize(
    "scale,match",
    [
        (torch.ones(5, 1), "shape"),
        (torch.ones(()), "shape"),
        (torch.ones(4), "shape"),
        (torch.ones(5, dtype=torch.int32), "floating"),
        (torch.tensor([1.0, float("nan"), 1, 1, 1]), "finite"),
        (torch.tensor([1.0, float("inf"), 1, 1, 1]), "finite"),
    ],
)
def test_int8_matmul_validates_w_scale(scale, match):
    w_q, _ = int8_vectorwise(torch.randn(5, 8))
    with pytest.raises(LmlabError, match=match):
        int8_matmul(torch.randn(3, 8), w_q, scale)


def test_double_quant_survives_absmax_sums_beyond_float32():
    # Every block's absmax near float32's maximum: their float32 sum overflows to inf.
    w = torch.full((64, 64), 3.0e38)
    w[::2] = -2.5e38
    q = quantize_4bit(w, "nf4", 64, double_quant=True)
    assert torch.isfinite(q.offset)
    d = dequantize_4bit(q)
    assert torch.isfinite(d).all()
    assert ((d - w).abs() / w.abs()).max() < 0.05


def test_double_quant_keeps_zero_blocks_next_to_subnormal_scales():
    # Block absmax 0, d, 2d with d subnormal: the mean is d exactly, so the centred scales are
    # -d, 0, d; 1 / d overflows to inf and 0 * inf = NaN indexed the 8-bit table out of range.
    w = torch.zeros(3, 64)
    w[1, 0] = 1e-42
    w[2, 0] = 2 * w[1, 0]
    q = quantize_4bit(w, "nf4", 64, double_quant=True)
    assert torch.isfinite(dequantize_4bit(q)).all()


# -- issue 14: config.json's quantization_config, incomplete writes, copied folders -----------------


def _saved_nf4(tmp_path, **kw):
    from lmlab.quant import NF4Config, quantize_, save_quantized

    model = tiny_gpt2()
    quantize_(model, NF4Config())
    return model, save_quantized(model, tmp_path / "q", **kw)


def test_a_write_killed_before_lmlab_quant_json_is_refused_not_read_as_transformers(tmp_path):
    """config.json carries bitsandbytes' quantization_config, which alone would read as a transformers
    directory; the manifest is written before it, so a directory without lmlab_quant.json is incomplete."""
    _, out = _saved_nf4(tmp_path)
    assert (
        json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "bitsandbytes"
    )
    (out / "lmlab_quant.json").unlink()
    with pytest.raises(LmlabError, match="lmlab_quant.json is missing; the directory is incomplete"):
        load_quantized(out)


def test_extra_directories_are_copied_and_broken_links_refused(tmp_path):
    extra = tmp_path / "1_Pooling"
    (extra / "deeper").mkdir(parents=True)
    (extra / "deeper" / "x.json").write_text("{}\n")
    (tmp_path / "README.md").write_text("# model\n")
    _, out = _saved_nf4(tmp_path, extra_files=[extra, tmp_path / "README.md"])
    assert (out / "1_Pooling" / "deeper" / "x.json").read_text() == "{}\n"
    assert (out / "README.md").read_text() == "# model\n"
    load_quantized(out)  # the manifest lists top-level files; the folder does not disturb it
    (extra / "gone").symlink_to(tmp_path / "nowhere")
    with pytest.raises(LmlabError, match="broken symbolic link"):
        _saved_nf4(tmp_path / "again", extra_files=[extra])
    assert not (tmp_path / "again" / "q").exists()
