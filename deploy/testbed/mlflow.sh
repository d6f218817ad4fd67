#!/usr/bin/env bash
# mlflow.sh start|stop|install [TESTBED_DIR] -- the MLflow tracking server that jobs
# log metrics to, on port M2D_MLFLOW_PORT (5001; all addresses when there
# are compute nodes, else 127.0.0.1), with basic auth: users see only their
# own experiments (default_permission = NO_PERMISSIONS).  Artifacts are not
# served (privacy: models leave only through the export folder).
#
# Sized for a cluster's relays (docs/benchmarks.md, bench/mlflow_scale.py):
# its tracking and auth stores in PostgreSQL (databases `mlflow` and
# `mlflow_auth` of a role `mlflow`, password in
# TESTBED_DIR/secrets/mlflow-postgres-password), M2D_MLFLOW_WORKERS worker
# processes under gunicorn, and a verified-credential cache in front of basic
# auth's password hash (deploy/mlflow/m2d_mlflow_auth.py).  A testbed whose MLflow
# kept its stores in SQLite (TESTBED_DIR/mlflow/*.db, before this) has them
# copied into PostgreSQL by the first start (users, passwords, experiments,
# runs: the gateway's accounts keep working); the SQLite files stay, renamed
# *.db.migrated.
#
# State in TESTBED_DIR/mlflow: its own venv (MLflow is not a gateway
# dependency), the auth ini, pid and log.  The admin password is generated
# once into TESTBED_DIR/secrets/mlflow-admin-password (mode 600).  install:
# the venv alone (up.sh runs it beside the base images' builds; start does it
# too).
#
# env (a second instance beside the testbed's, e.g. to develop against):
#   M2D_MLFLOW_PORT (5001), M2D_MLFLOW_WORKERS (4),
#   M2D_MLFLOW_DATABASE (mlflow: the role and the databases NAME, NAME_auth)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ACTION=${1:-}; shift || true
set_testbed_dir "${1:-}"
DIR=$TESTBED_DIR/mlflow
# 3.18.0 needs an mlflow-skinny release that was never published
MLFLOW_VERSION=3.17.2
PORT=$M2D_MLFLOW_PORT   # lib.sh
URL=http://127.0.0.1:$PORT
# the compute nodes reach it by this host's address on their bridge (nodes.sh
# lets them reach this port alone), the gateway on the loopback
HOST=127.0.0.1
! multi_node || HOST=0.0.0.0
WORKERS=${M2D_MLFLOW_WORKERS:-4}
# requests a worker runs at once (m2d_mlflow_auth.py); each store's pool is twice
# that (an outer and an inner session each): WORKERS x 2 stores x 2 x 4 = 64
# connections at most, under PostgreSQL's 100 with room for the tests' own databases
REQUESTS_AT_ONCE=${M2D_MLFLOW_REQUESTS_AT_ONCE:-4}
# gunicorn's sync workers serve MLflow's Flask app itself, one request at a time
# each: under 200 jobs' relays the stored p95 fell from about 15 s to 10 s on 2 cores
# against uvicorn's default (FastAPI around the same Flask app, every request handed
# from the event loop to a thread: a third of the CPU). What only the FastAPI app
# serves (OpenTelemetry trace ingest, the AI gateway, jobs) the platform closes
# anyway. A worker silent for --timeout is restarted; request lines up to 8 KiB
# (the UI's GETs of many runs' metrics), as nginx's default.
GUNICORN_OPTS="--timeout 120 --graceful-timeout 30 --limit-request-line 8190"
DATABASE=${M2D_MLFLOW_DATABASE:-mlflow}
AUTH_DATABASE=${DATABASE}_auth
# the credential cache, MLflow's `authorization_function`
AUTH_MODULE_DIR=$(realpath "$M2D_TESTBED_SRC/../mlflow")
PSYCOPG_VERSION=3.3.9  # as the gateway's requirements.txt
PIDFILE=$DIR/mlflow.pid
# what the running server was started with (settings, the plug-in's code): a
# server started otherwise is restarted
STARTED_WITH=$DIR/started-with
LOGFILE=$DIR/mlflow.log
VENV=$DIR/venv
EXE_GLOB='python3*'
CMD_GLOB="* $VENV/bin/mlflow server *"

install_mlflow() {
  # the [auth] extra brings Flask-WTF, without which basic-auth cannot start;
  # psycopg: PostgreSQL
  if "$VENV/bin/python" -c "import importlib.metadata as m, sys
sys.exit(m.version('mlflow') != '$MLFLOW_VERSION' or not m.version('Flask-WTF')
         or m.version('psycopg') != '$PSYCOPG_VERSION')" 2>/dev/null; then
    return 0
  fi
  log "installing mlflow[auth]==$MLFLOW_VERSION into $VENV (a minute or two)"
  if ! python3 -c 'import ensurepip' 2>/dev/null; then apt_install python3-venv; fi
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  pip_mlflow() { "$VENV/bin/pip" install -q --disable-pip-version-check "mlflow[auth]==$MLFLOW_VERSION" \
                   "psycopg[binary]==$PSYCOPG_VERSION" > "$DIR/pip.log" 2>&1; }
  retry "pip install mlflow[auth]==$MLFLOW_VERSION" pip_mlflow \
    || { tail -n 20 "$DIR/pip.log" >&2; die "pip install mlflow failed"; }
}

# postgres_stores: the role and its two databases; sets TRACKING_URI and AUTH_URI
# The stores belong to this testbed folder (its secrets, its admin password):
# PostgreSQL outlives an `rm -rf` of the folder, and a new folder's admin
# password would not open the old auth store. Databases found without this
# folder's mark, while no server of this folder runs, are dropped and made anew.
STORES_MARK=$DIR/postgres-stores
postgres_stores() {
  local password base db
  password=$(secret_file "$TESTBED_DIR/secrets/mlflow-postgres-password")
  postgres_up
  if [ ! -e "$STORES_MARK" ] && ! pid_alive "$PIDFILE" "$EXE_GLOB" "$CMD_GLOB" >/dev/null; then
    for db in "$DATABASE" "$AUTH_DATABASE"; do
      if [ -n "$(psql_admin -tA -v db="$db" <<<"SELECT 1 FROM pg_database WHERE datname = :'db'")" ]; then
        log "database $db is an earlier testbed folder's: dropped, made anew"
        psql_admin -v db="$db" <<<"SELECT format('DROP DATABASE %I WITH (FORCE)', :'db') \\gexec" >/dev/null
      fi
    done
  fi
  postgres_role "$DATABASE" "$password" "" "$DATABASE" "$AUTH_DATABASE"
  touch "$STORES_MARK"
  base="postgresql+psycopg://$DATABASE:$password@127.0.0.1:5432"
  TRACKING_URI=$base/$DATABASE
  AUTH_URI=$base/$AUTH_DATABASE
}

# migrate_sqlite: a testbed made before PostgreSQL: its SQLite stores copied
# into the (empty) PostgreSQL ones, once; the server must be stopped.
migrate_sqlite() {
  local name uri
  for name in mlflow basic_auth; do
    [ -s "$DIR/$name.db" ] || continue
    uri=$TRACKING_URI; [ "$name" = basic_auth ] && uri=$AUTH_URI
    log "copying $DIR/$name.db into PostgreSQL (once)"
    "$VENV/bin/python" "$AUTH_MODULE_DIR/sqlite_to_postgres.py" "$name" "sqlite:///$DIR/$name.db" \
        >> "$DIR/migrate.log" 2>&1 <<<"$uri" \
      || { tail -n 20 "$DIR/migrate.log" >&2; die "copying $DIR/$name.db into PostgreSQL failed"; }
    mv "$DIR/$name.db" "$DIR/$name.db.migrated"
  done
}

# write_auth_ini: the basic-auth app's config.  Keys as in the installed
# mlflow/server/auth/basic_auth.ini; checked against it, so that a renamed key
# fails here instead of being silently ignored.
write_auth_ini() {
  local template key
  template=$("$VENV/bin/python" -c 'import importlib.util as u
print(u.find_spec("mlflow").submodule_search_locations[0] + "/server/auth/basic_auth.ini")')
  for key in default_permission database_uri admin_username admin_password \
             authorization_function grant_default_workspace_access; do
    grep -Eq "^#? *$key *=" "$template" || die "$template has no key '$key' (mlflow changed?)"
  done
  put_file "$DIR/basic_auth.ini" 600 <<EOF
# generated by deploy/testbed/mlflow.sh
[mlflow]
default_permission = NO_PERMISSIONS
database_uri = $AUTH_URI
admin_username = admin
# used only when the admin user is first created
admin_password = $ADMIN_PASSWORD
# MLflow's own check, with a verified-credential cache in front (m2d_mlflow_auth.py)
authorization_function = m2d_mlflow_auth:authenticate_request
grant_default_workspace_access = false
EOF
}

start() {
  mkdir -p "$DIR/artifacts"
  chmod 700 "$DIR"   # its databases hold every run and every password hash: root only
  ADMIN_PASSWORD=$(secret_file "$TESTBED_DIR/secrets/mlflow-admin-password")
  install_mlflow
  postgres_stores
  # started otherwise: for the other mode (nodes or none: the address), with
  # other settings, or with another version of our plug-in
  if pid_alive "$PIDFILE" "$EXE_GLOB" "$CMD_GLOB" >/dev/null \
     && [ "$(cat "$STARTED_WITH" 2>/dev/null)" != "$(launch_settings)" ]; then
    log "mlflow runs with other settings ($(head -n1 "$STARTED_WITH" 2>/dev/null)) or another m2d_mlflow_auth.py: restarting it"
    stop
  fi
  if pid=$(pid_alive "$PIDFILE" "$EXE_GLOB" "$CMD_GLOB"); then
    # a server started before PostgreSQL: it goes on with SQLite until restarted
    [ -s "$DIR/mlflow.db" ] && log "mlflow (pid $pid) still runs on SQLite: 'mlflow.sh stop' then 'start' moves it to PostgreSQL"
    log "mlflow already running (pid $pid)"
    write_auth_ini
  else
    port_busy "$PORT" && die "port $PORT is already in use by another process"
    migrate_sqlite
    write_auth_ini
    local flask_secret
    flask_secret=$(secret_file "$TESTBED_DIR/secrets/mlflow-flask-secret-key")
    # MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false: no background job runner
    # (scorer jobs), which we never use, on a small machine.
    # The store's URI (it holds the database password) in the environment, which
    # only root reads, not in the command line, which everyone does.
    launch_settings > "$STARTED_WITH"
    start_bg "$PIDFILE" "$LOGFILE" env \
      MLFLOW_FLASK_SERVER_SECRET_KEY="$flask_secret" \
      MLFLOW_AUTH_CONFIG_PATH="$DIR/basic_auth.ini" \
      MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
      MLFLOW_BACKEND_STORE_URI="$TRACKING_URI" \
      MLFLOW_SQLALCHEMYSTORE_POOL_SIZE="$REQUESTS_AT_ONCE" \
      MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW="$REQUESTS_AT_ONCE" \
      M2D_MLFLOW_REQUESTS_AT_ONCE="$REQUESTS_AT_ONCE" \
      PYTHONPATH="$AUTH_MODULE_DIR" \
      "$VENV/bin/mlflow" server --app-name basic-auth \
        --host "$HOST" --port "$PORT" --workers "$WORKERS" \
        --no-serve-artifacts --default-artifact-root "$DIR/artifacts" \
        --gunicorn-opts "$GUNICORN_OPTS"
    WAIT_PID=$(cat "$PIDFILE") WAIT_LOG=$LOGFILE \
      wait_until 300 "mlflow /health" curl -fsS "$URL/health"
    load_the_plugin_on_each_worker
    log "mlflow started (pid $(cat "$PIDFILE")) on $URL"
  fi
  # The stored password must still be the admin's (it is only applied when
  # the auth database is first created).
  curl -fsS -o /dev/null -u "admin:$ADMIN_PASSWORD" \
      "$URL/api/2.0/mlflow/users/get?username=admin" \
    || die "mlflow admin login failed: $DIR/basic_auth.db and $TESTBED_DIR/secrets/mlflow-admin-password disagree"
}

# One request after the other on fresh connections, which the kernel spreads over
# a new server's workers: each loads m2d_mlflow_auth (and its request limit) before
# the relays' requests come at once.
load_the_plugin_on_each_worker() {
  local i
  for ((i = 0; i < 6 * WORKERS; i++)); do
    curl -fsS -o /dev/null -u "admin:$ADMIN_PASSWORD" "$URL/api/2.0/mlflow/users/get?username=admin" || true
  done
}

launch_settings() {
  echo "workers=$WORKERS requests_at_once=$REQUESTS_AT_ONCE host=$HOST port=$PORT gunicorn=$GUNICORN_OPTS"
  sha256sum "$AUTH_MODULE_DIR/m2d_mlflow_auth.py" | cut -c1-64
}

stop() {
  # group: mlflow runs the web server (and its workers) as children
  stop_pid mlflow "$PIDFILE" "$EXE_GLOB" "$CMD_GLOB" 20 group
}

case "$ACTION" in
  start) start ;;
  stop) stop ;;
  install) mkdir -p "$DIR"; chmod 700 "$DIR"; install_mlflow ;;
  *) echo "usage: $0 start|stop|install [TESTBED_DIR]" >&2; exit 2 ;;
esac
