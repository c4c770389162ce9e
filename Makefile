# `make up` and `make test` are all the set-up there is: each installs what is missing first.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
PY_STAMP := $(VENV)/.installed
NODE_STAMP := node_modules/.installed
CONTRACTS_STAMP := build/forge/out/.built
# The platform package's own binary: the launcher in node_modules/.bin does not pass forge's exit status on, so a
# failing test or build would look like success. Expanded when a recipe runs, after `npm ci`.
FORGE = $(firstword $(wildcard node_modules/@foundry-rs/forge-*/bin/forge))
LOCK := requirements.lock

.PHONY: install contracts check-lock lock lock-upgrade test test-python test-contracts up lint gas pipeline gateway \
	settlement validation adversary clean gas-snapshot

install: $(PY_STAMP) $(NODE_STAMP) $(CONTRACTS_STAMP)

# Exactly the lock, every file checked against its hash (pip-sync also removes what the lock no longer
# names), then the project itself, built with the lock's setuptools rather than whatever is newest. The lock's
# torch is the CPU build of 2.13.0, which pip finds on this kind of machine through its find-links.
$(PY_STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || python3 -m venv $(VENV)
	test -x $(BIN)/pip-sync || $(BIN)/python -m pip install --quiet --require-hashes --no-deps -r $(LOCK)
	$(BIN)/pip-sync --quiet --pip-args '--no-deps' $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# The lock is compiled from pyproject.toml by pip-tools, keeping every pin that still satisfies it: `make lock`
# after editing pyproject.toml changes only what the edit needs. `make lock-upgrade` moves every pin to the
# newest release pyproject.toml admits (PACKAGE=name moves only that one).
PIP_COMPILE = CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile --quiet --all-extras --generate-hashes \
	--allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links --output-file $(LOCK) pyproject.toml

lock: $(PY_STAMP)
	$(PIP_COMPILE)

lock-upgrade: $(PY_STAMP)
	$(PIP_COMPILE) $(if $(PACKAGE),--upgrade-package $(PACKAGE),--upgrade)

check-lock: install
	$(BIN)/python bin/check-lock

# forge and anvil arrive as per-platform optional dependencies; solc-js runs behind bin/solc.
$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund
	touch $@

# The contracts' ABIs and bytecode, built once; gateways, workers and providers only read them.
contracts: $(CONTRACTS_STAMP)

$(CONTRACTS_STAMP): $(NODE_STAMP) foundry.toml $(shell find contracts/src -name '*.sol')
	$(FORGE) build --skip test
	touch $@

test: install check-lock test-python test-contracts

test-python: install
	$(BIN)/pytest

# The settlement path's gas, pinned: a change in what redeem, postRoot, claim or slash cost fails the build until
# `make gas-snapshot` records it (and the change says why).
test-contracts: install
	$(FORGE) test
	$(FORGE) snapshot --match-contract GasSnapshotTest --check contracts/.gas-snapshot

gas-snapshot: install
	$(FORGE) snapshot --match-contract GasSnapshotTest --snap contracts/.gas-snapshot

up: install
	$(BIN)/strata up

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy marketplace settlement worker

gas: install
	$(BIN)/python -m benchmarks.gas

pipeline: install
	$(BIN)/python -m benchmarks.pipeline

gateway: install
	$(BIN)/python -m benchmarks.gateway

settlement: install
	$(BIN)/python -m benchmarks.settlement

validation: install
	$(BIN)/python -m benchmarks.validation

adversary: install
	$(BIN)/python -m benchmarks.adversary

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
