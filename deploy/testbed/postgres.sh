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

apt_install postgresql
psql_admin() { timeout 20 runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 "$@"; }

if ! psql_admin -c 'SELECT 1' >/dev/null 2>&1; then
  version=$(ls /etc/postgresql | sort -V | tail -1)
  [ -n "$version" ] || die "postgresql is installed but has no cluster in /etc/postgresql"
  log "starting PostgreSQL $version main"
  pg_ctlcluster --skip-systemctl-redirect "$version" main start || die "pg_ctlcluster $version main start failed"
  wait_until 30 "PostgreSQL to answer" psql_admin -c 'SELECT 1' || exit 1
fi

# password auth over TCP works with Debian's default pg_hba.conf (scram on
# 127.0.0.1) and with a trust setup alike
psql_admin -v role="$ROLE" -v password="$PASSWORD" <<'SQL' >/dev/null
SELECT format('CREATE ROLE %I LOGIN CREATEDB', :'role')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role') \gexec
SELECT format('ALTER ROLE %I LOGIN CREATEDB PASSWORD %L', :'role', :'password') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'role', :'role')
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'role') \gexec
SQL
