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

# Until `safetynet serve` lands, `run` replays the bundled Derby-like scenario on the embedded
# default (a temporary SQLite database) and prints the Tasks it raises.
run: setup
	$(BIN)/safetynet replay tests/fixtures/hl7v2/derby --format text

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
