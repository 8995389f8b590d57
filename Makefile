# Two commands on a fresh machine: `make run` (the pipeline on the embedded demo) and `make test`.
# Each creates .venv if missing and installs the project first.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Where there is no GPU, pin a CPU build of torch before the project's range is resolved,
# so pip does not pull a multi-GB CUDA build. Override for another CPU wheel or index:
#   make run TORCH_CPU_SPEC="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu"
TORCH_CPU_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
# make test runs the suite in this many pytest-xdist processes, with idle workers taking queued tests
# from busy ones (worksteal). Three on a 2-core CI machine: with two, the cores sat idle 40% of the run
# while tests waited on the servers and child processes they start (benchmarks/RESULTS.md, "make test");
# each test's own processes run single-threaded (tests/conftest.py). PYTEST_WORKERS=0: one process.
PYTEST_WORKERS ?= 3
PYTEST_DIST ?= worksteal

.PHONY: run test lint bench-cpu clean help

help:
	@echo "make run    - run the alignment pipeline once on the embedded demo"
	@echo "make test   - lint and run the test suite"
	@echo "make clean  - remove .venv and the local .alignflow home"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
ifneq ($(HAS_GPU),1)
	$(PY) -m pip install -q $(TORCH_INDEX) "$(TORCH_CPU_SPEC)"
endif
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/alignflow run $(ARGS)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist $(PYTEST_DIST) $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench-cpu: $(STAMP)
	$(PY) benchmarks/cpu_training.py

clean:
	rm -rf $(VENV) .alignflow
