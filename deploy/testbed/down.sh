#!/usr/bin/env bash
# down.sh [TESTBED_DIR] -- stop what up.sh started, in reverse order, and only
# that (each script signals just the pids in its own pid files; a Redis that
# was already running is left alone).  Data stays: images, the dataset, the
# MLflow and accounting databases, mail.  up.sh brings it all back.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

set_testbed_dir "${1:-}"
here=$M2D_TESTBED_SRC
rc=0
# keep going past a failure, so one stuck service does not keep others up
for part in smtp mlflow redis fault-cluster slurm nodes; do
  log "---- $part"
  "$here/$part.sh" stop "$TESTBED_DIR" || { log "WARNING: stopping $part failed"; rc=1; }
done
log "testbed in $TESTBED_DIR stopped"
exit $rc
