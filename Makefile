# Fresh machine: `make run` sets up .venv and runs the default (smoke) matrix; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MATRIX ?= smoke
# Test workers (pytest-xdist): the tests are single-threaded, so one per core; 2 cores here.
TEST_WORKERS ?= 2

.PHONY: setup run test test-slow clean

setup: $(STAMP)

# torch/torchvision first, pinned to the releases on this workplace's disk; the rest from the package index.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m bench run --matrix $(MATRIX)

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m slow

# Keeps what git tracks under results/ (README.md, runs/dh-table1-cpu/records.jsonl: see results/README.md).
clean:
	rm -rf results/cache results/leaderboards results/reports results/claims
	find results/runs -mindepth 1 ! -path results/runs/dh-table1-cpu ! -path results/runs/dh-table1-cpu/records.jsonl \
		-delete 2>/dev/null || true
