# Fresh machine: `make run` sets up .venv and runs the default (smoke) matrix; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MATRIX ?= smoke
# Test workers (pytest-xdist): the tests are single-threaded, so one per core; 2 cores here.
TEST_WORKERS ?= 2

.PHONY: setup run test test-slow gpu-check docs mutate clean

setup: $(STAMP)

# torch/torchvision first, then the rest from the package index. TORCH_SPEC pins them: the releases on this
# workplace's disk, for Python 3.11 only (3.12+ downloads them from the index: torch's CUDA build and triton).
# TORCH_INDEX_URL, if set, replaces the package index for them (pip --index-url), e.g.
# https://download.pytorch.org/whl/cpu for a CPU-only build. Either takes effect in a new .venv (rm -rf .venv).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
TORCH_INDEX_URL ?=

# pip builds the editable install in a temporary env with pyproject's [build-system] setuptools: 3.12+ venvs
# have none, so --no-build-isolation failed there unless the torch wheel happened to pull setuptools in.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(if $(TORCH_INDEX_URL),--index-url '$(TORCH_INDEX_URL)') \
		$(foreach s,$(TORCH_SPEC),'$(s)')
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m bench run --matrix $(MATRIX)

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS)

# On a machine with a GPU: every component, bench run, faults, host syncs and throughput on CUDA (under 8 min on
# one H100), then the tests marked gpu (deselected by pyproject's addopts; -m on the command line overrides it).
gpu-check: $(STAMP)
	$(PY) -m bench selfcheck --device cuda
	$(PY) -m pytest -q -m gpu

# The README's component table is `bench list --markdown` of the built-ins: regenerate it after adding one.
docs: $(STAMP)
	$(PY) -m bench list --markdown --update README.md

# Mutation testing (mutmut 3, tests/mutate.py) of the harness modules that decide results, each against its fast
# tests: a score per module; survivors must be killed by a test or listed in tests/equivalent_mutants.toml.
# MODULE=bench/store/cache.py runs one module (what a contributor runs on the module they changed).
MODULE ?=
mutate: $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[mutate]'
	$(PY) tests/mutate.py $(if $(MODULE),--module $(MODULE))

test-slow: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m slow

# Keeps what git tracks under results/ (README.md, runs/dh-table1-cpu/records.jsonl: see results/README.md).
clean:
	rm -rf results/cache results/leaderboards results/reports results/claims
	find results/runs -mindepth 1 ! -path results/runs/dh-table1-cpu ! -path results/runs/dh-table1-cpu/records.jsonl \
		-delete 2>/dev/null || true
