#!/usr/bin/env bash
# gateway.sh start|stop [DIR] -- run the gateway on the testbed: database
# migrations, an admin account, gunicorn on 127.0.0.1:5000, the rq workers and
# the poller. Needs the testbed up (deploy/testbed/up.sh writes DIR/gateway.env).
# State: DIR/gateway/{data,secrets,logs,pids}; the testbed's secrets in DIR/secrets.
# The gateway's processes and admin commands run as its service account
# (M2D_USER, default m2d, made by testbed/accounts.sh), never as root.
source "$(dirname "${BASH_SOURCE[0]}")/testbed/lib.sh"
cmd=${1:-start}; shift || true
set_testbed_dir "${1:-}"
REPO=$(cd "$M2D_TESTBED_SRC/../.." && pwd)
PY=${M2D_PYTHON:-$REPO/.venv/bin/python}
RUN=$TESTBED_DIR/gateway
PORT=${M2D_PORT:-5000}
ADMIN_EMAIL=${M2D_ADMIN_EMAIL:-admin@localhost.localdomain}
GW_USER=${M2D_USER:-m2d}
AS_GATEWAY=(setpriv "--reuid=$GW_USER" "--regid=$GW_USER" --init-groups --)

# name:command -- each a separate process, each with its own PID file.
# gunicorn uses threads: a browser's idle preconnections would block sync workers.
SERVICES=(
  "web:$REPO/.venv/bin/gunicorn --workers 2 --threads 8 --bind 127.0.0.1:$PORT --timeout 300 gateway:create_app()"
  "worker-build:$PY -m jobs.worker build"
  "worker-mail:$PY -m jobs.worker mail"
  # its own worker: a poll cycle over thousands of active jobs must not hold back
  # the e-mail a pushed event owes
  "worker-poll:$PY -m jobs.worker poll"
  "poller:$PY -m jobs.poller"
)

start() {
  [ -s "$TESTBED_DIR/gateway.env" ] || die "no $TESTBED_DIR/gateway.env: run deploy/testbed/up.sh first"
  set -a; source "$TESTBED_DIR/gateway.env"; set +a
  mkdir -p "$RUN"/{data,secrets,logs,pids}
  chmod 711 "$RUN"
  # the service account's own: the database, uploads, the key to MLflow passwords. Never
  # what is inside submissions/: its folders have group m2d-job (the job reads its code and
  # batch script through it) and its export and logs hold the job account's files; a chown -R
  # here gave every submission made before a restart group m2d, and their sbatch failed
  # ("Unable to open file .../job/job.sbatch", issue 24)
  find "$RUN/data" "$RUN/secrets" -path "$RUN/data/submissions/*" -prune -o ! -user "$GW_USER" \
    -exec chown "$GW_USER:$GW_USER" {} +
  chmod 700 "$RUN/secrets"
  export HOME; HOME=$(getent passwd "$GW_USER" | cut -d: -f6)   # apptainer's cache and config
  export M2D_DATA_DIR=$RUN/data
  export M2D_SECRET_KEY; M2D_SECRET_KEY=$(secret_file "$TESTBED_DIR/secrets/gateway-secret-key")
  export M2D_PUBLIC_URL=http://127.0.0.1:$PORT
  # mlflow-key (made there on first use) opens the MLflow passwords in the database
  export M2D_SECRETS_DIR=$RUN/secrets
  # Slurm tells this gateway when its jobs start and end (deploy/libexec/m2d-slurm-event, the
  # testbed's PrologSlurmctld and jobcomp/script): its curl config in the hook's folder, named by
  # its job-name prefix; the poll, every PUSHED_POLL_INTERVAL, is the backstop
  local events_dir=${M2D_SLURM_EVENTS_DIR:-$TESTBED_DIR/slurm/events.d}
  if [ -d "$events_dir" ]; then
    export M2D_SLURM_EVENTS_TOKEN; M2D_SLURM_EVENTS_TOKEN=$(secret_file "$TESTBED_DIR/secrets/slurm-events-token")
    printf 'url = "http://127.0.0.1:%s/slurm/events"\nheader = "Authorization: Bearer %s"\n' \
      "$PORT" "$M2D_SLURM_EVENTS_TOKEN" | put_file "$events_dir/${M2D_SLURM_JOB_PREFIX:-m2d}.curl" 600
  fi
  # what admin commands need besides gateway.env to act on this database
  printf 'export M2D_DATA_DIR=%q\nexport M2D_SECRET_KEY=%q\nexport M2D_PUBLIC_URL=%q\nexport M2D_SECRETS_DIR=%q\n' \
    "$M2D_DATA_DIR" "$M2D_SECRET_KEY" "$M2D_PUBLIC_URL" "$M2D_SECRETS_DIR" | put_file "$RUN/admin.env" 600
  cd "$REPO"
  "${AS_GATEWAY[@]}" "$PY" -m flask --app gateway db upgrade >>"$RUN/logs/migrate.log" 2>&1 \
    || { tail -n 20 "$RUN/logs/migrate.log" >&2; die "database migration failed"; }

  local password; password=$(secret_file "$TESTBED_DIR/secrets/gateway-admin-password")
  if ! "${AS_GATEWAY[@]}" "$PY" -m flask --app gateway users list 2>/dev/null | cut -f2 | grep -x "$ADMIN_EMAIL" >/dev/null; then
    "${AS_GATEWAY[@]}" "$PY" -m flask --app gateway users create "$ADMIN_EMAIL" --name Admin --password "$password" \
      --admin --approve >/dev/null
  fi

  local entry name command
  for entry in "${SERVICES[@]}"; do
    name=${entry%%:*}; command=${entry#*:}
    if pid_alive "$RUN/pids/$name.pid" 'python*' >/dev/null; then
      log "$name already running"; continue
    fi
    # shellcheck disable=SC2086
    start_bg "$RUN/pids/$name.pid" "$RUN/logs/$name.log" "${AS_GATEWAY[@]}" $command
    log "$name started (pid $(cat "$RUN/pids/$name.pid"))"
  done
  WAIT_PID=$(cat "$RUN/pids/web.pid") WAIT_LOG=$RUN/logs/web.log \
    wait_until 60 "the gateway on port $PORT" curl -fsS "http://127.0.0.1:$PORT/healthz"

  cat <<EOM

  Model-to-Data Gateway is running: http://127.0.0.1:$PORT
    admin login:   $ADMIN_EMAIL / $password
    mail folder:   $M2D_MAIL_DIR   (every email the gateway sends, as .eml)
    MLflow:        $M2D_MLFLOW_URL  (admin / see $TESTBED_DIR/secrets/mlflow-admin-password)
    logs:          $RUN/logs
  Add a researcher:  set -a; . $TESTBED_DIR/gateway.env; . $RUN/admin.env; set +a
                     .venv/bin/flask --app gateway users create you@example.org --name You --password '...' --approve
                     (admin commands run as ${GW_USER}, also when started as root: docs/admin.md)
  The m2d client:    http://127.0.0.1:$PORT/client  (pip install of the wheel it serves; tokens on the account page)
  Stop it all:       make stop
EOM
}

stop() {
  local i name
  [ ! -s "$TESTBED_DIR/gateway.env" ] || { set -a; source "$TESTBED_DIR/gateway.env"; set +a; }
  rm -f "${M2D_SLURM_EVENTS_DIR:-$TESTBED_DIR/slurm/events.d}/${M2D_SLURM_JOB_PREFIX:-m2d}.curl"
  for ((i = ${#SERVICES[@]} - 1; i >= 0; i--)); do
    name=${SERVICES[$i]%%:*}
    stop_pid "$name" "$RUN/pids/$name.pid" 'python*' '*' 30 group
  done
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  *) die "usage: $0 start|stop [DIR]" ;;
esac
