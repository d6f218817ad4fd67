#!/usr/bin/env bash
# up.sh [TESTBED_DIR] -- bring the whole testbed up on this machine: the
# gateway and job accounts with their sudo rules, Slurm (cgroups),
# Apptainer, the base image, Redis, MLflow, the SMTP sink and the synthetic
# dataset, then write TESTBED_DIR/gateway.env for the gateway, workers and
# tests (`source` it).  Idempotent: a second run only checks, and is fast.
# The first run on a bare Debian 12 takes a few minutes (apt, debootstrap,
# the base image build).
#
# env: M2D_TESTBED_DIR (default /opt/testbed; the argument wins),
#      M2D_PYTHON (python3; needs aiosmtpd, numpy and pillow: the project's
#      .venv/bin/python; M2D_PYTHON_STATUS: a file that holds the exit status of
#      its build once it ends, waited for before the first step that runs it),
#      M2D_TESTBED_FAULTS (1: also the fault tests' Slurm cluster,
#      fault-cluster.sh; `make test` sets it),
#      M2D_TESTBED_NODES (2: two compute nodes, each a
#      slurmd in namespaces of its own; 1: this host is the one node) and the
#      other settings in lib.sh's testbed_settings, kept in
#      TESTBED_DIR/testbed.env for the next run.  Stop it all with down.sh.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

set_testbed_dir "${1:-}"
PYTHON=${M2D_PYTHON:-python3}
export M2D_PYTHON=$PYTHON
require_root
mkdir -p "$TESTBED_DIR"
# the settings this folder's cluster is made with (lib.sh), for down.sh and the rest
save_testbed_settings

TIMINGS=()
# step NAME CMD...: run one part, timed
step() {
  local name=$1 t0=$EPOCHREALTIME; shift
  log "---- $name"
  "$@" || die "$name failed"
  TIMINGS+=("$(printf '%-11s %6.1fs' "$name" "$(awk "BEGIN{print $EPOCHREALTIME - $t0}")")")
}

# The slow parts that need nothing of each other (the base images'
# debootstraps, MLflow's pip install) run at once, each in a session of its
# own (a failure elsewhere stops its whole process group), its output in
# TESTBED_DIR/up-logs/NAME.log, shown when it ends.
BG_LOGS=$TESTBED_DIR/up-logs
declare -A BG_PID=()
# step_bg NAME CMD...: start one part in the background; it times itself
step_bg() {
  local name=$1; shift
  mkdir -p "$BG_LOGS"
  log "---- $name (in the background: $BG_LOGS/$name.log)"
  setsid bash -c 't0=$EPOCHREALTIME; "${@:2}" || exit; awk "BEGIN{print $EPOCHREALTIME - $t0}" > "$1"' \
    "$name" "$BG_LOGS/$name.time" "$@" </dev/null >"$BG_LOGS/$name.log" 2>&1 &
  BG_PID[$name]=$!
}
# wait_bg NAME...: the end of each; a failed one fails up.sh with its name and log
wait_bg() {
  local name rc
  for name in "$@"; do
    rc=0; wait "${BG_PID[$name]}" || rc=$?
    unset "BG_PID[$name]"
    sed "s/^/  $name: /" "$BG_LOGS/$name.log" >&2
    [ "$rc" = 0 ] || die "$name failed (exit $rc); its log: $BG_LOGS/$name.log"
    TIMINGS+=("$(printf '%-11s %6.1fs (background)' "$name" "$(cat "$BG_LOGS/$name.time")")")
  done
}
# up.sh ending half way (a failed step, ^C) stops what still runs in the background
stop_bg() { local pid; for pid in "${BG_PID[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done; }
trap stop_bg EXIT

here=$M2D_TESTBED_SRC
step_bg mlflow-venv "$here/mlflow.sh" install "$TESTBED_DIR"
step accounts   "$here/accounts.sh" "$TESTBED_DIR"
# Apptainer, then the base images (3.11, and the other Pythons a .python-version
# may ask for: bullseye's 3.9, trixie's 3.13), beside Slurm's install
step_bg images  "$here/images.sh" "$TESTBED_DIR"
step slurm      "$here/slurm.sh" start "$TESTBED_DIR"   # (and nodes.sh: the nodes' network)
# a second Slurm cluster, for the tests that stop slurmctld and slurmdbd (`make test` asks);
# its node is this host, so a single-node testbed (whose node this host is) has none
FAULTS=${M2D_TESTBED_FAULTS:-0}
if [ "$FAULTS" = 1 ] && ! multi_node; then
  log "single-node testbed: no fault cluster (tests/test_slurm_faults.py needs M2D_TESTBED_NODES >= 2)"
  FAULTS=0
fi
[ "$FAULTS" != 1 ] || step_bg fault-cluster "$here/fault-cluster.sh" start "$TESTBED_DIR"
# pip's and uv's cache, shared by every build of every test stack
step pip-cache  install -d -m 755 -o "${M2D_USER:-m2d}" -g "${M2D_USER:-m2d}" "$TESTBED_DIR/pip-cache"
step redis      "$here/redis.sh" start "$TESTBED_DIR"
wait_bg mlflow-venv
step mlflow     "$here/mlflow.sh" start "$TESTBED_DIR"
step postgres   "$here/postgres.sh" "$TESTBED_DIR"
# a CA and a localhost certificate for the tests through nginx with TLS
step tls        "$here/tls.sh" "$TESTBED_DIR"
# The steps below run $PYTHON. `make testbed` builds the project's venv (the usual
# M2D_PYTHON) beside the steps above and names a file its exit status goes to
# (M2D_PYTHON_STATUS): wait for it here.
python_ready() {
  [ -n "${M2D_PYTHON_STATUS:-}" ] || return 0
  local waited=0
  while [ ! -s "$M2D_PYTHON_STATUS" ]; do
    ((waited++ < 3600)) || die "no word from the venv's build after an hour ($M2D_PYTHON_STATUS)"
    sleep 1
  done
  [ "$(cat "$M2D_PYTHON_STATUS")" = 0 ] || die "the venv of $PYTHON failed to build (make venv: its lines above)"
}
step python     python_ready
# uv, which builds install with (bound into the base images, not in them)
step uv         "$here/uv.sh" "$TESTBED_DIR"
step smtp       "$here/smtp.sh" start "$TESTBED_DIR"
# readable by the job account alone (group m2d-data): the gateway never reads the data
step dataset    "$here/dataset.sh" "$TESTBED_DIR"
# the dataset's fingerprint index (disclosure reports), one folder per version, built by
# the report jobs: the job account's, in the dataset's group, never the gateway's
step disclosure-index install -d -m 2750 -o "${M2D_JOB_USER:-m2d-job}" -g "${M2D_DATA_GROUP:-m2d-data}" \
  "$TESTBED_DIR/disclosure-index"
# the dry runs' synthetic twins, one per dataset version (m2d/contract/twin.py: the same
# layout and CSV columns, a few cases): the default version's is made here, any
# other by the gateway's account on first use
step twins      install -d -m 755 -o "${M2D_USER:-m2d}" -g "${M2D_USER:-m2d}" "$TESTBED_DIR/twins"
step twin       "$PYTHON" "$here/make_dataset.py" "$TESTBED_DIR/twins" --twin
# the model cache admins fill (flask --app gateway weights add): the gateway
# writes it, every job reads it
step models     install -d -m 755 -o "${M2D_USER:-m2d}" -g "${M2D_USER:-m2d}" "$TESTBED_DIR/models"
wait_bg images
[ "$FAULTS" != 1 ] || wait_bg fault-cluster
# the gateway's account builds environment images (unprivileged, --fakeroot)
step images-owner chown -R "${M2D_USER:-m2d}:${M2D_USER:-m2d}" "$TESTBED_DIR/images"

# This machine's pip sources (wheelhouse, local index, constraints), handed
# to builds through the gateway's settings; local indexes that are missing
# are left out (pip only warns about them, a build bind would fail).
pip_config() { "$PYTHON" -m pip config list 2>/dev/null | sed -n "s/^global\.$1='\(.*\)'$/\1/p" | tail -n 1; }
existing() { local item path out=(); for item in $1; do path=${item#file://}
  [ "${path#/}" = "$path" ] || [ -e "$path" ] && out+=("$item"); done; echo "${out[*]}"; }
PIP_EXTRA=$(existing "$(pip_config extra-index-url)")
PIP_LINKS=$(existing "${PIP_FIND_LINKS:-$(pip_config find-links)}")
PIP_CONSTRAINT_FILE=$(existing "$(pip_config constraint)")

# PostgreSQL, unless a server started before it still runs on its SQLite file
# (mlflow.sh stop, then start, moves it)
MLFLOW_STORE_URL=postgresql+psycopg://mlflow:$(cat "$TESTBED_DIR/secrets/mlflow-postgres-password")@127.0.0.1:5432/mlflow
[ -e "$TESTBED_DIR/mlflow/mlflow.db" ] && MLFLOW_STORE_URL="sqlite:///file:$TESTBED_DIR/mlflow/mlflow.db?mode=ro&uri=true"

# The gateway's view of the testbed.  Mode 600: it holds the MLflow admin
# password.
put_file "$TESTBED_DIR/gateway.env" 600 <<EOF
# generated by deploy/testbed/up.sh; source it
export M2D_TESTBED_DIR=$TESTBED_DIR
export SLURM_CONF=$TESTBED_DIR/slurm/etc/slurm.conf
export M2D_APPTAINER=$TESTBED_DIR/apptainer/bin/apptainer
export M2D_BASE_IMAGE=$TESTBED_DIR/images/base.sif
export M2D_IMAGE_DIR=$TESTBED_DIR/images
export M2D_BASE_IMAGES=3.9=$TESTBED_DIR/images/base-3.9.sif,3.13=$TESTBED_DIR/images/base-3.13.sif
export M2D_PIP_CACHE_DIR=$TESTBED_DIR/pip-cache
export M2D_PIP_EXTRA_INDEX_URLS="$PIP_EXTRA"
export M2D_PIP_FIND_LINKS="$PIP_LINKS"
export M2D_PIP_CONSTRAINT="$PIP_CONSTRAINT_FILE"
export M2D_BUILD_UV=$TESTBED_DIR/uv/current/bin/uv
export M2D_BUILD_MKSQUASHFS_ARGS="-comp zstd -Xcompression-level 1"
export M2D_DATASET_DIR=$TESTBED_DIR/clam
export M2D_TWIN_DIR=$TESTBED_DIR/twins
export M2D_DISCLOSURE_INDEX_DIR=$TESTBED_DIR/disclosure-index
# the synthetic CLaM has 8 training and 2 test cases: a membership attack counts from 2 a side here
export M2D_DISCLOSURE_MIA_MIN_CASES=2
export M2D_MODELS_DIR=$TESTBED_DIR/models
export M2D_REDIS_URL=redis://:$(cat "$TESTBED_DIR/secrets/redis-password")@127.0.0.1:$M2D_REDIS_PORT/0
export M2D_MLFLOW_URL=http://127.0.0.1:$M2D_MLFLOW_PORT
$(multi_node && printf '%s\n' \
  "# the compute nodes reach MLflow by this host's address on their bridge" \
  "export M2D_MLFLOW_JOB_URL=http://$GATEWAY_ADDR:$M2D_MLFLOW_PORT" \
  "# node=network namespace, for the tests that look at a node from inside" \
  "export M2D_TESTBED_NODE_NAMESPACES=$(for n in $(cluster_node_names); do printf '%s=%s,' "$n" "$(node_netns "$n")"; done | sed 's/,$//')" \
  "# the node a test may cut the power of (slurm.sh power-off), in no partition but its own" \
  "export M2D_TESTBED_FAULT_NODE=$(fault_node_name)=$(node_netns "$(fault_node_name)")" \
  "# the ports the nodes may reach beside MLflow's: the fault tests' MLflow proxies" \
  "export M2D_TESTBED_MLFLOW_PROXY_PORTS=$M2D_MLFLOW_PROXY_PORTS")
export M2D_SLURM_WRAPPER=$M2D_SLURM_WRAPPER
$([ "$FAULTS" != 1 ] || printf '%s\n' \
  "# the fault tests' own Slurm cluster (fault-cluster.sh): its SLURM_CONF and wrapper in testbed.env there" \
  "export M2D_TESTBED_FAULT_CLUSTER=$TESTBED_DIR/faults")
export M2D_MLFLOW_ADMIN_USERNAME=admin
export M2D_MLFLOW_ADMIN_PASSWORD=$(cat "$TESTBED_DIR/secrets/mlflow-admin-password")
export M2D_SMTP_HOST=127.0.0.1
export M2D_SMTP_PORT=$M2D_SMTP_PORT
export M2D_MAIL_DIR=$TESTBED_DIR/mail
export M2D_SLURM_PARTITION=debug
# tests make (and drop) their own databases with this role; SQLite stays the default
export M2D_TEST_POSTGRES_URL=postgresql+psycopg://m2d_test:$(cat "$TESTBED_DIR/secrets/postgres-password")@127.0.0.1:5432/m2d_test
# MLflow's tracking store, which tests read back what jobs stored from (deploy/testbed/mlflow.sh)
export M2D_TEST_MLFLOW_STORE_URL="$MLFLOW_STORE_URL"
export PATH="$TESTBED_DIR/apptainer/bin:\$PATH"
EOF

log "---- timings"
printf '  %s\n' "${TIMINGS[@]}" >&2
log "testbed up in $TESTBED_DIR; use: source $TESTBED_DIR/gateway.env"
