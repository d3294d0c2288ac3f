# Two commands do all set-up: `make demo` (install + main job) and `make test` (install + tests).
# Test lanes: `make test` runs every test (what CI runs: .ci/run); `make test-fast` skips the tests marked
# `slow` (chi-square law tests, RL and demo runs, Ray, subprocess CLI runs) for the inner edit-test loop.
# Both run on TEST_WORKERS pytest-xdist workers (one per core of the 2-core CI machine; torch uses one thread per
# worker, tests/conftest.py); TEST_WORKERS=0 runs in this process.
# `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch==2.13.0 is installed first: an unpinned torch would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
TEST_WORKERS ?= 2
PYTEST := $(BIN)/pytest -n $(TEST_WORKERS) --dist worksteal

.PHONY: help install demo test test-fast lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[dev,ray,trl]"
	touch $@

help:
	@echo "make install    virtual env in $(VENV) with bebop and its dev + ray + trl extras (CPU torch)"
	@echo "make demo       install, then the end-to-end demo into runs/demo"
	@echo "make test       lint + every test, slow lanes included (what CI runs)"
	@echo "make test-fast  lint + the tests not marked slow (inner loop, a few minutes on 2 cores)"
	@echo "make lint       ruff over src, tests and benchmarks"
	@echo "make clean      remove the virtual env, runs/ and tool caches"

install: $(BIN)/.installed

demo: install
	$(BIN)/bebop demo --out runs/demo

test: install
	$(BIN)/ruff check src tests benchmarks
	$(PYTEST) --durations=15

test-fast: install
	$(BIN)/ruff check src tests benchmarks
	$(PYTEST) -m "not slow"

lint: install
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
