"""``lmlab corrupt``: show what a pre-training objective does to a sentence, like Table 3 of
Raffel et al. 2020 (§3.3).

    lmlab corrupt                                   # span corruption of T5's example sentence
    lmlab corrupt --objective all --seed 3          # every objective at a glance
    lmlab corrupt --objective bert --text "..." --tokenizer data/
"""

from __future__ import annotations

import argparse
from typing import Any

TABLE3_TEXT = "Thank you for inviting me to your party last week ."


class _ObjectiveHelp(str):
    """A help string whose ``{names}`` becomes the registered objectives when help is printed.

    argparse expands help with ``help % params`` only then; the registry imports torch, which
    building the parsers (``lmlab --help`` builds them all) must not pay for.
    """

    def __mod__(self, params: Any) -> str:
        from lmlab.objectives.registry import objective_names

        return str(self).replace("{names}", ", ".join(objective_names())) % params


def objective_help(template: str) -> str:
    """``template`` with ``{names}`` standing for :func:`~lmlab.objectives.registry.objective_names`,
    filled in when argparse prints the help (for every ``--objective`` option)."""
    return _ObjectiveHelp(template)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--objective",
        default="span",
        metavar="NAME",
        help=objective_help("{names}, or all (default: span)"),
    )
    parser.add_argument(
        "--text", default=TABLE3_TEXT, help="the sentence to corrupt (default: T5's Table 3 example)"
    )
    parser.add_argument(
        "--tokenizer",
        metavar="DIR",
        default=None,
        help="a tokenizer.json or a directory with one (default: the prepared default corpus's)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")


def _pieces(tok, ids: list[int]) -> str:
    """Decode ids to text, specials shown by name (``<extra_id_0>``, ``<mask>``, ``</s>``)."""
    special = set(tok.all_special_ids)
    words: list[str] = []
    run: list[int] = []
    for i in [*ids, None]:
        if i is not None and i not in special:
            run.append(i)
            continue
        if run:
            words.append(tok.decode(run).strip())
            run = []
        if i is not None:
            words.append(tok.convert_ids_to_tokens(i))
    return " ".join(w for w in words if w)


def _show(name: str, objective, tokens, tok, seed: int) -> list[tuple[str, str]]:
    import torch

    from lmlab.objectives import IGNORE_INDEX

    batch = objective(tokens, generator=torch.Generator().manual_seed(seed))
    n_in = int(batch["attention_mask"][0].sum())
    inputs = batch["input_ids"][0, :n_in].tolist()
    labels = batch["labels"][0].tolist()
    if "decoder_input_ids" in batch:  # encoder–decoder: the target sequence
        return [
            ("inputs", _pieces(tok, inputs)),
            ("targets", _pieces(tok, [t for t in labels if t != IGNORE_INDEX])),
        ]
    if name == "bert":  # the loss is on the selected positions only
        chosen = [f"{_pieces(tok, [t])}@{i}" for i, t in enumerate(labels) if t != IGNORE_INDEX]
        return [
            ("inputs", _pieces(tok, inputs)),
            ("targets", " ".join(chosen) + "   (original token@position)"),
        ]
    # Decoder-only: one sequence, loss where labels are set.
    predicted = [t for t in labels if t != IGNORE_INDEX]
    return [("inputs", _pieces(tok, inputs)), ("targets", _pieces(tok, predicted) + "   (next-token loss)")]


def run(args: argparse.Namespace) -> int:
    import torch

    from lmlab.data import load_tokenizer
    from lmlab.errors import LmlabError
    from lmlab.objectives.registry import get_objective, objective_names

    known = objective_names()
    names = list(known) if args.objective == "all" else [args.objective]
    if args.objective != "all" and args.objective not in known:
        raise LmlabError(f"unknown objective {args.objective!r}; choose one of {', '.join(known)} or all")
    if args.tokenizer is None:
        from lmlab.cli import env_cache_dir
        from lmlab.data import ensure_default_data

        path = ensure_default_data(cache=env_cache_dir())
    else:
        path = args.tokenizer
    tok = load_tokenizer(path)
    ids = tok(args.text, add_special_tokens=False)["input_ids"]
    tokens = torch.tensor([ids], dtype=torch.long).view(1, len(ids))
    print(f"original  {_pieces(tok, ids)}   ({len(ids)} tokens, seed {args.seed})")
    width = max(len(n) for n in names)
    for name in names:
        rows = _show(name, get_objective(name, tok), tokens, tok, args.seed)
        for j, (what, text) in enumerate(rows):
            label = name if j == 0 else ""
            print(f"{label:<{width}}  {what:<7}  {text}")
    return 0
