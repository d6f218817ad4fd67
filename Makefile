# The two commands of README.md: `make run` and `make test`. Each installs
# what is missing (Debian packages, the venv, the testbed) and is safe to repeat.
# `make unit` (no root, no services, seconds) and `make lint` before each commit.
TESTBED_DIR ?= /opt/testbed
VENV := .venv
PY := $(VENV)/bin/python
ENV := $(TESTBED_DIR)/gateway.env
TESTS ?= tests  # e.g. make test TESTS=tests/test_e2e.py
export M2D_TESTBED_DIR := $(TESTBED_DIR)
export M2D_PYTHON := $(CURDIR)/$(PY)

.PHONY: run stop test unit lint bench testbed packages venv

packages:
	deploy/bootstrap.sh

venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

testbed: packages venv
	deploy/testbed/up.sh $(TESTBED_DIR)

run: testbed
	deploy/gateway.sh start $(TESTBED_DIR)

stop:
	deploy/gateway.sh stop $(TESTBED_DIR)
	deploy/testbed/down.sh $(TESTBED_DIR)

test: testbed
	set -a && . $(ENV) && set +a && $(PY) -m pytest -q $(TESTS)

unit: venv
	$(PY) -m pytest -q -m "not testbed" $(TESTS)

lint: venv
	$(PY) -m ruff check .

bench: testbed
	set -a && . $(ENV) && set +a && $(PY) -m bench.pipeline
	$(PY) -m bench.scale
