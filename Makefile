# One entry point for people and CI. `make setup` is idempotent: it rebuilds .venv only when
# pyproject.toml changed since the last install.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run demo test check lint typecheck bench safety-case clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The live service on the embedded default: SQLite in ./var/safetynet.db, MLLP on 2575, HTTP
# (health, metrics) on 8080. Settings: `safetynet serve --help`.
run: setup
	$(BIN)/safetynet serve

# Replay the bundled Derby-like scenario (a temporary SQLite database) and print its Tasks.
demo: setup
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
	$(BIN)/python bench/bench_serve.py
	$(BIN)/python bench/bench_fhir.py
	$(BIN)/python bench/bench_backtest.py

# Regenerate the clinical safety case summary from the hazard log (for each release).
safety-case: setup
	$(BIN)/safetynet safety check
	$(BIN)/safetynet safety report --out safety/safety-case.md

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache var
