#!/usr/bin/env bash
# base-image.sh [TESTBED_DIR] -- build singularity/base.def with the testbed's
# Apptainer into TESTBED_DIR/images/base-<sha256(base.def), 12 hex>.sif and
# point TESTBED_DIR/images/base.sif at it.  An unchanged definition means the
# image is reused, not rebuilt.  Needs apptainer.sh to have run.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

set_testbed_dir "${1:-}"
DEF=$(realpath "$M2D_TESTBED_SRC/../../singularity/base.def")
APPTAINER=$TESTBED_DIR/apptainer/bin/apptainer
IMAGES=$TESTBED_DIR/images

require_root
[ -x "$APPTAINER" ] || die "no $APPTAINER; run deploy/testbed/apptainer.sh first"
mkdir -p "$IMAGES"

name=base-$(sha256sum "$DEF" | cut -c1-12).sif
if [ -s "$IMAGES/$name" ]; then
  log "reusing $IMAGES/$name (base.def unchanged)"
else
  # Build under a temporary name in the same folder, then rename: a build
  # that dies half way never leaves a file that looks finished.
  tmp=$IMAGES/.building-$$-$name
  trap 'rm -f "$tmp"' EXIT
  log "building $IMAGES/$name from $DEF (a few minutes: debootstrap of bookworm)"
  # The CA bind lets %post (and children's pip) trust the machine's TLS proxy.
  if ! APPTAINER_WRAPPER_BUILD_BIND_CA=1 "$APPTAINER" build --force "$tmp" "$DEF" \
      > "$IMAGES/$name.build.log" 2>&1; then
    tail -n 30 "$IMAGES/$name.build.log" >&2
    die "apptainer build failed; see $IMAGES/$name.build.log"
  fi
  mv -f "$tmp" "$IMAGES/$name"
  trap - EXIT
  log "built $IMAGES/$name ($(du -h "$IMAGES/$name" | cut -f1))"
fi
# relative link, so the folder can be bound elsewhere or moved as a whole
[ "$(readlink "$IMAGES/base.sif")" = "$name" ] || ln -sfn "$name" "$IMAGES/base.sif"

# Smoke test of a sealed container, the way jobs run it: as the job account
# (accounts.sh), through the wrapper's sudo rule, in user-namespace mode.
job_user=${M2D_JOB_USER:-m2d-job}
if id "$job_user" >/dev/null 2>&1 && [ -e /etc/sudoers.d/m2d ]; then
  out=$(cd / && setpriv --reuid="$job_user" --regid="$job_user" --init-groups --reset-env \
          "$APPTAINER" exec --containall --cleanenv --no-privs --net --network none \
          "$IMAGES/base.sif" sh -c 'id -u; grep ^CapEff /proc/self/status' 2>&1) \
    || die "apptainer as $job_user failed: $out"
  case "$out" in "$(id -u "$job_user")"*"CapEff:"*0000000000000000) ;;
    *) die "apptainer as $job_user did not run unprivileged: $out" ;; esac
  log "base image runs sealed as $job_user"
fi
