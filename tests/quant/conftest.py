"""Make ``quant_helpers`` importable from the test files of this package (tests/quant is a package)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
