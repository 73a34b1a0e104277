"""``lmlab pretrain`` alone, for subprocess tests (``python -m lmlab`` also loads every other command)."""

import argparse
import sys

from lmlab.errors import LmlabError
from lmlab.train import cli

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="lmlab pretrain")
    cli.configure(parser)
    args = parser.parse_args(sys.argv[1:])
    try:
        sys.exit(cli.run(args))
    except LmlabError as e:
        print(f"lmlab pretrain: error: {e}", file=sys.stderr)
        sys.exit(2)
