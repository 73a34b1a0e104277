# The verbs a newcomer types.  Everything installs into ./.venv; nothing touches the system Python.
#   make run    install lmlab and run the main job on the embedded default corpus
#   make test   install the test dependencies and run the test suite (everything, as CI does)
#   make test-fast   the edit-test loop: every test not marked slow (under 90 s on 2 cores)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch is all the quickstart and the tests need.  Where torch is already
# importable in the venv this is skipped; set TORCH=torch (or a CUDA wheel) to choose another.
TORCH  ?= torch==2.13.0

.PHONY: install install-test run test test-fast lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e .

install-test: install
	$(BIN)/pip install -q -e ".[test]"

run: install
	$(BIN)/lmlab quickstart

test: install-test
	$(BIN)/python -m pytest -q

test-fast: install-test
	$(BIN)/python -m pytest -q -m "not slow"

lint:
	$(BIN)/ruff check src tests bench && $(BIN)/ruff format --check src tests bench

bench: install
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python bench/prepare.py
	$(BIN)/python bench/objectives.py
	$(BIN)/python bench/eval.py
	$(BIN)/python bench/quant_cpu.py
	$(BIN)/python bench/linear.py
	$(BIN)/python bench/loss.py
	$(BIN)/python bench/pretrain.py
	$(BIN)/python bench/mixing.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache runs
	find src -name "*.so" -delete  # the compiled CPU kernel that pip install -e built in place
