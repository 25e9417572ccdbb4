# The two README commands are `make demo` and `make test`; the rest are their steps.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed-dev
# The suite runs twice: on the newest Django that setup.cfg allows (above) and on 4.2 LTS,
# the oldest, in a second virtualenv; only running the tests there catches a 5.x-only API.
VENV42 ?= .venv-django42
PY42 := $(VENV42)/bin/python
STAMP42 := $(VENV42)/.installed-dev
PYTEST_ARGS ?=

export DATABASE_URL ?= postgres://dcc:dcc@127.0.0.1:5432/dcc
export CELERY_BROKER_URL ?= redis://127.0.0.1:6379/0
export DOCKER_HOST ?= unix:///var/run/docker.sock
export DCC_TEST_IMAGE ?= dcc-test-busybox:latest

.PHONY: test demo install install-django42 services lint typecheck migrations-check pytest \
	pytest-django42 bench clean

# Either virtualenv.
%/bin/python:
	$(PYTHON) -m venv $*
	$*/bin/pip install -q --upgrade pip setuptools wheel

$(STAMP): $(PY) setup.cfg pyproject.toml
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

$(STAMP42): $(PY42) setup.cfg pyproject.toml
	$(VENV42)/bin/pip install -q -e '.[dev]' 'Django>=4.2,<5.0'
	touch $(STAMP42)

install: $(STAMP)

install-django42: $(STAMP42)

services:
	bash scripts/services.sh all

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install
	$(VENV)/bin/mypy

# Under both Djangos: a migration written by one must not look changed to the other.
migrations-check: install install-django42
	$(PY) -m django makemigrations --check --dry-run --settings=tests.settings
	$(PY42) -m django makemigrations --check --dry-run --settings=tests.settings

pytest: install
	@echo "== pytest on Django $$($(PY) -m django --version) ($(VENV)) =="
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# The runs are sequential and share the broker (each Celery test purges it first), but not
# the test database: with --reuse-db one Django would be handed the other's schema.
pytest-django42: install-django42
	@echo "== pytest on Django $$($(PY42) -m django --version) ($(VENV42)) =="
	DCC_TEST_DATABASE=$${DCC_TEST_DATABASE:-test_dcc}_django42 $(VENV42)/bin/pytest $(PYTEST_ARGS)

# Installs what the tests need, starts PostgreSQL, Redis and Docker, then checks everything.
test: install services lint typecheck migrations-check pytest pytest-django42

bench: install services
	$(PY) bench/claim_throughput.py
	$(PY) bench/admin_changelist.py
	$(PY) bench/metrics_scrape.py
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
	rm -rf $(VENV) $(VENV42) .pytest_cache .mypy_cache .ruff_cache test-output
