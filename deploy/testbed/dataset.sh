#!/usr/bin/env bash
# dataset.sh [TESTBED_DIR] -- the synthetic CLaM dataset in TESTBED_DIR/clam
# (make_dataset.py), readable by the job account alone: owner root, group
# M2D_DATA_GROUP (m2d-data, whose only member is the job account), modes
# 0750 for folders and 0640 for files, nothing for others.  The gateway's
# account (m2d) is not in that group: nothing in the gateway reads the data,
# so a gateway tricked into reading for a job (a symlink, a confused path)
# gets EACCES (issue 21).  Idempotent.
#
# env: M2D_PYTHON (python3 with numpy and Pillow), M2D_USER (m2d),
#      M2D_JOB_USER (m2d-job), M2D_DATA_GROUP (m2d-data).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

set_testbed_dir "${1:-}"
PYTHON=${M2D_PYTHON:-python3}
GW_USER=${M2D_USER:-m2d}
JOB_USER=${M2D_JOB_USER:-m2d-job}
DATA_GROUP=${M2D_DATA_GROUP:-m2d-data}
DATASET=$TESTBED_DIR/clam
require_root

getent group "$DATA_GROUP" >/dev/null || { groupadd --system "$DATA_GROUP"; log "created group $DATA_GROUP"; }
id -nG "$JOB_USER" | tr ' ' '\n' | grep -x "$DATA_GROUP" >/dev/null || gpasswd -a "$JOB_USER" "$DATA_GROUP" >/dev/null
if id -nG "$GW_USER" | tr ' ' '\n' | grep -x "$DATA_GROUP" >/dev/null; then
  die "$GW_USER is a member of group $DATA_GROUP: remove it (gpasswd -d $GW_USER $DATA_GROUP)"
fi

"$PYTHON" "$M2D_TESTBED_SRC/make_dataset.py" "$DATASET"
chown -R "root:$DATA_GROUP" "$DATASET"
chmod -R u=rwX,g=rX,o= "$DATASET"
# the folders above it stay passable (0755): only the dataset itself is closed
log "dataset: $(stat -c '%U:%G %A' "$DATASET") $DATASET"
