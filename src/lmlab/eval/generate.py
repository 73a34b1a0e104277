"""Placeholder while the command is built (replaced in this wave)."""

from __future__ import annotations

import argparse


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL")


def run(args: argparse.Namespace) -> int:
    from lmlab.errors import LmlabError

    raise LmlabError("not built yet")
