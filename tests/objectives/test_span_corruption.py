"""Span corruption and drop-tokens: golden examples, reconstruction, exact lengths, edge cases."""

from __future__ import annotations

import random
from itertools import pairwise

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmlab.errors import LmlabError
from lmlab.objectives import IGNORE_INDEX, DropTokens, SpanCorruption, span_corruption_lengths
from lmlab.objectives import reference as ref
from lmlab.objectives.span_corruption import drop_noise_tokens, replace_noise_spans

# A word-level toy vocabulary for Table 3's sentence (Raffel et al. 2020): <pad> 0, </s> 1, words
# from 4, sentinels on top.
WORDS = ["Thank", "you", "for", "inviting", "me", "to", "your", "party", "last", "week", "."]
V = 120
SENT0 = V - 1
VOCAB = {w: 4 + i for i, w in enumerate(WORDS)}
NAMES = {
    0: "<pad>",
    1: "</s>",
    **{i: w for w, i in VOCAB.items()},
    **{SENT0 - k: f"<extra_id_{k}>" for k in range(100)},
}


def encode(text: str) -> list[int]:
    return [VOCAB[w] for w in text.split()]


def decode(ids: list[int]) -> str:
    return " ".join(NAMES[i] for i in ids if i not in (0, IGNORE_INDEX))


def sentence() -> torch.Tensor:
    return torch.tensor([encode(" ".join(WORDS))])


def test_table3_replace_spans_golden():
    # Table 3: "Thank you <X> me to your party <Y> week ." / "<X> for inviting <Y> last <Z>".
    tokens = sentence()
    noise = torch.tensor([[w in ("for", "inviting", "last") for w in WORDS]])
    inputs, in_len, targets, tgt_len = replace_noise_spans(
        tokens, noise, sentinel_id=SENT0, eos_id=1, pad_id=0, num_sentinels=100
    )
    assert decode(inputs[0].tolist()) == "Thank you <extra_id_0> me to your party <extra_id_1> week . </s>"
    assert decode(targets[0].tolist()) == "<extra_id_0> for inviting <extra_id_1> last </s>"
    assert in_len.tolist() == [11] and tgt_len.tolist() == [6]


def test_table3_drop_tokens_golden():
    tokens = sentence()
    noise = torch.tensor([[w in ("for", "inviting", "last") for w in WORDS]])
    inputs, _, targets, _ = drop_noise_tokens(tokens, noise, eos_id=1, pad_id=0)
    assert decode(inputs[0].tolist()) == "Thank you me to your party week . </s>"
    assert decode(targets[0].tolist()) == "for inviting last </s>"


def test_fixed_seed_golden_span_corruption():
    # 11 tokens at density 0.25, mean span 1.5: round(2.75) = 3 noise tokens in round(2) = 2 spans,
    # and 8 others in 2 runs starting the row; seed 0 draws "your party" and the final ".".
    sc = SpanCorruption(sentinel_id=SENT0, noise_density=0.25, mean_noise_span_length=1.5)
    batch = sc(sentence(), generator=torch.Generator().manual_seed(0))
    assert decode(batch["input_ids"][0].tolist()) == GOLDEN_SPAN[0]
    assert decode(batch["labels"][0].tolist()) == GOLDEN_SPAN[1]
    assert batch["decoder_input_ids"][0].tolist() == [0, *batch["labels"][0, :-1].tolist()]
    # T5's own setting on 11 tokens: 2 noise tokens in 1 span, which must end the row.
    batch = SpanCorruption(sentinel_id=SENT0)(sentence(), generator=torch.Generator().manual_seed(0))
    assert (
        decode(batch["input_ids"][0].tolist())
        == "Thank you for inviting me to your party last <extra_id_0> </s>"
    )
    assert decode(batch["labels"][0].tolist()) == "<extra_id_0> week . </s>"


def test_fixed_seed_golden_iid_span_corruption():
    sc = SpanCorruption(sentinel_id=SENT0, noise="iid", noise_density=0.3)
    batch = sc(sentence(), generator=torch.Generator().manual_seed(0))
    assert (
        decode(batch["input_ids"][0].tolist()) == "Thank you <extra_id_0> me to your party last week . </s>"
    )
    assert decode(batch["labels"][0].tolist()) == "<extra_id_0> for inviting </s>"


GOLDEN_SPAN = (
    "Thank you for inviting me to <extra_id_0> last week <extra_id_1> </s>",
    "<extra_id_0> your party <extra_id_1> . </s>",
)


def check_span_batch(batch, tokens, lengths, sentinel_id, num_sentinels, eos_id=1, pad_id=0):
    """Every property a span-corruption batch must have, row by row."""
    B = tokens.shape[0]
    sentinels = set(range(sentinel_id - num_sentinels + 1, sentinel_id + 1))
    inputs, labels = batch["input_ids"], batch["labels"]
    assert inputs.shape[0] == labels.shape[0] == B
    assert batch["attention_mask"].shape == inputs.shape
    assert batch["decoder_input_ids"].shape == labels.shape
    for b in range(B):
        n_in = int(batch["attention_mask"][b].sum())
        row_in = inputs[b, :n_in].tolist()
        n_t = int((labels[b] != IGNORE_INDEX).sum())
        row_t = labels[b, :n_t].tolist()
        # Padding: pad ids in inputs, -100 in labels, 0 in the attention mask, all at the end.
        assert (inputs[b, n_in:] == pad_id).all() and (labels[b, n_t:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][b, :n_in].all()
        assert row_in[-1] == eos_id and row_t[-1] == eos_id
        # Sentinels: <extra_id_0>, <extra_id_1>, ... in order, the same in inputs and targets.
        s_in = [t for t in row_in if t in sentinels]
        s_t = [t for t in row_t if t in sentinels]
        assert s_in == s_t == [sentinel_id - k for k in range(len(s_in))]
        if s_t:
            assert row_t[0] == sentinel_id
        # No two sentinels in a row in the inputs (spans are maximal), none in a row in targets.
        assert all(not (a in sentinels and c in sentinels) for a, c in pairwise(row_in))
        assert all(not (a in sentinels and c in sentinels) for a, c in pairwise(row_t))
        # Reconstruction.
        original = tokens[b, : int(lengths[b])].tolist()
        assert ref.merge_on_sentinels(row_in, row_t, sentinels, eos_id) == original
        # decoder_input_ids = labels shifted right after the start id, -100 -> pad.
        dec = batch["decoder_input_ids"][b].tolist()
        shifted = [pad_id, *labels[b, :-1].tolist()]
        assert dec == [pad_id if t == IGNORE_INDEX else t for t in shifted]


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 200), min_size=1, max_size=6),
    pad=st.integers(0, 5),
    law=st.sampled_from(["spans", "iid"]),
    density=st.sampled_from([0.15, 0.3, 0.5]),
    mean=st.sampled_from([1.0, 3.0, 5.0]),
    ragged=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_reconstruction_and_sentinels(lengths, pad, law, density, mean, ragged, seed):
    L = max(lengths) + pad
    B = len(lengths)
    if not ragged:
        lengths = [L] * B
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 500, (B, L), generator=gen)  # pad id 0 may occur inside the text
    mask = (torch.arange(L) < torch.tensor(lengths)[:, None]).long()
    sc = SpanCorruption(
        sentinel_id=999, num_sentinels=400, noise=law, noise_density=density, mean_noise_span_length=mean
    )
    before = tokens.clone()
    batch = sc(tokens, attention_mask=mask if ragged else None, generator=gen)
    assert torch.equal(tokens, before)
    check_span_batch(batch, tokens, lengths, 999, 400)
    for v in batch.values():
        assert v.dtype == torch.long
    assert batch["input_ids"].min() >= 0 and batch["input_ids"].max() < 1000
    if law == "spans":
        # Widths depend on L only; full rows have no padding at all.
        assert (batch["input_ids"].shape[1], batch["labels"].shape[1]) == sc.output_widths(L)
        if not ragged:
            assert batch["attention_mask"].all() and (batch["labels"] != IGNORE_INDEX).all()


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 4), L=st.integers(0, 150), seed=st.integers(0, 2**31))
def test_fast_path_equals_mask_path(B, L, seed):
    tokens = torch.randint(4, 900, (B, L), generator=torch.Generator().manual_seed(seed))
    fast = SpanCorruption(sentinel_id=999)(tokens, generator=torch.Generator().manual_seed(seed))
    slow = SpanCorruption(sentinel_id=999, impl="reference")
    slow_batch = slow(tokens, generator=torch.Generator().manual_seed(seed))
    assert fast.keys() == slow_batch.keys()
    for k in fast:
        assert torch.equal(fast[k], slow_batch[k]), k
    # impl="fast" insists on the gather path, which "auto" took.
    forced = SpanCorruption(sentinel_id=999, impl="fast")(
        tokens, generator=torch.Generator().manual_seed(seed)
    )
    assert all(torch.equal(forced[k], fast[k]) for k in fast)


def test_impl_fast_where_it_does_not_apply_is_an_error():
    tokens = torch.randint(4, 900, (2, 40), generator=torch.Generator().manual_seed(0))
    with pytest.raises(LmlabError, match="impl='fast' does not apply.*iid"):
        SpanCorruption(sentinel_id=999, noise="iid", impl="fast")(tokens)
    ragged = torch.tensor([[1] * 40, [1] * 30 + [0] * 10])
    with pytest.raises(LmlabError, match="impl='fast' does not apply.*ragged"):
        SpanCorruption(sentinel_id=999, impl="fast")(tokens, attention_mask=ragged)
    with pytest.raises(LmlabError, match="impl must be one of auto, reference, fast"):
        SpanCorruption(sentinel_id=999, impl="quick")
    # "auto" falls back to the mask path there, as "reference" does.
    g = [torch.Generator().manual_seed(1) for _ in range(2)]
    auto = SpanCorruption(sentinel_id=999)(tokens, attention_mask=ragged, generator=g[0])
    ref_ = SpanCorruption(sentinel_id=999, impl="reference")(tokens, attention_mask=ragged, generator=g[1])
    assert all(torch.equal(auto[k], ref_[k]) for k in auto)


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 4), L=st.integers(0, 60), seed=st.integers(0, 2**31))
def test_vectorised_transforms_equal_reference(B, L, seed):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50, (B, L), generator=gen)
    noise = torch.rand((B, L), generator=gen) < 0.4  # rows may start with noise
    inputs, in_len, targets, tgt_len = replace_noise_spans(
        tokens, noise, sentinel_id=99, eos_id=1, pad_id=0, num_sentinels=50
    )
    d_in, d_in_len, d_t, d_t_len = drop_noise_tokens(tokens, noise, eos_id=1, pad_id=0)
    for b in range(B):
        want_in, want_t = ref.span_corruption(tokens[b].tolist(), noise[b].tolist(), 99, 1)
        assert inputs[b, : in_len[b]].tolist() == want_in and targets[b, : tgt_len[b]].tolist() == want_t
        want_in, want_t = ref.drop_tokens(tokens[b].tolist(), noise[b].tolist(), 1)
        assert d_in[b, : d_in_len[b]].tolist() == want_in and d_t[b, : d_t_len[b]].tolist() == want_t


def test_568_raw_tokens_give_512_inputs_and_114_targets_without_padding():
    raw, tl = span_corruption_lengths(512)
    sc = SpanCorruption(sentinel_id=31_999)
    tokens = torch.randint(4, 31_000, (16, raw), generator=torch.Generator().manual_seed(0))
    batch = sc(tokens, generator=torch.Generator().manual_seed(1))
    assert batch["input_ids"].shape == (16, 512) and batch["labels"].shape == (16, tl) == (16, 114)
    assert batch["attention_mask"].all() and (batch["labels"] != IGNORE_INDEX).all()
    assert batch["input_ids"].is_contiguous() and batch["labels"].is_contiguous()
    assert sc.raw_length(512) == 568 and sc.targets_length(512) == 114


@pytest.mark.parametrize("L", [0, 1, 2, 3])
@pytest.mark.parametrize("law", ["spans", "iid"])
def test_tiny_rows(L, law):
    tokens = torch.arange(10, 10 + 3 * L).view(3, L)
    batch = SpanCorruption(sentinel_id=999, noise=law, noise_density=0.5)(
        tokens, generator=torch.Generator().manual_seed(0)
    )
    check_span_batch(batch, tokens, [L] * 3, 999, 100)
    if law == "spans":
        want = {0: ([1], [1]), 1: ([10, 1], [1]), 2: ([10, 999, 1], [999, 11, 1])}
        if L in want:
            assert batch["input_ids"][0].tolist() == want[L][0] and batch["labels"][0].tolist() == want[L][1]


def test_too_many_spans_is_an_error_not_a_wrap_around():
    sc = SpanCorruption(sentinel_id=999, num_sentinels=100)
    tokens = torch.randint(4, 800, (2, 2048))
    with pytest.raises(LmlabError, match="sentinels"):
        sc(tokens)  # 307 noise tokens in 102 spans
    iid = SpanCorruption(sentinel_id=999, num_sentinels=5, noise="iid", noise_density=0.5)
    with pytest.raises(LmlabError, match="sentinels"):
        iid(torch.randint(4, 800, (2, 200)), generator=torch.Generator().manual_seed(0))


def test_sentinel_ids_in_the_text_are_rejected():
    sc = SpanCorruption(sentinel_id=999, num_sentinels=100)
    with pytest.raises(LmlabError, match="outside"):
        sc(torch.tensor([[5, 6, 950, 7, 8, 9]]))
    with pytest.raises(LmlabError, match="outside"):
        sc(torch.tensor([[5, -1, 7]]))


def test_same_seed_same_batch_and_never_shared_storage():
    sc = SpanCorruption(sentinel_id=999)
    tokens = torch.randint(4, 800, (4, 100))
    a = sc(tokens, generator=torch.Generator().manual_seed(3))
    b = sc(tokens, generator=torch.Generator().manual_seed(3))
    c = sc(tokens, generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["labels"], c["labels"])
    for v in a.values():
        assert v.untyped_storage().data_ptr() != tokens.untyped_storage().data_ptr()


@settings(max_examples=30, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 100), min_size=1, max_size=5),
    law=st.sampled_from(["spans", "iid"]),
    seed=st.integers(0, 2**31),
)
def test_drop_tokens_interleaves_back(lengths, law, seed):
    B, L = len(lengths), max(lengths)
    gen = torch.Generator().manual_seed(seed)
    # Distinct ids per row, so that the interleaving is unambiguous.
    tokens = torch.stack([torch.randperm(300, generator=gen)[:L] + 2 for _ in range(B)])
    mask = (torch.arange(L) < torch.tensor(lengths)[:, None]).long()
    drop = DropTokens(noise=law)
    batch = drop(tokens, attention_mask=mask, generator=gen)
    for b in range(B):
        kept = batch["input_ids"][b, : int(batch["attention_mask"][b].sum())].tolist()
        dropped = [t for t in batch["labels"][b].tolist() if t != IGNORE_INDEX]
        assert kept[-1] == 1 and dropped[-1] == 1
        kept, dropped = kept[:-1], dropped[:-1]
        original = tokens[b, : lengths[b]].tolist()
        ki = di = 0
        for t in original:  # walk the original, taking each token from kept or from dropped
            if ki < len(kept) and kept[ki] == t:
                ki += 1
            else:
                assert di < len(dropped) and dropped[di] == t
                di += 1
        assert ki == len(kept) and di == len(dropped)
        if law == "spans":
            assert len(dropped) == ref.noise_counts(lengths[b], 0.15, 3.0)[0]


def test_drop_tokens_density():
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(4, 800, (256, 512), generator=gen)
    batch = DropTokens()(tokens, generator=gen)
    dropped = (batch["labels"] != IGNORE_INDEX).sum().item() - 256  # minus the EOS of each row
    assert abs(dropped / tokens.numel() - 0.15) < 0.005 * 0.15 * 3


def test_contract_attributes():
    sc = SpanCorruption(sentinel_id=999)
    assert SpanCorruption.architectures == ("encoder-decoder",) == DropTokens.architectures
    assert SpanCorruption(sentinel_id=999, noise="iid").raw_length(512) == 512
    assert SpanCorruption(sentinel_id=999, noise="iid").targets_length(512) is None
    assert DropTokens().raw_length(512) == 512
    with pytest.raises(LmlabError):
        SpanCorruption(sentinel_id=999, noise="gaussian")
    with pytest.raises(Exception):  # noqa: B017 - frozen dataclass
        sc.noise_density = 0.3  # type: ignore[misc]


def test_reference_oracle_agrees_with_itself():
    # The oracle's own invariant: merge(span_corruption(x)) == x for random masks.
    rng = random.Random(0)
    for _ in range(200):
        L = rng.randint(0, 30)
        tokens = [rng.randint(2, 40) for _ in range(L)]
        noise = ref.random_spans_noise_mask(L, 0.3, 2.0, rng)
        ins, tgts = ref.span_corruption(tokens, noise, 99, 1)
        assert ref.merge_on_sentinels(ins, tgts, set(range(50, 100)), 1) == tokens


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_path_shapes_and_invariants():
    sc = SpanCorruption(sentinel_id=31_999)
    tokens = torch.randint(4, 31_000, (8, 568), device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    batch = sc(tokens, generator=gen)
    assert all(v.device.type == "cuda" for v in batch.values())
    check_span_batch({k: v.cpu() for k, v in batch.items()}, tokens.cpu(), [568] * 8, 31_999, 100)
    slow = SpanCorruption(sentinel_id=31_999, impl="reference")(
        tokens, generator=torch.Generator(device="cuda").manual_seed(0)
    )
    assert all(torch.equal(batch[k], slow[k]) for k in batch)
