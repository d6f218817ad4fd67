#!/usr/bin/env bash
# postgres.sh [TESTBED_DIR] -- PostgreSQL for the tests: reuse the cluster the
# machine already runs, or install Debian's and start its `main` cluster
# (without systemd: pg_ctlcluster --skip-systemctl-redirect).  Makes a role
# `m2d_test` (password in TESTBED_DIR/secrets/postgres-password, CREATEDB:
# every test run makes its own databases and drops them) and prints nothing;
# up.sh writes M2D_TEST_POSTGRES_URL into gateway.env.  Idempotent.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

set_testbed_dir "${1:-}"
require_root
ROLE=m2d_test
PASSWORD=$(secret_file "$TESTBED_DIR/secrets/postgres-password")

postgres_up

# password auth over TCP works with Debian's default pg_hba.conf (scram on
# 127.0.0.1) and with a trust setup alike
postgres_role "$ROLE" "$PASSWORD" CREATEDB "$ROLE"
