# The two README commands are `make demo` and `make test`; the rest are their steps.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed-dev
PYTEST_ARGS ?=

export DATABASE_URL ?= postgres://dcc:dcc@127.0.0.1:5432/dcc
export CELERY_BROKER_URL ?= redis://127.0.0.1:6379/0
export DOCKER_HOST ?= unix:///var/run/docker.sock
export DCC_TEST_IMAGE ?= dcc-test-busybox:latest

.PHONY: test demo install services lint typecheck migrations-check pytest bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

$(STAMP): $(PY) setup.cfg pyproject.toml
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

services:
	bash scripts/services.sh all

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install
	$(VENV)/bin/mypy

migrations-check: install
	$(PY) -m django makemigrations --check --dry-run --settings=tests.settings

pytest: install
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# Installs what the tests need, starts PostgreSQL, Redis and Docker, then checks everything.
test: install services lint typecheck migrations-check pytest

bench: install services
	$(PY) bench/claim_throughput.py
	$(PY) bench/admin_changelist.py
	$(PY) bench/dispatch_overhead.py
	$(PY) bench/throughput.py
	$(PY) bench/detached_capacity.py
	$(PY) bench/log_capture.py

# The demo runs on its own defaults (SQLite, a folder broker) unless the caller set
# DATABASE_URL or CELERY_BROKER_URL: the values exported above are the tests' services.
demo: install
	$(if $(filter file,$(origin DATABASE_URL)),unset DATABASE_URL;) \
	$(if $(filter file,$(origin CELERY_BROKER_URL)),unset CELERY_BROKER_URL;) \
	PYTHON=$(PY) bash scripts/demo.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache test-output
