# Two commands on a fresh machine (python3 and make): `make train` and `make test`. Both create .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: train train-ddp preflight test test-quick lint format docs bench clean

$(STAMP): setup.cfg constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	@# W&B's sweep engine (scripts/sweep.py) declares numpy<2 but runs on the pinned numpy 2: no dependency resolution
	$(BIN)/python -m pip install -q --no-deps -c constraints.txt sweeps jsonref
	touch $(STAMP)

# One CPU process needs no launcher, and without one Ctrl+C reaches the training process alone: it checkpoints and
# exits 75 (accelerate's launcher would also get the SIGINT and print a KeyboardInterrupt traceback of its own).
train: $(STAMP)  ## the main job: tiny GPT-2 on the stdlib corpus; re-run to resume
	$(BIN)/python scripts/train.py --config configs/tiny_lm.yaml $(ARGS)

# Ctrl+C/SIGTERM reach the launcher, which gives the workers TORCH_ELASTIC_SHUTDOWN_TIMEOUT s to checkpoint before
# SIGKILL: sized from what this output dir's earlier runs measured (resumable/signal_lead.py).
train-ddp: $(STAMP)  ## the same job on 2 CPU processes (DDP over gloo)
	out=$$($(BIN)/python -m resumable.config --get output_dir --config configs/tiny_lm.yaml $(ARGS)) && \
	TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-$$($(BIN)/python -m resumable.signal_lead --shutdown-timeout "$$out")} \
	$(BIN)/accelerate launch --config_file accelerate_configs/cpu_ddp.yaml scripts/train.py --config configs/tiny_lm.yaml $(ARGS)

preflight: $(STAMP)  ## will `make train ARGS=...` work here? one OK/WARN/FAIL line per check; exit 1 on a blocker
	$(BIN)/python scripts/preflight.py --config configs/tiny_lm.yaml $(ARGS)

test: $(STAMP)  ## the whole suite (slow multi-process and chaos tests included)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
	$(BIN)/pytest tests $(ARGS)

test-quick: $(STAMP)  ## skip the slow multi-process/chaos tests
	$(BIN)/pytest tests -m "not slow" $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

docs: $(STAMP)  ## regenerate the README's flag table from the config dataclass
	$(BIN)/python -m resumable.config README.md

bench: $(STAMP)  ## train.py vs a raw loop, accelerate and the HF Trainer (~25 min), then async saves on GPT-2 124M
	$(BIN)/python benchmarks/compare.py $(ARGS)
	$(BIN)/python benchmarks/async_save.py --repeats 3

clean:
	rm -rf $(VENV) outputs
