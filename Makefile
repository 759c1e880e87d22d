# One entry point for people and CI. `make setup` is idempotent: it rebuilds .venv only when
# pyproject.toml changed since the last install.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test check lint typecheck bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The service on the embedded default (SQLite under ./var). Until `safetynet serve` exists,
# this replays the bundled Derby-like demo into ./var/safetynet.db and prints its Tasks.
run: setup
	mkdir -p var
	$(BIN)/safetynet replay tests/fixtures/hl7v2/derby --db sqlite:///var/safetynet.db --format text

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff format --check engine adapters rules tests bench
	$(BIN)/ruff check engine adapters rules tests bench

typecheck: setup
	$(BIN)/mypy engine adapters

check: lint typecheck test

bench: setup
	$(BIN)/python bench/bench_replay.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache var
