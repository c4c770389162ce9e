# `make up` and `make test` are all the set-up there is: each installs what is missing first.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
PY_STAMP := $(VENV)/.installed
NODE_STAMP := node_modules/.installed

.PHONY: install test test-python test-contracts up lint gas pipeline gateway settlement validation clean

install: $(PY_STAMP) $(NODE_STAMP)

# pip finds the CPU build of torch==2.13.0 on this kind of machine; any other torch would pull CUDA wheels.
$(PY_STAMP): pyproject.toml
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# forge and anvil arrive as per-platform optional dependencies; solc-js runs behind bin/solc.
$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund
	touch $@

test: install test-python test-contracts

test-python: install
	$(BIN)/pytest

test-contracts: install
	node_modules/.bin/forge test

up: install
	$(BIN)/strata up

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy marketplace settlement worker

gas: install
	$(BIN)/python benchmarks/gas.py

pipeline: install
	$(BIN)/python benchmarks/pipeline.py

gateway: install
	$(BIN)/python benchmarks/gateway.py

settlement: install
	$(BIN)/python benchmarks/settlement.py

validation: install
	$(BIN)/python benchmarks/validation.py

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
