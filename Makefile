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

# Debian's python3, not one under /root (pyenv): the gateway's processes run as
# its service account, which must be able to run the venv's interpreter.
SYSTEM_PYTHON := /usr/bin/python3

venv:
	@grep -qx "home = $(patsubst %/,%,$(dir $(SYSTEM_PYTHON)))" $(VENV)/pyvenv.cfg 2>/dev/null || rm -rf $(VENV)
	@$(MAKE) --no-print-directory $(VENV)/.installed
$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(SYSTEM_PYTHON) -m venv $(VENV)
	@# a download that fails once (the index, a proxy) passes on the next try: 3 tries, 15 s apart
	@for try in 1 2 3; do $(PY) -m pip install -q -r requirements.txt && exit 0; \
	  [ $$try = 3 ] || { echo "pip install -r requirements.txt failed (try $$try of 3); again in 15 s" >&2; sleep 15; }; \
	done; echo "pip install -r requirements.txt failed for good (3 tries)" >&2; exit 1
	touch $@

# The venv builds beside up.sh's first minutes (apt, Slurm, the base images'
# debootstraps, MLflow), which need none of it; up.sh waits for its exit status
# in $(VENV_STATUS) before the first step that runs it.
VENV_STATUS := $(VENV).status
testbed: packages
	@rm -f $(VENV_STATUS)
	@{ $(MAKE) --no-print-directory venv; echo $$? > $(VENV_STATUS); } & \
	M2D_PYTHON_STATUS=$(CURDIR)/$(VENV_STATUS) deploy/testbed/up.sh $(TESTBED_DIR); up=$$?; wait; \
	[ "$$(cat $(VENV_STATUS))" = 0 ] || { echo "make venv failed (its lines above)" >&2; exit 1; }; exit $$up

run: testbed
	deploy/gateway.sh start $(TESTBED_DIR)

stop:
	deploy/gateway.sh stop $(TESTBED_DIR)
	deploy/testbed/down.sh $(TESTBED_DIR)

# The suite in parallel: pytest-xdist workers, each a session with a private
# gateway stack, as many as Slurm's job slots make worth it
# (tests/helpers/workers.py; TEST_WORKERS=N to choose, 0 for none). The Slurm
# fault tests stop slurmctld and slurmdbd on a cluster of their own
# (deploy/testbed/fault-cluster.sh, which the testbed starts for `make test`:
# the variable reaches the testbed target's recipe too), so they run beside
# the rest (docs/testing.md).
TEST_WORKERS ?= auto
test: export M2D_TESTBED_FAULTS = 1
test: testbed
	@set -a && . $(ENV) && set +a && \
	workers=$(TEST_WORKERS) && { [ "$$workers" != auto ] || workers=$$($(PY) -m tests.helpers.workers); } && \
	echo "make test: $$workers parallel workers" && \
	$(PY) -m pytest -q -n $$workers --dist loadgroup $(TESTS)

# three workers on two cores: a few unit tests wait (a hook's post timing out, a
# client's retries, a race run for seconds) while the others keep the cores busy
# (700 tests: 82 s on two workers, 73 s on three, on a 2-core machine)
unit: venv
	$(PY) -m pytest -q -m "not integration" -n 3 $(TESTS)

lint: venv
	$(PY) -m ruff check .

bench: testbed
	set -a && . $(ENV) && set +a && $(PY) -m bench.pipeline
	$(PY) -m bench.scale
	set -a && . $(ENV) && set +a && $(PY) -m bench.sealed && $(PY) -m bench.relay 200
