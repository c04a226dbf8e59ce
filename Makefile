# `make run` and `make test` set everything up on a fresh machine first (.venv, CPU torch
# where there is no GPU), then run the main job or the test suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# DeepSpeed JIT-builds its CPU comm op once per venv, not once per run or test.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions
export PYTHONUNBUFFERED := 1
# Tests and the default job never reach wandb's servers.
export WANDB_MODE ?= offline

.PHONY: setup run test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# Without a GPU take the CPU build of torch; an unpinned torch pulls a multi-GB CUDA build.
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  $(BIN)/python -m pip install -q torch; \
	else \
	  $(BIN)/python -m pip install -q torch==2.13.0; \
	fi
	$(BIN)/python -m pip install -q -e ".[train,dev]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python launch/main.py

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) runs data
