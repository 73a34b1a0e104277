import pytest

from lmlab.errors import LmlabError
from lmlab.impl import IMPLS, check_impl, use_fast


def test_choices():
    assert IMPLS == ("auto", "reference", "fast")
    for impl in IMPLS:
        assert check_impl(impl) == impl
    with pytest.raises(LmlabError, match="impl must be one of auto, reference, fast, got 'quick'"):
        check_impl("quick", "quantize_4bit")


@pytest.mark.parametrize(
    "impl, applies, fast",
    [("auto", True, True), ("auto", False, False), ("reference", True, False), ("fast", True, True)],
)
def test_use_fast(impl, applies, fast):
    assert use_fast(impl, applies, "op") is fast


def test_fast_where_it_does_not_apply_is_an_error():
    with pytest.raises(LmlabError, match=r"^op: impl='fast' does not apply here \(float64 input\)$"):
        use_fast("fast", False, "op", "float64 input")
