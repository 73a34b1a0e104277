"""The ``lmlab`` command line: one subcommand per job, each a thin wrapper over the library.

    lmlab prepare   --corpus PATH ... --out DIR      corpus -> tokenizer -> token shards
    lmlab corrupt   --objective span                 show a pre-training objective on a sentence
    lmlab pretrain  --data DIR --objective span ...  train T5 / BERT / GPT
    lmlab quantize  MODEL_DIR --method nf4 ...       LLM.int8() / NF4 / FP4 / int4 a saved model
    lmlab eval      MODEL [--data DIR | --corpus ...] perplexity, bits per byte, KL to a base, memorization
    lmlab generate  MODEL --prompt TEXT              sample from a causal or T5 model
    lmlab quickstart                                 the README's main job, end to end

Each subcommand lives in the package of its concern as a module with two functions,
``configure(parser)`` (adds its arguments; imports nothing heavy) and ``run(args) -> int``.
A user's mistake raises :class:`lmlab.errors.LmlabError` and is printed here as one line with
exit status 2; so is an error of the file system the user pointed lmlab at (a read-only or full
disk, a permission, a path under a file), named with the file it concerns.

The environment variables lmlab knows (``LMLAB_CACHE``, ``XDG_CACHE_HOME``, ``LMLAB_ONEDNN``) are
read here, by :func:`env_cache_dir` and :func:`env_onednn_policy`, and passed to the library as
arguments; library code reads none (torchrun's ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` aside).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from pathlib import Path

from lmlab import __version__
from lmlab.errors import LmlabError
from lmlab.quant.formats import METHODS  # the registered formats; imports no torch

# name -> (module with configure/run, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("lmlab.data.cli", "turn a text corpus into a tokenizer and token shards"),
    "corrupt": ("lmlab.objectives.cli", "show what a pre-training objective does to a sentence"),
    "pretrain": ("lmlab.train.cli", "pre-train a T5, BERT, GPT-2 or Llama model with any objective"),
    "quantize": ("lmlab.quant.cli", f"quantize a saved model ({', '.join(METHODS)})"),
    "eval": ("lmlab.eval.cli", "perplexity, bits per byte, quantization damage and memorization of a model"),
    "generate": ("lmlab.eval.sampling", "sample text from a causal or T5 model, float or quantized"),
    "quickstart": ("lmlab.quickstart", "the main job on the embedded default corpus, end to end"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmlab",
        description="Pre-train, evaluate and quantize language models.",
    )
    parser.add_argument("--version", action="version", version=f"lmlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        importlib.import_module(module).configure(p)
        p.set_defaults(_module=module)
    return parser


# ---------------------------------------------------------------------------------------------- environment
# The only environment variables lmlab reads, read here and passed down to the library as arguments.


def env_cache_dir() -> Path | None:
    """lmlab's cache from the environment: ``$LMLAB_CACHE``, else ``$XDG_CACHE_HOME/lmlab``, else None
    (the library's default, ``~/.cache/lmlab``)."""
    if os.environ.get("LMLAB_CACHE"):
        name, path = "LMLAB_CACHE", Path(os.environ["LMLAB_CACHE"])
    elif os.environ.get("XDG_CACHE_HOME"):
        name, path = "XDG_CACHE_HOME", Path(os.environ["XDG_CACHE_HOME"]) / "lmlab"
    else:
        return None
    # Named here, where the user set it: deeper down it would read as a mistake of some --out.
    blocked = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        from lmlab.errors import LmlabError

        raise LmlabError(f"${name} points at {path}, but {blocked} is a file, not a directory")
    return path


def env_peak_tflops() -> float | None:
    """``$LMLAB_PEAK_TFLOPS``: the accelerator's dense peak for the MFU that ``lmlab pretrain`` shows
    (for a part the table does not know); unset is None."""
    from lmlab.errors import LmlabError

    raw = os.environ.get("LMLAB_PEAK_TFLOPS", "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise LmlabError(f"LMLAB_PEAK_TFLOPS must be a positive number of TFLOP/s, got {raw!r}")
    return value


def env_onednn_policy() -> str:
    """``$LMLAB_ONEDNN`` (auto, 1/on, 0/off; unset is auto): the oneDNN policy a command passes down."""
    return os.environ.get("LMLAB_ONEDNN", "auto")


def os_error_line(e: OSError) -> str:
    """One line for an error of the file system: what failed, and on which path."""
    from lmlab.io import disk_error, is_disk_full

    path = e.filename if e.filename is not None else "?"
    if is_disk_full(e):
        return str(disk_error(path))
    what = e.strerror or str(e)
    if e.filename2 is not None:
        return f"{what}: {path} -> {e.filename2}"
    return f"{what}: {path}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(args._module)
    # A full disk under a file-size limit (ulimit -f) is EFBIG from write(), not a killing SIGXFSZ.
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        return int(module.run(args) or 0)
    except LmlabError as e:
        one_line = " ".join(str(e).split("\n"))  # a message quoting a library's multi-line text
        print(f"lmlab {args.command}: error: {one_line}", file=sys.stderr)
        return 2
    except OSError as e:
        if isinstance(e, BrokenPipeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        print(f"lmlab {args.command}: error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lmlab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
