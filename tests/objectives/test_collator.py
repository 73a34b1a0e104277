"""Objectives as Hugging Face ``data_collator``: a list of feature dicts in, the padded batch out."""

from __future__ import annotations

import pytest
import torch

from lmlab.errors import LmlabError
from lmlab.objectives import collate_features, get_objective, objective_names

ROWS = [[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15], [16, 17, 18, 19, 20]]


def _padded(pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(map(len, ROWS))
    tokens = torch.tensor([r + [pad_id] * (L - len(r)) for r in ROWS])
    mask = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in ROWS])
    return tokens, mask


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", objective_names())
def test_features_give_the_batch_of_the_padded_tensor_call(hf_tokenizer, name):
    objective = get_objective(name, hf_tokenizer)
    tokens, mask = _padded(objective.pad_id)
    want = objective(tokens, mask, generator=torch.Generator().manual_seed(3))
    for features in (
        [{"input_ids": r} for r in ROWS],  # lists, as datasets gives them
        [{"input_ids": torch.tensor(r), "attention_mask": torch.ones(len(r))} for r in ROWS],
        [torch.tensor(r) for r in ROWS],  # bare rows, as DataCollatorForLanguageModeling takes
        {"input_ids": tokens, "attention_mask": mask},  # an already padded batch
    ):
        got = objective(features, generator=torch.Generator().manual_seed(3))
        assert _equal(got, want), name
        assert all(v.dtype == torch.long for v in got.values())


def test_left_padded_features_are_right_padded(hf_tokenizer):
    objective = get_objective("bert", hf_tokenizer)
    L = max(map(len, ROWS))
    left = [
        {"input_ids": [0] * (L - len(r)) + r, "attention_mask": [0] * (L - len(r)) + [1] * len(r)}
        for r in ROWS
    ]
    tokens, mask = collate_features(left, pad_id=objective.pad_id)
    assert torch.equal(tokens, _padded(objective.pad_id)[0]) and torch.equal(mask, _padded(0)[1])
    # BERT features carry token_type_ids of one segment (zeros): dropped, as the model assumes them.
    bert = [
        {"input_ids": r, "token_type_ids": [0] * len(r), "special_tokens_mask": [0] * len(r)} for r in ROWS
    ]
    g = torch.Generator().manual_seed(0)
    assert _equal(
        objective(bert, generator=g), objective(*_padded(0), generator=torch.Generator().manual_seed(0))
    )


def test_generator_none_draws_from_the_global_generator_as_hf_collators_do(hf_tokenizer):
    objective = get_objective("span", hf_tokenizer)
    features = [{"input_ids": list(range(10, 60))}, {"input_ids": list(range(100, 140))}]
    torch.manual_seed(7)
    a = objective(features)
    torch.manual_seed(7)
    b = objective(features)
    c = objective(features)
    assert _equal(a, b) and not _equal(b, c)


@pytest.mark.parametrize(
    ("features", "message"),
    [
        ([], "non-empty list of features"),
        ("some text", "non-empty list of features"),
        ([{"text": "hello"}], "a feature has no input_ids"),
        ([{"input_ids": [5, 6], "labels": [5, 6]}], "the objective makes its own"),
        ([{"input_ids": [5, 6], "token_type_ids": [0, 1]}], "token_type_ids of a second segment"),
        ([{"input_ids": [5, 6], "length": 2}], "features hold length, which an objective does not use"),
        ([{"input_ids": [[5, 6]]}], r"feature 0: input_ids must be one row of integer ids"),
        ([{"input_ids": [0.5, 1.0]}], r"feature 0: input_ids must be one row of integer ids"),
        ([{"input_ids": [5, 6], "attention_mask": [1]}], r"feature 0: attention_mask has shape \(1,\)"),
        ({"input_ids": [5, 6]}, r"must be \(batch, length\)"),
    ],
)
def test_bad_features_are_one_line_errors(hf_tokenizer, features, message):
    with pytest.raises(LmlabError, match=message) as e:
        get_objective("causal", hf_tokenizer)(features)
    assert "\n" not in str(e.value)


def test_a_mask_beside_features_is_refused(hf_tokenizer):
    with pytest.raises(LmlabError, match="attention_mask goes inside the features"):
        get_objective("causal", hf_tokenizer)([{"input_ids": [5]}], torch.ones(1, 1))
