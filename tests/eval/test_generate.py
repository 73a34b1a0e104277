"""lmlab.eval.generate (lmlab.eval.sampling) and ``lmlab generate``: T5 sentinel filling (golden), prompt framing, greedy
decoding against a hand-written argmax loop, seeded sampling, and the command on float, NF4 and
foreign (Qwen2) models, with its one-line errors."""

from __future__ import annotations

import copy
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from lmlab_cli_harness import assert_one_line_error, run_lmlab  # noqa: E402

from lmlab.cli import main  # noqa: E402
from lmlab.eval.load import load_for_eval  # noqa: E402
from lmlab.eval.sampling import _decode, fill_sentinels, generate, prompt_ids, sentinel_spans  # noqa: E402

PROMPT = "Call me Ishmael."


# ------------------------------------------------------------------------------ fill_sentinels


@pytest.mark.parametrize(
    ("prompt", "output", "filled"),
    [
        (
            "The <extra_id_0> sat on the <extra_id_1>.",
            "<pad><extra_id_0> cat<extra_id_1> mat</s>",
            "The [cat] sat on the [mat].",
        ),
        # T5 often closes its target with the next sentinel; text before the first one is not a span
        ("The <extra_id_0> sat.", "junk <extra_id_0> big cat <extra_id_1></s>", "The [big cat] sat."),
        # spans by number, not by order; a span the output lacks is [?], an empty one []
        (
            "<extra_id_0> and <extra_id_1> and <extra_id_2>",
            "<extra_id_1> b<extra_id_0> a<extra_id_3>",
            "[a] and [b] and [?]",
        ),
        ("a <extra_id_0> b", "<extra_id_0><extra_id_1> x", "a [] b"),
        ("no sentinels here", "<extra_id_0> x", "no sentinels here"),
    ],
)
def test_fill_sentinels_golden(prompt, output, filled):
    assert fill_sentinels(prompt, output) == filled


def test_sentinel_spans_keep_the_first_span_of_a_repeated_sentinel():
    assert sentinel_spans("<extra_id_0> a <extra_id_0> b") == {0: "a"}
    assert fill_sentinels("x <extra_id_0>", "<extra_id_0> y", mark="<<{}>>") == "x <<y>>"


# ------------------------------------------------------------------------------------ prompts


def test_prompt_ids_drop_the_trailing_eos_for_causal_models_only(eval_tokenizer):
    full = eval_tokenizer(PROMPT)["input_ids"]
    assert full[-1] == eval_tokenizer.eos_token_id == 1
    assert prompt_ids(eval_tokenizer, PROMPT, "decoder") == full[:-1]
    assert prompt_ids(eval_tokenizer, PROMPT, "encoder-decoder") == full
    assert prompt_ids(eval_tokenizer, "", "decoder") == [1]  # unconditional: starts from EOS (no BOS)


def test_prompt_ids_keep_a_leading_bos(eval_tokenizer):
    from tokenizers.processors import TemplateProcessing

    tok = copy.deepcopy(eval_tokenizer)
    # a tokenizer that frames a text as "<mask> text </s>", standing in for a BOS-adding one
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<mask> $A </s>", special_tokens=[("<mask>", 3), ("</s>", 1)]
    )
    plain = tok(PROMPT, add_special_tokens=False)["input_ids"]
    assert tok(PROMPT)["input_ids"] == [3, *plain, 1]
    assert prompt_ids(tok, PROMPT, "decoder") == [3, *plain]


# ---------------------------------------------------------------------------------- decoding


def _argmax_continuation(model, tok, n: int) -> str:
    """The greedy continuation by hand: the full forward every step, no cache, stop at eos."""
    ids = prompt_ids(tok, PROMPT, "decoder")
    start = len(ids)
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(nxt)
            if nxt == tok.eos_token_id:
                break
    head = tok.decode(ids[:start], skip_special_tokens=True)
    full = tok.decode(ids, skip_special_tokens=True)
    assert full.startswith(head)
    return full[len(head) :]


def test_a_continuation_keeps_the_space_before_its_first_word(eval_tokenizer):
    full = prompt_ids(eval_tokenizer, "Call me Ishmael", "decoder")
    head = prompt_ids(eval_tokenizer, "Call me", "decoder")
    assert full[: len(head)] == head
    assert eval_tokenizer.decode(full[len(head) :]) == "Ishmael"  # decoded alone, the space is lost
    assert _decode(eval_tokenizer, head, full, "decoder", set()) == " Ishmael"


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory, eval_tokenizer):
    """A random tiny Qwen2ForCausalLM (a model type lmlab does not train) on the fixture vocabulary."""
    import transformers

    cfg = transformers.Qwen2Config(
        vocab_size=len(eval_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        eos_token_id=1,
        pad_token_id=0,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.Qwen2ForCausalLM(cfg)
    d = tmp_path_factory.mktemp("qwen2") / "model"
    from lmlab.models.presets import quiet_hf_progress

    with quiet_hf_progress():
        model.save_pretrained(d)
    eval_tokenizer.save_pretrained(d)
    return d


def test_greedy_is_the_argmax_chain(tiny_model, eval_tokenizer, qwen2_dir):
    gpt = tiny_model("gpt2")
    got = generate(gpt, eval_tokenizer, PROMPT, max_new_tokens=6, temperature=0)
    assert got == [_argmax_continuation(gpt, eval_tokenizer, 6)]

    qwen = load_for_eval(qwen2_dir)
    assert qwen.kind == "decoder" and qwen.family.name == "qwen2"  # the generic family
    assert qwen.description.startswith("Qwen2ForCausalLM (qwen2, ")
    got = generate(qwen.model, qwen.tokenizer, PROMPT, max_new_tokens=6, temperature=0)
    assert got == [_argmax_continuation(qwen.model, qwen.tokenizer, 6)]


def test_sampling_is_seeded_and_leaves_the_callers_rng_alone(tiny_model, eval_tokenizer):
    gpt = tiny_model("gpt2")
    kw = dict(max_new_tokens=3, temperature=1.0)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    two = generate(gpt, eval_tokenizer, PROMPT, seed=0, num_samples=2, **kw)
    assert torch.equal(torch.get_rng_state(), before)
    assert len(two) == 2 and two[0] != two[1]
    assert generate(gpt, eval_tokenizer, PROMPT, seed=0, **kw) == two[:1]  # samples in turn from one seed
    assert generate(gpt, eval_tokenizer, PROMPT, seed=1, **kw) != two[:1]
    # top-k 1 and a vanishing nucleus keep only the argmax, whatever the temperature
    greedy = generate(gpt, eval_tokenizer, PROMPT, max_new_tokens=3, temperature=0)
    assert generate(gpt, eval_tokenizer, PROMPT, max_new_tokens=3, temperature=5.0, top_k=1) == greedy
    assert generate(gpt, eval_tokenizer, PROMPT, max_new_tokens=3, temperature=5.0, top_p=1e-9) == greedy


# ------------------------------------------------------------------------------------ the CLI


def test_cli_streams_prompt_and_continuation(saved_model, tiny_model, eval_tokenizer, capsys):
    assert (
        main(
            [
                "generate",
                str(saved_model("gpt2")),
                "--prompt",
                PROMPT,
                "--temperature",
                "0",
                "--max-new-tokens",
                "6",
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    head = eval_tokenizer.decode(prompt_ids(eval_tokenizer, PROMPT, "decoder"), skip_special_tokens=True)
    greedy = generate(tiny_model("gpt2"), eval_tokenizer, PROMPT, max_new_tokens=6, temperature=0)[0]
    assert out == head + greedy + "\n"
    last = err.strip().splitlines()[-1]  # (the fixture's first save may print its progress first)
    assert last.startswith("lmlab generate: GPT2LMHeadModel (gpt2, ") and "float32" in last


def test_cli_samples_in_turn_with_separators(saved_model, tiny_model, eval_tokenizer, capsys):
    args = [
        "generate",
        str(saved_model("llama")),
        "--prompt",
        PROMPT,
        "--max-new-tokens",
        "4",
        "--num-samples",
        "2",
    ]
    assert main([*args, "--seed", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    head = eval_tokenizer.decode(prompt_ids(eval_tokenizer, PROMPT, "decoder"), skip_special_tokens=True)
    samples = generate(tiny_model("llama"), eval_tokenizer, PROMPT, max_new_tokens=4, num_samples=2, seed=3)
    assert out == ["--- sample 1 of 2 ---", head + samples[0], "--- sample 2 of 2 ---", head + samples[1]]


def test_cli_t5_sentinel_prompt_prints_the_filled_text(saved_model, tiny_model, eval_tokenizer, capsys):
    prompt = "The <extra_id_0> sat on the <extra_id_1>."
    assert (
        main(
            [
                "generate",
                str(saved_model("t5")),
                "--prompt",
                prompt,
                "--temperature",
                "0",
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out.splitlines()
    [text] = generate(tiny_model("t5"), eval_tokenizer, prompt, max_new_tokens=4, temperature=0)
    assert out == [text, f"filled: {fill_sentinels(prompt, text)}"]
    assert "<pad>" not in text and "</s>" not in text


def test_cli_nf4_quantized_model(saved_model, tmp_path, capsys):
    out_dir = tmp_path / "gpt2-nf4"
    assert main(["quantize", str(saved_model("gpt2")), "--method", "nf4", "--out", str(out_dir)]) == 0
    capsys.readouterr()
    m = load_for_eval(out_dir)
    assert m.quantized == "nf4" and "NF4 + float32" in m.description
    expected = generate(m.model, m.tokenizer, PROMPT, max_new_tokens=4, temperature=0)[0]
    assert (
        main(["generate", str(out_dir), "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "4"])
        == 0
    )
    out, err = capsys.readouterr()
    assert out.endswith(expected + "\n") and "NF4" in err
    # bfloat16: the quantized layers keep their codes, the rest follows
    b = load_for_eval(out_dir, dtype="bfloat16")
    q, qb = m.model.transformer.h[0].attn.c_attn, b.model.transformer.h[0].attn.c_attn
    assert torch.equal(q.weight, qb.weight) and qb.weight_absmax.dtype == q.weight_absmax.dtype
    assert b.model.transformer.wte.weight.dtype == torch.bfloat16 and "NF4 + bfloat16" in b.description
    assert len(generate(b.model, b.tokenizer, PROMPT, max_new_tokens=2, temperature=0)) == 1
    # without lmlab's own files it is a transformers + bitsandbytes directory (quantization_config)
    bnb = tmp_path / "bnb"
    shutil.copytree(out_dir, bnb, ignore=shutil.ignore_patterns("lmlab_quant.json", "manifest.json"))
    c = load_for_eval(bnb)
    assert c.quantized == "nf4" and generate(
        c.model, c.tokenizer, PROMPT, max_new_tokens=4, temperature=0
    ) == [expected]


def test_cli_foreign_model_type(qwen2_dir, capsys):
    assert main(["generate", str(qwen2_dir), "--prompt", PROMPT, "--max-new-tokens", "3"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("Call me Ishmael.") and "Qwen2ForCausalLM" in err


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--prompt", ""], ["--prompt is empty"]),
        (["--prompt", "   "], ["--prompt is empty"]),
        (["--max-new-tokens", "0"], ["--max-new-tokens", "positive"]),
        (["--temperature", "-0.5"], ["--temperature", ">= 0"]),
        (["--temperature", "nan"], ["--temperature", "finite"]),
        (["--top-k", "0"], ["--top-k", "positive"]),
        (["--top-p", "0"], ["--top-p", "(0, 1]"]),
        (["--top-p", "1.5"], ["--top-p", "(0, 1]"]),
        (["--num-samples", "0"], ["--num-samples", "positive"]),
        (["--max-new-tokens", "1100"], ["1024 positions"]),
    ],
)
def test_cli_bad_settings_are_one_line(saved_model, capsys, flags, words):
    args = ["generate", str(saved_model("gpt2")), "--prompt", PROMPT, *flags]
    assert main(args) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == ""
    assert lines[-1].startswith("lmlab generate: error: ") and "Traceback" not in err
    assert all(w in lines[-1] for w in words), lines[-1]


def test_cli_refuses_a_masked_lm(saved_model, capsys):
    assert main(["generate", str(saved_model("bert")), "--prompt", PROMPT]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "lmlab generate: error: lmlab generate needs a causal or T5 model; BertForMaskedLM is a masked language model"
    )


def test_subprocess_exit_status_and_one_line(saved_model):
    # The real interpreter and entry point (the settings are checked before torch is imported).
    r = run_lmlab(["generate", str(saved_model("gpt2")), "--prompt", PROMPT, "--top-p", "2"])
    assert r.stdout == ""
    assert_one_line_error(r, "--top-p", "(0, 1]")
