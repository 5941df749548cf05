# One-command entry points (see README). Works on a fresh machine with Python >= 3.10 and pip.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned to the CPU build first; a bare `torch` requirement would pull a multi-GB CUDA build.
setup: $(BIN)/python
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"

demo: setup
	$(BIN)/dinoreg demo --out results/demo

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/convex_adam_vs_official.py

clean:
	rm -rf $(VENV) build *.egg-info
