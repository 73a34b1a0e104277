"""``python -m lmlab``: the ``lmlab`` command (as torchrun launches it)."""

import sys

from lmlab.cli import main

sys.exit(main())
