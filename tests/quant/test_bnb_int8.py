"""LLM.int8() against bitsandbytes' ``Linear8bitLt`` (0.50, on CPU): the same codes and SCB, state
dicts exchanged both ways with ``strict=True``, and the forward's agreement measured."""

from __future__ import annotations

import pytest
import torch
from quant_helpers import bits, bnb_functional
from torch import nn

from lmlab.errors import LmlabError
from lmlab.quant import Linear8bit
from lmlab.quant.int8 import int8_vectorwise

pytestmark = pytest.mark.peer


def _linear(in_f: int = 256, out_f: int = 96, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.mul_(3.0)
        lin.weight[1] = 0.0  # an all-zero row: zero codes, SCB 0 in both libraries
    return lin.to(dtype)


def _bnb_layer(lin: nn.Linear, threshold: float = 6.0):
    """bitsandbytes' own way: load the float weights, quantize on ``.to(device)``, eval mode (in
    training mode its CPU forward dequantizes instead of running LLM.int8())."""
    bnb_functional()
    import bitsandbytes as bnb

    layer = bnb.nn.Linear8bitLt(
        lin.in_features, lin.out_features, lin.bias is not None, has_fp16_weights=False, threshold=threshold
    )
    layer.load_state_dict(lin.state_dict())
    return layer.to("cpu").eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_codes_and_scb_are_byte_identical_to_bitsandbytes(dtype):
    lin = _linear(dtype=dtype)
    theirs = _bnb_layer(lin)
    ours = Linear8bit.from_linear(lin)
    assert torch.equal(ours.weight, theirs.weight.data)
    assert torch.equal(bits(ours.SCB), bits(theirs.weight.SCB))
    if dtype == torch.float32:
        # bitsandbytes' float16 rounding is what makes them equal: the law on the float32 values differs
        assert not torch.equal(int8_vectorwise(lin.weight.detach())[0], theirs.weight.data)


def test_rows_beyond_float16_quantize_from_the_weight():
    lin = _linear(in_f=64, out_f=8)
    with torch.no_grad():
        lin.weight[2, 5] = 1e5  # float16 overflows: bitsandbytes writes SCB = inf and zero codes there
    ours = Linear8bit.from_linear(lin)
    q, scale = int8_vectorwise(lin.weight.detach()[2:3])
    assert torch.equal(ours.weight[2:3], q) and ours.SCB[2] == scale[0] == 1e5
    assert bool(torch.isfinite(ours.SCB).all())
    others = Linear8bit.from_linear(_linear(in_f=64, out_f=8))  # the other rows: float16 rounding as usual
    keep = torch.arange(8) != 2
    assert torch.equal(ours.weight[keep], others.weight[keep])


def test_state_dict_has_bitsandbytes_keys_dtypes_and_shapes():
    lin = _linear()
    theirs = _bnb_layer(lin).state_dict()
    ours = Linear8bit.from_linear(lin).state_dict()
    assert set(ours) == set(theirs) == {"weight", "bias", "SCB", "weight_format"}
    for key in theirs:
        assert (ours[key].dtype, ours[key].shape) == (theirs[key].dtype, theirs[key].shape), key
        assert torch.equal(bits(ours[key]), bits(theirs[key])), key
    assert ours["weight_format"].item() == 0


def test_lmlab_state_dict_loads_into_bitsandbytes_with_the_same_forward():
    lin = _linear()
    ours = Linear8bit.from_linear(lin)
    x = torch.randn(12, 256, generator=torch.Generator().manual_seed(1))
    # the bitsandbytes layer starts from another weight, then takes lmlab's state dict
    theirs = _bnb_layer(_linear(seed=7))
    theirs.load_state_dict(ours.state_dict(), strict=True)
    reference = _bnb_layer(lin)  # bitsandbytes quantizing the float layer itself
    with torch.no_grad():
        assert torch.equal(theirs(x), reference(x))
        torch.testing.assert_close(theirs(x), ours(x), atol=0.05, rtol=0.02)


def test_bitsandbytes_state_dict_loads_into_lmlab_with_the_same_forward():
    lin = _linear()
    state = _bnb_layer(lin).state_dict()
    ours = Linear8bit(256, 96, bias=True)
    ours.load_state_dict(state, strict=True)
    expected = Linear8bit.from_linear(lin)
    x = torch.randn(12, 256, generator=torch.Generator().manual_seed(2))
    x[:, 9] = 8.0  # an outlier column
    with torch.no_grad():
        assert torch.equal(bits(ours(x)), bits(expected(x)))
    # older lmlab files have no weight_format: they load as well
    state.pop("weight_format")
    older = Linear8bit(256, 96, bias=True)
    older.load_state_dict(state, strict=True)
    assert torch.equal(older.weight, expected.weight)


@pytest.mark.parametrize(
    "value,match",
    [
        (torch.tensor(1, dtype=torch.uint8), "'col32' is not supported"),
        (3, "'col_ampere' is not supported"),
        ("col_turing", "'col_turing' is not supported"),
        (torch.tensor(9, dtype=torch.uint8), "9 is not supported"),
    ],
)
def test_a_weight_format_other_than_row_major_is_refused_in_one_line(value, match):
    state = Linear8bit.from_linear(_linear(in_f=16, out_f=4)).state_dict()
    state["weight_format"] = value
    with pytest.raises(LmlabError, match=match) as info:
        Linear8bit(16, 4).load_state_dict(state)
    assert "\n" not in str(info.value) and "weight_format" in str(info.value)


def test_a_float_weight_is_refused_not_cast_to_int8():
    lin = _linear(in_f=16, out_f=4)
    with pytest.raises(LmlabError, match="weight is torch.float32.*int8 codes"):
        Linear8bit(16, 4).load_state_dict({**lin.state_dict(), "SCB": torch.ones(4)})


def _outlier_input(seed: int, all_rows: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 256, generator=g)
    cols = [5, 77, 200]
    if all_rows:  # every entry of the outlier columns beyond the threshold
        x[:, cols] = torch.sign(x[:, cols]) * (8 + 20 * x[:, cols].abs())
    else:
        x[:, cols] *= 25  # most entries beyond it, a few not
    return x


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_forward_matches_bitsandbytes_on_float16_inputs(threshold):
    # bitsandbytes casts activations to float16 before quantizing them; on inputs that already are,
    # the two forwards agree to its dequantization constant (6.200124e-05, 1.8e-5 above 1/127**2).
    lin = _linear()
    ours, theirs = Linear8bit.from_linear(lin, threshold=threshold), _bnb_layer(lin, threshold)
    for x in (torch.randn(16, 256, generator=torch.Generator().manual_seed(3)), _outlier_input(4, True)):
        x = x.half().float()
        with torch.no_grad():
            a, b = ours(x), theirs(x)
        assert ((a - b).norm() / b.norm()) < 5e-5


def test_forward_close_to_bitsandbytes_and_as_close_to_float():
    # Float32 inputs (bitsandbytes rounds them to float16) and outlier columns with entries under
    # the threshold (bitsandbytes keeps those in the row scales, lmlab drops the whole columns).
    lin = _linear()
    ours, theirs = Linear8bit.from_linear(lin), _bnb_layer(lin)
    x = _outlier_input(5, False)
    with torch.no_grad():
        ref, a, b = lin(x), ours(x), theirs(x)
    err_ours, err_theirs = ((a - ref).norm() / ref.norm()), ((b - ref).norm() / ref.norm())
    assert ((a - b).norm() / b.norm()) < 0.01
    assert err_ours < 0.01 and err_ours <= 1.1 * err_theirs
