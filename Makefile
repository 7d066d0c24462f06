# Every target bootstraps .venv itself when it is missing or older than pyproject.toml.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3.13 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.keel-installed
DEMO_OUT ?= demo-out
DEMO_ARGS ?=

.PHONY: demo test lint bench docs test-reliability clean help

help:
	@echo "make demo   - set up .venv and run the whole lifecycle on the embedded simulator"
	@echo "make test   - set up .venv and run the test suite"
	@echo "make lint   - ruff"
	@echo "make bench  - benchmarks side by side with their anchors; writes bench/RESULTS.md"
	@echo "make docs   - regenerate the flagship's docs (examples/card-fraud/docs)"
	@echo "make test-reliability - the slow reliability suite (load, soak, crashes)"

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Keel needs Python 3.11 or newer; set PYTHON=/path/to/python3.11"'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,spark,bench]"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/keel demo --out $(DEMO_OUT) $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-reliability: $(STAMP)
	$(BIN)/python -m pytest -q -m slow tests/reliability

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

FLAGSHIP := examples/card-fraud

# Regenerates the flagship's committed docs from a fresh simulated dataset and training run.
docs: $(STAMP)
	rm -rf $(FLAGSHIP)/.keel $(FLAGSHIP)/reports $(FLAGSHIP)/data
	$(BIN)/keel simulate -o $(FLAGSHIP)/data --seed 0
	$(BIN)/keel train -s $(FLAGSHIP)/keel.toml
	$(BIN)/keel models list -s $(FLAGSHIP)/keel.toml | grep -q champion || \
	  $(BIN)/keel models promote 1 --force --reason "make docs: first model" -s $(FLAGSHIP)/keel.toml
	$(BIN)/keel docs -s $(FLAGSHIP)/keel.toml
	$(BIN)/keel docs --check -s $(FLAGSHIP)/keel.toml

bench: $(STAMP)
	@for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done
	@echo "== bench/bench_handbook.py --ceiling"; $(BIN)/python bench/bench_handbook.py --ceiling
	@echo "Results: bench/RESULTS.md (the handbook runs with --ratios and --more take about an hour each: see there)"

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .ruff_cache
