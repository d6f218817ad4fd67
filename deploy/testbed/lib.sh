# lib.sh -- helpers shared by the testbed scripts (sourced, never run).
#
# Every script keeps its state under one folder, TESTBED_DIR: the first
# argument after the command, else $M2D_TESTBED_DIR, else /opt/testbed.
# /opt (not /var/lib) because the Apptainer wrapper shares top-level folders
# like /opt, /srv and /tmp with containers, but never system folders.
#
# Processes are tracked by our own PID files.  Before signalling one we check
# /proc/PID/exe or /proc/PID/cmdline, so a recycled PID never gets a signal,
# and nothing is ever killed by name.
set -euo pipefail
shopt -s extglob

M2D_TESTBED_SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
_T0=$EPOCHREALTIME
_NAME="$(basename "$0" .sh)"

log() {
  printf '[%s %6ss] %s\n' "$_NAME" \
    "$(awk "BEGIN{printf \"%.1f\", $EPOCHREALTIME - $_T0}")" "$*" >&2
}
die() { log "ERROR: $*"; exit 1; }
require_root() { [ "$(id -u)" = 0 ] || die "must run as root"; }

# set_testbed_dir [DIR]: resolve and export TESTBED_DIR, and the testbed's
# settings (testbed_settings)
set_testbed_dir() {
  TESTBED_DIR="$(realpath -m "${1:-${M2D_TESTBED_DIR:-/opt/testbed}}")"
  export TESTBED_DIR
  testbed_settings
}

# The testbed's settings, in one place.  The environment wins; else what up.sh
# last used for this folder (TESTBED_DIR/testbed.env, written by up.sh, so
# that down.sh and each part's script see the same cluster); else the default.
#   M2D_TESTBED_NODES   compute nodes: 2 or more is a cluster (each node a
#                       slurmd in a network and UTS namespace of its own, on a
#                       private bridge: nodes.sh); 1 is the single-node mode
#                       (slurmd on this host, for small machines)
#   M2D_TESTBED_BRIDGE  the nodes' bridge (also the prefix of their
#                       namespaces, NAME-node1...), M2D_TESTBED_SUBNET its /24
#                       (first three octets): this host .1, node I .(10+I)
#   M2D_TESTBED_GPUS    fake GPUs per node (2): a real job takes one, so this
#                       many real jobs run at once on a node (the suite's stacks
#                       queued behind one)
#   M2D_REDIS_PORT M2D_MLFLOW_PORT M2D_SMTP_PORT  the gateway host's services
#   M2D_MLFLOW_PROXY_PORTS  ports the nodes may reach beside MLflow's, for the
#                       fault tests' MLflow proxies (tests/helpers/stack.py)
#   SLURM_CLUSTER_NAME SLURMCTLD_PORT SLURMD_PORT SLURMDBD_PORT MYSQL_PORT
#   SLURM_FIRST_JOB_ID  a second testbed on the same machine starts its job ids
#                       elsewhere: the credential claims (/run/m2d-credentials,
#                       accounts.sh) are named by job id alone
#   SLURM_LINK_ETC      1: /etc/slurm/slurm.conf points at this testbed's
#   M2D_SLURM_WRAPPER   where accounts.sh installs deploy/libexec/m2d-slurm
#   M2D_SUDOERS_FILE    where accounts.sh writes the sudo rules
# A second testbed beside a running one (development) sets them all apart,
# e.g. deploy/testbed/second.env.
TESTBED_SETTINGS=(M2D_TESTBED_NODES M2D_TESTBED_GPUS M2D_TESTBED_BRIDGE M2D_TESTBED_SUBNET M2D_REDIS_PORT
  M2D_MLFLOW_PORT M2D_SMTP_PORT M2D_MLFLOW_PROXY_PORTS SLURM_CLUSTER_NAME SLURMCTLD_PORT SLURMD_PORT
  SLURMDBD_PORT MYSQL_PORT SLURM_FIRST_JOB_ID SLURM_LINK_ETC M2D_SLURM_WRAPPER M2D_SUDOERS_FILE)
testbed_settings() {
  local name saved=$TESTBED_DIR/testbed.env line
  if [ -r "$saved" ]; then
    while IFS='=' read -r name line; do   # NAME=VALUE lines, no shell
      case "$name" in ''|'#'*) continue ;; esac
      [[ " ${TESTBED_SETTINGS[*]} " == *" $name "* ]] || continue
      [ -n "${!name+set}" ] || printf -v "$name" '%s' "$line"
    done < "$saved"
  fi
  # a testbed made before this setting existed is a single-node one until
  # it is remade (down.sh, then up.sh with M2D_TESTBED_NODES=2)
  if [ -z "${M2D_TESTBED_NODES:-}" ] && [ ! -e "$saved" ] && [ -e "$TESTBED_DIR/slurm/etc/slurm.conf" ]; then
    M2D_TESTBED_NODES=1
  fi
  : "${M2D_TESTBED_NODES:=2}" "${M2D_TESTBED_GPUS:=2}" "${M2D_TESTBED_BRIDGE:=m2d-br0}" "${M2D_TESTBED_SUBNET:=10.77.0}"
  : "${M2D_REDIS_PORT:=6380}" "${M2D_MLFLOW_PORT:=5001}" "${M2D_SMTP_PORT:=8025}"
  : "${M2D_MLFLOW_PROXY_PORTS:=15100-15199}"
  : "${SLURM_CLUSTER_NAME:=testbed}" "${SLURMCTLD_PORT:=6817}" "${SLURMD_PORT:=6818}"
  : "${SLURMDBD_PORT:=6819}" "${MYSQL_PORT:=3307}" "${SLURM_FIRST_JOB_ID:=1}" "${SLURM_LINK_ETC:=1}"
  : "${M2D_SLURM_WRAPPER:=/usr/local/libexec/m2d/m2d-slurm}" "${M2D_SUDOERS_FILE:=/etc/sudoers.d/m2d}"
  for name in "${TESTBED_SETTINGS[@]}"; do export "${name?}"; done
  case "$M2D_TESTBED_NODES" in [1-9]|[1-9][0-9]) ;; *) die "M2D_TESTBED_NODES must be 1 to 99, not '$M2D_TESTBED_NODES'" ;; esac
  case "$M2D_TESTBED_GPUS" in [1-8]) ;; *) die "M2D_TESTBED_GPUS must be 1 to 8, not '$M2D_TESTBED_GPUS'" ;; esac
  GATEWAY_ADDR=$M2D_TESTBED_SUBNET.1   # this host on the nodes' bridge
}
# save_testbed_settings: what this run used, for the next script on this folder
save_testbed_settings() {
  local name
  for name in "${TESTBED_SETTINGS[@]}"; do printf '%s=%s\n' "$name" "${!name}"; done \
    | put_file "$TESTBED_DIR/testbed.env"
}
# multi_node: is this testbed a cluster of namespaced nodes?
multi_node() { [ "$M2D_TESTBED_NODES" -ge 2 ]; }
# cluster_node_names: node1 node2 ... (M2D_TESTBED_NODES), the default partition's
cluster_node_names() { local i; for ((i = 1; i <= M2D_TESTBED_NODES; i++)); do echo "node$i"; done; }
# fault_node_name: one more namespaced node, in no partition but its own, that
# tests/test_node_failure.py cuts the power of mid-job while the other tests'
# jobs keep running on the cluster's nodes
fault_node_name() { echo "node$((M2D_TESTBED_NODES + 1))"; }
# node_names: every namespaced node, the fault node last; node_netns NODE; node_addr NODE
node_names() { cluster_node_names; fault_node_name; }
node_netns() { echo "$M2D_TESTBED_BRIDGE-$1"; }
node_addr() { echo "$M2D_TESTBED_SUBNET.$((10 + ${1#node}))"; }

# retry WHAT CMD...: run a download (apt-get, debootstrap, pip) up to
# M2D_DOWNLOAD_TRIES times (3), M2D_DOWNLOAD_PAUSE seconds apart (15): a mirror
# or the package index failing once ("E: Couldn't download packages") is common
# and passes on the next try. CMD must be safe to repeat (a function that
# starts clean). Returns 1, naming WHAT, when the last try fails too.
retry() {
  local what=$1 tries=${M2D_DOWNLOAD_TRIES:-3} pause=${M2D_DOWNLOAD_PAUSE:-15} try=1
  shift
  until "$@"; do
    if [ "$try" -ge "$tries" ]; then
      log "ERROR: $what failed for good ($tries tries, ${pause}s apart)"
      return 1
    fi
    log "$what failed (try $try of $tries); trying again in ${pause}s"
    sleep "$pause"
    try=$((try + 1))
  done
}

# apt_install PKG...: install whichever of the packages are missing.
# A policy-rc.d that answers 101 keeps the packages' maintainer scripts from
# starting their system daemons (default configs, standard ports): we run our
# own private instances, or reuse what the machine already runs.
apt_install() {
  local p missing=()
  for p in "$@"; do
    [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] \
      || missing+=("$p")
  done
  [ ${#missing[@]} -gt 0 ] || return 0
  log "apt-get install: ${missing[*]}"
  (
    # one of ours at a time (up.sh runs parts at once): the first one's
    # policy-rc.d must not vanish while another installs a daemon
    exec 9>/run/lock/m2d-testbed-apt.lock
    flock 9
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
      chmod 755 /usr/sbin/policy-rc.d
      trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    export DEBIAN_FRONTEND=noninteractive
    # another apt run's lock is waited for, but not forever
    retry "apt-get update" timeout 600 apt-get -o DPkg::Lock::Timeout=300 update -q >/dev/null
    retry "apt-get install ${missing[*]}" timeout 900 apt-get -o DPkg::Lock::Timeout=300 install -y -q \
      --no-install-recommends "${missing[@]}" >/dev/null
  ) || die "apt-get install ${missing[*]} failed"
}

# pid_alive PIDFILE EXE_GLOB [CMD_GLOB]: print the recorded pid if that
# process is alive and is what we started: the basename of /proc/PID/exe
# must match EXE_GLOB and its command line (NULs as spaces) CMD_GLOB.
# Globs may use extglob alternatives, e.g. '@(slurmd|slurmd-wlm)' (Debian's
# Slurm binaries are *-wlm; redis-server's exe is redis-check-rdb).
pid_alive() {
  local f=$1 exe_glob=$2 cmd_glob=${3:-*} pid exe cmd
  [ -s "$f" ] || return 1
  pid=$(cat "$f")
  case "$pid" in ''|*[!0-9]*) return 1 ;; esac
  kill -0 "$pid" 2>/dev/null || return 1
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
  cmd=$(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null) || return 1
  # shellcheck disable=SC2053
  [[ ${exe##*/} == $exe_glob && $cmd == $cmd_glob ]] || return 1
  echo "$pid"
}

# start_bg PIDFILE LOGFILE CMD...: run CMD detached in its own session
# (setsid: it is then also the leader of its own process group, which
# stop_pid can signal as a whole) and record its pid.
start_bg() {
  local pidf=$1 logf=$2; shift 2
  setsid "$@" </dev/null >>"$logf" 2>&1 &
  echo $! > "$pidf"
}

# alive PID: the process exists and is not a zombie.  Our daemons are
# setsid'ed orphans whose reaper is PID 1, and PID 1 on these VMs reaps only
# every couple of seconds: kill -0 alone would count the zombie as alive.
alive() {
  kill -0 "$1" 2>/dev/null || return 1
  [ "$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)" != Z ]
}

# pgid_of PID: process group id, from /proc (fields after the ")" of comm)
pgid_of() { sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | awk '{print $3}'; }

# stop_pid NAME PIDFILE EXE_GLOB CMD_GLOB GRACE [group]: SIGTERM the process
# recorded in PIDFILE if it still is ours (see pid_alive), SIGKILL after
# GRACE seconds.
# With "group", the whole process group it leads gets the signals (servers
# that fork workers, e.g. gunicorn under mlflow).
stop_pid() {
  local name=$1 f=$2 exe_glob=$3 cmd_glob=$4 grace=$5 group=${6:-} pid target i
  if ! pid=$(pid_alive "$f" "$exe_glob" "$cmd_glob"); then
    log "$name not running (no live pid in $f)"; rm -f "$f"; return 0
  fi
  target=$pid
  if [ "$group" = group ] && [ "$(pgid_of "$pid")" = "$pid" ]; then
    target=-$pid
  fi
  kill -TERM -- "$target" 2>/dev/null || true
  for ((i = 0; i < grace * 10; i++)); do
    alive "$pid" || break
    sleep 0.1
  done
  if alive "$pid"; then
    log "$name (pid $pid) ignored SIGTERM for ${grace}s, sending SIGKILL"
    kill -KILL -- "$target" 2>/dev/null || true
    sleep 0.2
  elif [ "$target" != "$pid" ]; then
    # leader gone; give its workers the rest of a moment, then make sure.
    # Only while the group has members: an empty group's number is free, and
    # pids wrap (a Slurm job's batch shell may lead a group of that number now).
    for ((i = 0; i < 20; i++)); do kill -0 -- "$target" 2>/dev/null || break; sleep 0.1; done
    if kill -0 -- "$target" 2>/dev/null; then kill -KILL -- "$target" 2>/dev/null || true; fi
  fi
  rm -f "$f"
  log "$name (pid $pid) stopped"
}

# wait_until SECONDS WHAT CMD...: retry CMD until it succeeds; die after
# SECONDS.  A command is bounded to 10 s a try by timeout(1); a shell
# function (which timeout cannot run) must bound itself.  Set WAIT_PID (a pid
# we just started) and WAIT_LOG to die early, with the end of the log, when
# that process exits.
wait_until() {
  local secs=$1 what=$2 end=$((SECONDS + $1)) bound=(timeout 10); shift 2
  declare -F "$1" >/dev/null && bound=()
  while ((SECONDS < end)); do
    "${bound[@]}" "$@" >/dev/null 2>&1 && return 0
    if [ -n "${WAIT_PID:-}" ] && ! alive "$WAIT_PID"; then
      [ -n "${WAIT_LOG:-}" ] && tail -n 20 "$WAIT_LOG" >&2
      die "$what exited during startup${WAIT_LOG:+; see $WAIT_LOG}"
    fi
    sleep 0.2
  done
  [ -n "${WAIT_LOG:-}" ] && tail -n 20 "$WAIT_LOG" >&2
  die "timed out after $secs s waiting for $what"
}

# port_busy PORT: is something listening on 127.0.0.1:PORT?
# (bash's /dev/tcp, so no iproute2 or netcat needed)
port_busy() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

# psql_admin ARGS...: psql as PostgreSQL's superuser (the local `postgres` account)
psql_admin() { timeout 20 runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 "$@"; }

# postgres_up: Debian's PostgreSQL answering: the cluster the machine already
# runs, or the package's `main` cluster started without systemd
# (pg_ctlcluster --skip-systemctl-redirect).
postgres_up() {
  apt_install postgresql
  psql_admin -c 'SELECT 1' >/dev/null 2>&1 && return 0
  local version
  version=$(ls /etc/postgresql | sort -V | tail -1)
  [ -n "$version" ] || die "postgresql is installed but has no cluster in /etc/postgresql"
  log "starting PostgreSQL $version main"
  pg_ctlcluster --skip-systemctl-redirect "$version" main start || die "pg_ctlcluster $version main start failed"
  wait_until 30 "PostgreSQL to answer" psql_admin -c 'SELECT 1' || exit 1
}

# postgres_role ROLE PASSWORD ATTRIBUTES DATABASE...: a login role with this
# password and these attributes ('' or e.g. CREATEDB), owning these databases,
# made if missing (the cluster must answer: postgres.sh).
postgres_role() {
  local role=$1 password=$2 attributes=$3 database; shift 3
  psql_admin -v role="$role" -v password="$password" <<SQL >/dev/null
SELECT format('CREATE ROLE %I LOGIN', :'role')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role') \\gexec
SELECT format('ALTER ROLE %I LOGIN $attributes PASSWORD %L', :'role', :'password') \\gexec
SQL
  for database in "$@"; do
    psql_admin -v role="$role" -v db="$database" <<'SQL' >/dev/null
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'role')
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db') \gexec
SQL
  done
}

# secret_file PATH: print a secret, generating it (mode 600) the first time
secret_file() {
  local f=$1
  if [ ! -s "$f" ]; then
    mkdir -p "$(dirname "$f")"; chmod 700 "$(dirname "$f")"
    # 32 hex digits (128 bits); od reads exactly 16 bytes, so no pipe closes early
    (umask 077; od -An -tx1 -N16 /dev/urandom | tr -d ' \n' > "$f.tmp")
    mv -f "$f.tmp" "$f"
  fi
  chmod 600 "$f"
  cat "$f"
}

# put_file DEST [MODE]: write stdin (text) to DEST, but only when the
# content differs (then via a temp file + rename), so that a re-run changes
# nothing, not even the folder's mtime.  Sets FILE_CHANGED=1 when it wrote;
# callers reset it to 0 before a group of files.
FILE_CHANGED=0
put_file() {
  local dest=$1 mode=${2:-} content
  content=$(cat; echo .)   # the dot keeps trailing newlines
  content=${content%.}
  if ! printf '%s' "$content" | cmp -s - "$dest"; then
    printf '%s' "$content" > "$dest.tmp.$$"
    [ -z "$mode" ] || chmod "$mode" "$dest.tmp.$$"
    mv -f "$dest.tmp.$$" "$dest"
    FILE_CHANGED=1
  fi
  [ -z "$mode" ] || chmod "$mode" "$dest"
}
