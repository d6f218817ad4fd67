#!/usr/bin/env bash
# images.sh [TESTBED_DIR] -- Apptainer (apptainer.sh), then the base images of
# Python 3.11, 3.9 and 3.13 (base-image.sh) built at once. up.sh runs it in
# the background from the start, beside Slurm's install: the debootstraps are
# the longest part of a fresh testbed. Each base image's lines are prefixed
# with its Python.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

set_testbed_dir "${1:-}"
here=$M2D_TESTBED_SRC
"$here/apptainer.sh" "$TESTBED_DIR"
pids=()
for python in 3.11 3.9 3.13; do
  ("$here/base-image.sh" "$TESTBED_DIR" "$python" 2>&1 | sed -u "s/^/base-$python: /") &
  pids+=($!)
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=$((failed + 1)); done
[ "$failed" = 0 ] || die "$failed of the base images failed to build (lines above)"
