# One-command entry points (see README). Works on a fresh machine with Python >= 3.10 and pip.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup peers-env demo test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned to the CPU build first; a bare `torch` requirement would pull a multi-GB CUDA build.
setup: $(BIN)/python
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"

# ANTs (antspyx) in its own environment: it would downgrade numpy/scipy in the main one. Optional: the ANTs tests
# skip with a reason when it is missing, so a failed install does not fail the tests.
peers-env:
	test -x .venv-peers/bin/python || $(PY) -m venv .venv-peers
	.venv-peers/bin/python -c "import ants" 2>/dev/null || .venv-peers/bin/pip install -q "antspyx==0.6.3"

demo: setup
	$(BIN)/dinoreg demo --out results/demo

test: setup
	-$(MAKE) peers-env
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/convex_adam_vs_official.py

clean:
	rm -rf $(VENV) build *.egg-info
