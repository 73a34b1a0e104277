"""``lmlab eval`` through the real command line: every kind of model, --json equal to the library's
figures, --compare and --memorization, and each bad input a one-line error with exit status 2."""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
from lmlab_cli_harness import assert_one_line_error, run_lmlab  # noqa: E402

from lmlab.cli import main  # noqa: E402


def _json(capsys, argv: list[str]) -> dict:
    assert main(["eval", *argv, "--json", "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, eval_corpus) -> Path:
    """About 8 KB of the corpus, cut at a blank line."""
    text = eval_corpus.read_text(encoding="utf-8")[:8000]
    path = tmp_path_factory.mktemp("small") / "small.txt"
    path.write_text(text[: text.rindex("\n\n")], encoding="utf-8")
    return path


def test_causal_json_is_the_librarys_perplexity(
    saved_model, small_corpus, eval_tokenizer, tiny_model, capsys
):
    from lmlab.eval import load_eval_text, perplexity

    r = _json(capsys, [str(saved_model("gpt2")), "--corpus", str(small_corpus), "--max-length", "64"])
    text = load_eval_text(eval_tokenizer, paths=[small_corpus])
    want = perplexity(tiny_model("gpt2"), eval_tokenizer, text, max_length=64)
    assert r["perplexity"] == pytest.approx(want.to_dict(), rel=1e-9)
    assert r["perplexity"]["stride"] == 32 and r["data"]["corpus"] == [str(small_corpus)]
    assert r["model"]["kind"] == "decoder" and r["lmlab_version"] and r["settings"]["dtype"] == "float32"
    assert set(r["compression"]) == {"gzip", "bz2", "xz"} and all(
        2 < v < 6 for v in r["compression"].values()
    )
    assert r["data"]["bytes"] == r["perplexity"]["bytes"] == sum(len(d.encode()) for d in text.docs)


def test_table_t5_bert_pll_and_self_compare(saved_model, eval_data, capsys):
    assert (
        main(
            [
                "eval",
                str(saved_model("gpt2")),
                "--data",
                str(eval_data),
                "--max-length",
                "64",
                "--no-progress",
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    for words in ("perplexity", "bits per byte", "word perplexity", "compression floor", "gzip"):
        assert words in table
    t5 = _json(
        capsys, [str(saved_model("t5")), "--data", str(eval_data), "--max-length", "32", "--max-rows", "8"]
    )
    assert t5["denoising"]["objective"] == "span" and t5["denoising"]["rows"] == 8
    bert = [
        str(saved_model("bert")),
        "--data",
        str(eval_data),
        "--max-length",
        "16",
        "--max-rows",
        "2",
        "--pll",
    ]
    b = _json(capsys, bert)
    assert b["denoising"]["objective"] == "bert" and b["pll"]["rows"] == 2 and b["pll"]["tokens"] > 20
    same = _json(capsys, [*bert[:5], "--max-rows", "4", "--compare", str(saved_model("bert"))])
    assert same["compare"]["kl_mean"] == 0.0 and same["compare"]["top1_agreement"] == 1.0


def test_memorization_and_compare_of_a_causal_model(saved_model, eval_data, tmp_path, capsys):
    from lmlab.quant import NF4Config, load_quantized, quantize_, save_quantized  # noqa: F401

    model = str(saved_model("llama"))
    nf4 = tmp_path / "nf4"
    assert main(["quantize", model, "--method", "nf4", "--out", str(nf4)]) == 0
    capsys.readouterr()
    r = _json(capsys, [str(nf4), "--compare", model, "--data", str(eval_data), "--max-length", "64", "--memorization",
                       "--prefix", "8", "--suffix", "8", "--samples", "4"])  # fmt: skip
    assert r["model"]["quantized"] == "nf4"
    c = r["compare"]
    assert (
        0 < c["kl_mean"] < 0.05
        and 0.5 < c["top1_agreement"] <= 1
        and c["positions"] == r["perplexity"]["tokens"]
    )
    assert c["candidate"]["perplexity"] == pytest.approx(r["perplexity"]["perplexity"], rel=1e-6)
    m = r["memorization"]
    assert (m["prefix"], m["suffix"], m["train"]["n"], m["val"]["n"]) == (8, 8, 4, 4)


@pytest.fixture(scope="module")
def bad(tmp_path_factory, saved_model, eval_data, eval_tokenizer):
    """Inputs ``lmlab eval`` must refuse, each with the words its one line names."""
    from transformers import PreTrainedTokenizerFast

    from lmlab.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("bad-eval")
    gpt, data = str(saved_model("gpt2")), str(eval_data)
    (root / "empty").mkdir()
    corrupt = root / "corrupt"
    shutil.copytree(gpt, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 100)
    texts = [f"{w} number {i} of another corpus" for i, w in enumerate(["alpha", "beta", "gamma"] * 40)]
    other = PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(texts, vocab_size=1024, kind="bpe"))
    other_dir = root / "other-tok"
    shutil.copytree(gpt, other_dir)
    for f in other_dir.glob("tokenizer*"):
        f.unlink()
    other.save_pretrained(other_dir)
    big = copy.deepcopy(eval_tokenizer)
    big.add_tokens([f"word{i}" for i in range(600)])  # 1624 ids for a model of 1024 rows
    big_dir = root / "big-tok"
    big.save_pretrained(big_dir)
    short = root / "short.txt"
    short.write_text("Too short.\n")
    blank = root / "blank.txt"
    blank.write_text("\n\n   \n")
    d = ["--data", data]
    return {
        "no-model": ([str(root / "empty"), *d], "holds no model"),
        "corrupt-weights": ([str(corrupt), *d], "damaged"),
        "tokenizer-too-big": ([gpt, "--corpus", str(short), "--tokenizer", str(big_dir)], "1624 ids"),
        "stride-over-length": ([gpt, *d, "--max-length", "32", "--stride", "64"], "--stride 64 is longer"),
        "stride-zero": ([gpt, *d, "--stride", "0"], "--stride must be a positive"),
        "short-text": ([gpt, "--corpus", str(short), "--max-length", "64"], "fewer than one window"),
        "other-tokenizer": ([gpt, *d, "--compare", str(other_dir)], "different tokenizers"),
        "empty-corpus": ([gpt, "--corpus", str(blank)], "no text"),
        "data-and-corpus": ([gpt, *d, "--corpus", str(short)], "not both"),
        "pll-on-causal": ([gpt, *d, "--pll"], "--pll scores masked LMs"),
        "memorization-corpus": ([gpt, "--corpus", str(short), "--memorization"], "needs a prepared --data"),
        "no-text": ([gpt], "give --data DIR or --corpus PATH"),
        "other-kind": ([gpt, *d, "--compare", str(saved_model("t5"))], "model"),
    }


CASES = [
    "no-model",
    "corrupt-weights",
    "tokenizer-too-big",
    "stride-over-length",
    "stride-zero",
    "short-text",
    "other-tokenizer",
    "empty-corpus",
    "data-and-corpus",
    "pll-on-causal",
    "memorization-corpus",
    "no-text",
    "other-kind",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line(bad, capsys, case):
    argv, words = bad[case]
    assert main(["eval", *argv, "--no-progress"]) == 2
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert out == "" and "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("lmlab eval: error: "), err
    assert words in lines[0], lines[0]


def test_the_real_command_refuses_before_loading(saved_model):
    """The installed command: a flag's mistake is one line, exit 2, before any model is read."""
    r = run_lmlab(["eval", str(saved_model("gpt2")), "--max-length", "32", "--stride", "64"])
    assert_one_line_error(r, "--stride 64 is longer than --max-length 32")
