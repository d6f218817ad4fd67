#!/usr/bin/env bash
# fault-cluster.sh start|stop [TESTBED_DIR] -- a second, small Slurm cluster
# beside the testbed's, for the tests that stop slurmctld and slurmdbd
# (tests/test_slurm_faults.py): on a cluster of their own they run beside the
# rest of the suite, whose jobs the testbed's cluster keeps running meanwhile.
#
# slurm.sh's cluster in single-node mode under TESTBED_DIR/faults: its own
# munged, MariaDB, slurmdbd and slurmctld, and this host as its one node (the
# testbed's nodes are namespaces, so this host runs no other slurmd); the
# testbed's settings moved apart (ports +20, cluster name +faults, job ids
# from 8,000,001: the credential claims are named by job id alone), kept in
# TESTBED_DIR/faults/testbed.env. accounts.sh gives it a Slurm wrapper and sudo rules of its
# own (M2D_SLURM_WRAPPER-faults, M2D_SUDOERS_FILE-faults); slurm.sh its event
# hook (the wrapper's path + -event). up.sh starts it when M2D_TESTBED_FAULTS=1
# (`make test` sets it); down.sh stops it.
#
# fault-cluster.sh stop-daemon|start-daemon slurmctld|slurmdbd [TESTBED_DIR]
# -- slurm.sh's, on this cluster.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ACTION=${1:-}; shift || true
DAEMON=
case "$ACTION" in *-daemon) DAEMON=${1:-}; shift || true ;; esac
set_testbed_dir "${1:-}"
here=$M2D_TESTBED_SRC
MAIN=$TESTBED_DIR FAULTS=$TESTBED_DIR/faults

# the settings, from the testbed's (lib.sh's testbed_settings) each time, so
# start and stop agree whatever ran before
settings() {
  multi_node || die "the fault cluster's node is this host, already the node of a single-node testbed" \
    "(M2D_TESTBED_NODES=1): use the default, M2D_TESTBED_NODES=2"
  M2D_TESTBED_NODES=1
  SLURM_CLUSTER_NAME=${SLURM_CLUSTER_NAME}faults
  SLURMCTLD_PORT=$((SLURMCTLD_PORT + 20)) SLURMD_PORT=$((SLURMD_PORT + 20))
  SLURMDBD_PORT=$((SLURMDBD_PORT + 20)) MYSQL_PORT=$((MYSQL_PORT + 20))
  SLURM_FIRST_JOB_ID=$((SLURM_FIRST_JOB_ID + 8000000))
  SLURM_LINK_ETC=0
  M2D_SLURM_WRAPPER=$M2D_SLURM_WRAPPER-faults M2D_SUDOERS_FILE=$M2D_SUDOERS_FILE-faults
  # the jobs' builds run the testbed's Apptainer (accounts.sh's sudo rule for it)
  export M2D_APPTAINER_WRAPPER=$MAIN/apptainer/apptainer-wrapper
  TESTBED_DIR=$FAULTS
}

start() {
  require_root
  settings
  mkdir -p "$TESTBED_DIR"
  save_testbed_settings
  "$here/accounts.sh" "$TESTBED_DIR"
  "$here/slurm.sh" start "$TESTBED_DIR"
}

stop() {
  [ -e "$FAULTS/testbed.env" ] || { log "no fault cluster in $FAULTS"; return 0; }
  settings
  "$here/slurm.sh" stop "$TESTBED_DIR"
}

case "$ACTION" in
  start) start ;;
  stop) stop ;;
  stop-daemon|start-daemon) settings; "$here/slurm.sh" "$ACTION" "$DAEMON" "$TESTBED_DIR" ;;
  *) echo "usage: $0 start|stop [TESTBED_DIR] | stop-daemon|start-daemon slurmctld|slurmdbd [TESTBED_DIR]" >&2
     exit 2 ;;
esac
