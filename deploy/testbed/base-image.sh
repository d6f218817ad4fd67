#!/usr/bin/env bash
# base-image.sh [TESTBED_DIR] [PYTHON] -- build singularity/base.def with the
# testbed's Apptainer into TESTBED_DIR/images/base-<sha256(base.def), 12 hex>.sif
# and point TESTBED_DIR/images/base.sif at it.  With PYTHON (3.9 or 3.13) the
# same definition is built on the Debian release that ships that Python
# (bullseye, trixie) as base-py<PYTHON>-<sha>.sif, linked from
# base-<PYTHON>.sif; 3.11 is bookworm, the default base.sif.  An unchanged
# definition means the image is reused, not rebuilt.  Needs apptainer.sh.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

set_testbed_dir "${1:-}"
PYTHON=${2:-3.11}
DEF=$(realpath "$M2D_TESTBED_SRC/../../singularity/base.def")
# the Debian release whose python3 is PYTHON (the gateway's BASE_IMAGES names these files)
case "$PYTHON" in
  3.9) suite=bullseye ;; 3.11) suite=bookworm ;; 3.13) suite=trixie ;;
  *) die "no Debian release ships Python $PYTHON here; use 3.9, 3.11 or 3.13" ;;
esac
APPTAINER=$TESTBED_DIR/apptainer/bin/apptainer
IMAGES=$TESTBED_DIR/images

require_root
[ -x "$APPTAINER" ] || die "no $APPTAINER; run deploy/testbed/apptainer.sh first"
mkdir -p "$IMAGES"

if [ "$suite" = bookworm ]; then
  name=base-$(sha256sum "$DEF" | cut -c1-12).sif link=base.sif
else
  # the definition with only its release changed, kept beside the image it made
  def=$IMAGES/base-$PYTHON.def
  sed "s/^OSVersion: .*/OSVersion: $suite/" "$DEF" > "$def.$$" && mv -f "$def.$$" "$def"
  DEF=$def name=base-py$PYTHON-$(sha256sum "$DEF" | cut -c1-12).sif link=base-$PYTHON.sif
fi
if [ -s "$IMAGES/$name" ]; then
  log "reusing $IMAGES/$name (base.def unchanged)"
else
  # Build under a temporary name in the same folder, then rename: a build
  # that dies half way never leaves a file that looks finished.
  tmp=$IMAGES/.building-$$-$name
  trap 'rm -f "$tmp"' EXIT
  log "building $IMAGES/$name from $DEF (a few minutes: debootstrap of $suite)"
  # The CA bind lets %post (and children's pip) trust the machine's TLS proxy.
  # The build downloads (debootstrap of the base, pip): --force starts each try afresh.
  # zstd at level 1, as the environment images (M2D_BUILD_MKSQUASHFS_ARGS): apptainer's
  # gzip took 23 s of CPU per base image, on the fresh testbed's longest path, for 8 % less.
  build_base() { APPTAINER_WRAPPER_BUILD_BIND_CA=1 "$APPTAINER" build --force \
                   --mksquashfs-args "-comp zstd -Xcompression-level 1" "$tmp" "$DEF" > "$IMAGES/$name.build.log" 2>&1; }
  if ! retry "apptainer build of $name (debootstrap of $suite, pip)" build_base; then
    tail -n 30 "$IMAGES/$name.build.log" >&2
    die "apptainer build failed; see $IMAGES/$name.build.log"
  fi
  mv -f "$tmp" "$IMAGES/$name"
  trap - EXIT
  log "built $IMAGES/$name ($(du -h "$IMAGES/$name" | cut -f1))"
fi
# relative link, so the folder can be bound elsewhere or moved as a whole
[ "$(readlink "$IMAGES/$link")" = "$name" ] || ln -sfn "$name" "$IMAGES/$link"

# Smoke test of a sealed container, the way jobs run it: as the job account
# (accounts.sh), through the wrapper's sudo rule, in user-namespace mode.
job_user=${M2D_JOB_USER:-m2d-job}
if id "$job_user" >/dev/null 2>&1 && [ -e /etc/sudoers.d/m2d ]; then
  out=$(cd / && setpriv --reuid="$job_user" --regid="$job_user" --init-groups --reset-env \
          "$APPTAINER" exec --containall --cleanenv --no-privs --net --network none \
          "$IMAGES/$link" sh -c 'id -u; grep ^CapEff /proc/self/status' 2>&1) \
    || die "apptainer as $job_user failed: $out"
  case "$out" in "$(id -u "$job_user")"*"CapEff:"*0000000000000000) ;;
    *) die "apptainer as $job_user did not run unprivileged: $out" ;; esac
  log "base image runs sealed as $job_user"
fi
