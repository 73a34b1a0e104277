"""Tests of lmlab.objectives, one file per module (a package so that test_cli.py does not clash with tests/test_cli.py)."""
