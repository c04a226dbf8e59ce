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

.PHONY: setup run test clean

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
	$(BIN)/python -m pip install -q -e ".[train,hf,dev]"
	touch $(STAMP)

RUN_DIR ?= runs/default-$(shell date +%Y%m%d-%H%M%S)

# The main job: build the default shards (once), train `tiny` on CPU through the deepspeed
# launcher (2 processes, ZeRO-2), evaluate, print a generation sample.
run: $(STAMP) data/shards/manifest.json
	$(BIN)/deepspeed --num_gpus 2 launch/train.py --ds_config configs/ds/zero2.json \
	  --config configs/default_cpu.yaml --out_dir=$(RUN_DIR)
	@echo "run directory: $(RUN_DIR) (metrics.jsonl, loss_curve.png, sample.txt, checkpoints/)"

data/shards/manifest.json: | $(STAMP)
	$(BIN)/python data_pipeline/build_shards.py --output data/shards

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) runs data
