#!/usr/bin/env bash
# uv.sh [TESTBED_DIR] -- put a pinned uv (the `uv` wheel's binary, from the
# project's package index) at TESTBED_DIR/uv/<version>/bin/uv and point
# TESTBED_DIR/uv/current at it; builds run TESTBED_DIR/uv/current/bin/uv
# (M2D_BUILD_UV in gateway.env), bound read-only into every base image, so no
# base image carries or rebuilds for it.  A new version is a new folder beside
# the old one and the link moves in one rename (a build that started keeps
# the binary it bound); an installed version is reused.
# env: M2D_PYTHON (python3 with pip).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

set_testbed_dir "${1:-}"
UV_VERSION=0.13.9
PYTHON=${M2D_PYTHON:-python3}
dir=$TESTBED_DIR/uv/$UV_VERSION

require_root
# "uv 0.13.9 (x86_64-unknown-linux-gnu)"
version_of() { "$1" --version 2>/dev/null | cut -d' ' -f2; }
# current -> VERSION, replaced in one rename
point_current() {
  [ "$(readlink "$TESTBED_DIR/uv/current")" = "$UV_VERSION" ] && return 0
  ln -sfn "$UV_VERSION" "$TESTBED_DIR/uv/.current-$$" && mv -fT "$TESTBED_DIR/uv/.current-$$" "$TESTBED_DIR/uv/current"
}
if [ "$(version_of "$dir/bin/uv")" = "$UV_VERSION" ]; then
  point_current
  log "reusing $dir/bin/uv"
  exit 0
fi
tmp=$TESTBED_DIR/uv/.installing-$$
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$TESTBED_DIR/uv"
pip_uv() {
  rm -rf "$tmp"
  "$PYTHON" -m pip install -q --disable-pip-version-check --no-deps --only-binary :all: \
    --target "$tmp" "uv==$UV_VERSION" 2>&1 | { grep -v "^WARNING: Location" >&2 || true; }
  [ "$(version_of "$tmp/bin/uv")" = "$UV_VERSION" ]
}
retry "pip install uv==$UV_VERSION" pip_uv || die "could not install uv $UV_VERSION"
# builds run as the gateway's account, which must read and run it
chmod -R a+rX "$tmp"
rm -rf "$dir"
mv "$tmp" "$dir"
trap - EXIT
point_current
log "installed $dir/bin/uv"
