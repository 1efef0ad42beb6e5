# One command surface: every target carries a `## description`, and `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.9

.PHONY: help setup run test coverage test-fast test-redis test-cluster lint format audit

help: ## List every target
	@grep -hE '^[a-zA-Z0-9_.-]+:.*## ' $(MAKEFILE_LIST) | sort -u | \
		awk -F':.*## ' '{printf "  \033[36m%-20s\033[0m %s\n", $$1, $$2}'

$(BIN)/uv:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "uv==$(UV_VERSION)"

# Bytecode is written as usual by every process make starts, whatever the environment says:
# pytest keeps its assertion-rewritten test modules there too, and without it each of the
# suite's pytest processes rewrote some 400 modules again (13 CPU-s to collect, not 3.4).
unexport PYTHONDONTWRITEBYTECODE

# The venv's bytecode is compiled at install, so that no process started later compiles the
# same imports (with PYTHONDONTWRITEBYTECODE set and none installed, as in CI's containers, a
# worker's start took 1.8 CPU-s instead of 0.75).
$(VENV)/.synced: $(BIN)/uv pyproject.toml uv.lock
	UV_PROJECT_ENVIRONMENT=$(VENV) $(BIN)/uv sync --frozen --quiet --extra embed --compile-bytecode
	@touch $@

setup: $(VENV)/.synced ## Create or update .venv from the lock file, nothing else

-include mk/*.mk

run: setup ## Start api, worker and an embedded Valkey (or the server at REDIS_URL) in the foreground
	$(BIN)/python tools/run_local.py

# The in-process tests: the package's own, each on the real Redis, none starting a service.
FAST_TESTS := tests/core tests/api tests/worker tests/client tests/observability tests/test_admin.py

# The suite runs in TEST_WORKERS processes (pytest-xdist): most tests wait on servers and
# subprocesses, so six share two cores well (on two cores the parallel part took 8.5 min
# with six, 9.3 with four, its CPU 77% busy). Every server a test starts takes a free port.
# Tests that share a machine-wide resource run in one process (tests/conftest.py groups them);
# tests marked `serial` run afterwards, in two processes: the network-partition tests (one
# group) beside the master-away test, and nothing else (70 s, against 130 one after the
# other, with the same margins). `TEST_WORKERS=0` runs all in this process.
TEST_WORKERS ?= 6
XDIST = -n $(TEST_WORKERS) --dist loadgroup
SERIAL_XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n 2 --dist loadgroup)
# pytest exits 5 when a marker selects no test: a phase with nothing to run has passed.
NONE_SELECTED_IS_FINE = || [ $$? -eq 5 ]

test: setup ## Run the whole test suite against real servers, in parallel
	$(BIN)/pytest $(XDIST) -m "not serial" $(COVERAGE) --durations=20 $(PYTEST_ARGS)
	$(BIN)/pytest $(SERIAL_XDIST) -m serial $(COVERAGE_LAST) $(PYTEST_ARGS) $(NONE_SELECTED_IS_FINE)

# Measuring coverage traces every line the tests run in their own processes: on two cores
# it made the suite about a fifth slower (842 s against 686 s for the parallel part), so
# `make test` leaves it out and `make coverage` runs the same suite with it.
coverage: COVERAGE = --cov --cov-report=
coverage: COVERAGE_LAST = --cov --cov-append --cov-report=term:skip-covered
coverage: test ## The whole suite as `make test` runs it, with the package's coverage report

test-fast: setup ## The inner loop: the in-process tests (no services started), in under a minute
	$(BIN)/pytest $(XDIST) -m "not slow" -q $(FAST_TESTS) $(PYTEST_ARGS)

test-redis: setup ## Run the queue, api and end-to-end tests against Debian's redis-server instead of Valkey
	TEST_REDIS_SERVER=redis $(BIN)/pytest $(XDIST) tests/core tests/api tests/e2e $(PYTEST_ARGS)

test-cluster: setup ## Run the queue, api and end-to-end tests against a local 6-node Redis Cluster
	TEST_REDIS_BACKEND=cluster $(BIN)/pytest $(XDIST) tests/core tests/api tests/e2e $(PYTEST_ARGS)

lint: setup ## Check style (ruff) and types (mypy strict) of the package, tools and tests
	$(BIN)/ruff check services client harness tests tools loadtest
	$(BIN)/ruff format --check services client harness tests tools loadtest
	$(BIN)/mypy

audit: setup ## CycloneDX SBOM of uv.lock's packages and a pip-audit scan of them (reports/audit/); the scan is skipped when PyPI is unreachable
	bash tools/ci/audit.sh

format: setup ## Reformat the code with ruff
	$(BIN)/ruff check --fix services client harness tests tools loadtest
	$(BIN)/ruff format services client harness tests tools loadtest
