# stunner-guard: one command per habit. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8443
export PORT

.DEFAULT_GOAL := help

# Prometheus' own binaries: promtool checks and unit-tests the alert rules, a real prometheus
# scrapes the real server (tests/test_observability.py, tests/test_prometheus_e2e.py).
PROMTOOL ?= $(shell command -v promtool)
PROMETHEUS ?= $(shell command -v prometheus)
export PROMTOOL PROMETHEUS

.PHONY: help install certs run test test-fast lint bench dashboard clean prometheus-tools

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed ## create .venv and install the service with its dev tools

certs: $(BIN)/.installed ## make the development CA and serving cert in certs/ (kept if present)
	$(BIN)/python -m webhooks.certs certs

# Locally the drain endpoint is this very server, so injected preStop hooks point here.
run: certs ## serve HTTPS on 127.0.0.1:$(PORT) with the built-in policy (no cluster needed)
	STUNNER_GUARD_DRAIN_HOST=$${STUNNER_GUARD_DRAIN_HOST:-127.0.0.1} \
	STUNNER_GUARD_DRAIN_PORT=$${STUNNER_GUARD_DRAIN_PORT:-$(PORT)} \
	$(BIN)/gunicorn --config gunicorn.conf.py

prometheus-tools:
	@if [ -z "$(PROMTOOL)" ] || [ -z "$(PROMETHEUS)" ]; then \
	  echo "make test needs Prometheus' promtool and prometheus: apt-get install --no-install-recommends prometheus (Debian, Ubuntu), or set PROMTOOL and PROMETHEUS to a Prometheus release's binaries" >&2; \
	  exit 1; \
	fi

test: $(BIN)/.installed prometheus-tools ## run the whole test suite, end-to-end tests included
	$(BIN)/python -m pytest

test-fast: $(BIN)/.installed prometheus-tools ## run the suite without the end-to-end tests
	$(BIN)/python -m pytest -m 'not e2e'

lint: $(BIN)/.installed ## ruff
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: certs ## load benchmarks against the real server; prints the figures
	$(BIN)/python -m bench

dashboard: $(BIN)/.installed ## regenerate the Grafana dashboard JSON from observability/dashboard.py
	$(BIN)/python -m observability.dashboard

clean: ## remove the venv and caches (certs stay)
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
