#!/usr/bin/env bash
# apptainer.sh [TESTBED_DIR] -- make a real Apptainer (Debian sid package,
# 1.4.x) usable on a Debian 12 host, where it is not packaged and sid's .deb
# cannot be installed (it needs glibc >= 2.38):
#   TESTBED_DIR/apptainer/root               Debian trixie chroot; apptainer
#                                            from sid (apt-pinned), the rest
#                                            from trixie
#   TESTBED_DIR/apptainer/apptainer-wrapper  runs the chroot's apptainer from
#                                            the host: private mount namespace
#                                            + bind mounts + pivot_root
#   TESTBED_DIR/apptainer/bin/apptainer   -> ../apptainer-wrapper
#   TESTBED_DIR/apptainer/bin/singularity -> ../apptainer-wrapper
#                                            (spython only runs `singularity`)
#
# Idempotent: finished steps are skipped and files are rewritten only when
# their content changes.  Needs root, the Debian mirror, and a kernel with
# loop devices, squashfs and overlay.
# env: APPTAINER_MIRROR (http://deb.debian.org/debian), APPTAINER_SUITE
#      (trixie), FORCE=1 (rebuild the chroot).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

set_testbed_dir "${1:-}"
PREFIX=$TESTBED_DIR/apptainer
ROOT=$PREFIX/root
MIRROR=${APPTAINER_MIRROR:-http://deb.debian.org/debian}
SUITE=${APPTAINER_SUITE:-trixie}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
PKGS="apptainer squashfs-tools squashfuse fuse2fs fuse-overlayfs gocryptfs e2fsprogs"
PKGS="$PKGS debootstrap ca-certificates python3"
STAMPS=$PREFIX/.stamps

require_root
mkdir -p "$PREFIX/bin" "$STAMPS"

# Run a command inside the chroot with /proc, /dev, /sys mounted in a private
# mount namespace (nothing leaks onto the host, even on failure).
in_root() {
  unshare --mount --propagation private -- /bin/sh -ec '
    R=$1; shift
    mount -t proc proc "$R/proc"; mount --rbind /dev "$R/dev"; mount --rbind /sys "$R/sys"
    exec chroot "$R" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
      DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 "$@"' sh "$ROOT" "$@"
}

# ---- 0. host prerequisites
apt_install debootstrap debian-archive-keyring
for m in loop squashfs overlay fuse; do modprobe -q "$m" 2>/dev/null || true; done

# ---- 1. debootstrap the trixie chroot
if [ "${FORCE:-0}" = 1 ]; then rm -f "$STAMPS"/*; fi
if [ ! -e "$STAMPS/debootstrap" ]; then
  log "debootstrap $SUITE (minbase) -> $ROOT"
  rm -rf "$ROOT"
  debootstrap --variant=minbase --keyring="$KEYRING" "$SUITE" "$ROOT" "$MIRROR" \
    > "$PREFIX/debootstrap.log" 2>&1 || { tail -n 20 "$PREFIX/debootstrap.log" >&2; die "debootstrap failed"; }
  touch "$STAMPS/debootstrap"; rm -f "$STAMPS/packages"
fi

# ---- 2. apt sources: the base suite + sid, pinned so only apptainer comes from sid
FILE_CHANGED=0
put_file "$ROOT/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
EOF
# Check-Valid-Until: no -- a mirror's sid Release file may be past its
# Valid-Until date (stale snapshot); trixie is checked normally.
put_file "$ROOT/etc/apt/sources.list.d/sid.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: sid
Components: main
Signed-By: $KEYRING
Check-Valid-Until: no
EOF
put_file "$ROOT/etc/apt/preferences.d/sid-pin" <<'EOF'
Package: *
Pin: release n=sid
Pin-Priority: 100

Package: apptainer
Pin: release n=sid
Pin-Priority: 990
EOF
[ "$FILE_CHANGED" = 0 ] || rm -f "$STAMPS/packages"
cmp -s /etc/resolv.conf "$ROOT/etc/resolv.conf" || cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true

# ---- 3. apptainer and its helpers
if [ ! -e "$STAMPS/packages" ]; then
  log "apt-get install in the chroot: $PKGS"
  in_root sh -ec "apt-get update -q; apt-get install -y -q --no-install-recommends $PKGS; apt-get clean" \
    > "$PREFIX/apt.log" 2>&1 || { tail -n 20 "$PREFIX/apt.log" >&2; die "apt-get in the chroot failed"; }
  touch "$STAMPS/packages"
fi

# ---- 4. the host's extra CA certificates (a TLS-intercepting proxy) into the chroot
if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
  mkdir -p "$ROOT/usr/local/share/ca-certificates"
  FILE_CHANGED=0
  for crt in /usr/local/share/ca-certificates/*.crt; do
    put_file "$ROOT/usr/local/share/ca-certificates/$(basename "$crt")" 644 < "$crt"
  done
  # (its "rehash: warning: skipping ca-certificates.crt" is harmless: to the log)
  [ "$FILE_CHANGED" = 0 ] || in_root update-ca-certificates > "$PREFIX/update-ca.log" 2>&1
fi

# ---- 5. shim: drop capabilities missing from the bounding set
# As root, Apptainer asks for the full capability set for the container and
# its starter aborts ("Requesting capability set 0x1ff... while permitted
# capability set is ...") when the host's bounding set is reduced (this VM
# kind lacks CAP_SYS_RESOURCE).  The nested "apptainer --build-config exec"
# that runs %post ignores apptainer.conf and strips APPTAINER_* from its env,
# so the fix has to sit at /usr/bin/apptainer itself (the path builds use).
[ -e "$ROOT/usr/bin/apptainer.real" ] || \
  in_root dpkg-divert --quiet --local --rename --divert /usr/bin/apptainer.real --add /usr/bin/apptainer
put_file "$ROOT/usr/bin/apptainer" 755 <<'EOF'
#!/bin/bash
# Shim from deploy/testbed/apptainer.sh; real binary: /usr/bin/apptainer.real
if [ "$(id -u)" = 0 ]; then
  names=(CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP
    LINUX_IMMUTABLE NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER
    SYS_MODULE SYS_RAWIO SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE
    SYS_RESOURCE SYS_TIME SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL SETFCAP
    MAC_OVERRIDE MAC_ADMIN SYSLOG WAKE_ALARM BLOCK_SUSPEND AUDIT_READ PERFMON BPF
    CHECKPOINT_RESTORE)
  bnd=$(awk '/^CapBnd:/{print $2}' /proc/self/status)
  missing=""
  for i in "${!names[@]}"; do
    (( (0x$bnd >> i) & 1 )) || missing="$missing,CAP_${names[$i]}"
  done
  missing=${missing#,}
  if [ -n "$missing" ]; then
    export APPTAINER_DROP_CAPS="${APPTAINER_DROP_CAPS:+$APPTAINER_DROP_CAPS,}$missing"
  fi
fi
exec -a "$0" /usr/bin/apptainer.real "$@"
EOF

# ---- 6. the host-side wrapper
TOP=/$(echo "$PREFIX" | cut -d/ -f2)
sed -e "s|@ROOT@|$ROOT|" -e "s|@TOP@|$TOP|" <<'EOF' | put_file "$PREFIX/apptainer-wrapper" 755
#!/bin/sh
# Runs the apptainer installed in a Debian trixie chroot as if it were
# native.  Generated by deploy/testbed/apptainer.sh.  Needs root (mount
# namespace, pivot_root).
#   APPTAINER_CHROOT             chroot to use (default below)
#   APPTAINER_WRAPPER_BINDS      extra host dirs to share (space separated)
#   APPTAINER_WRAPPER_BUILD_BIND_CA=1  "build" also gets
#       --bind /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt
#       so %post (pip, curl) trusts the host's CAs, e.g. a TLS-intercepting
#       proxy.  The image must already contain that file (ca-certificates).
set -eu
ROOT=${APPTAINER_CHROOT:-@ROOT@}
PROG=$(basename "$0"); case "$PROG" in singularity) ;; *) PROG=apptainer ;; esac
[ "$(id -u)" = 0 ] || { echo "$PROG (wrapper): must run as root" >&2; exit 1; }
[ -x "$ROOT/usr/bin/apptainer.real" ] || { echo "$PROG (wrapper): no apptainer in $ROOT" >&2; exit 1; }

if [ "${_APPTW_INNER:-}" != 1 ]; then
  # Re-exec in a private mount namespace; all mounts below vanish with it.
  _APPTW_INNER=1 _APPTW_CWD=$(pwd) exec unshare --mount --propagation private -- "$0" "$@"
fi
unset _APPTW_INNER

# Host directories visible at the same path inside the chroot: the usual
# shared ones, and the top folder of the testbed itself (@TOP@), since a
# definition file's "From: .../base.sif" names an image that no argument shows.
binds="/tmp /var/tmp /home /mnt /srv /media /work @TOP@ ${APPTAINER_WRAPPER_BINDS:-}"
# Plus the top-level dir of every absolute host path in the arguments (image,
# recipe, --bind src:dst, ...) that is not a system dir of the chroot and that
# exists, or whose parent exists: a build's output file is not there yet.
for a in "$@" "$_APPTW_CWD"; do
  for t in $(printf '%s\n' "$a" | tr ':,=' '   '); do
    case "$t" in /*) ;; *) continue ;; esac
    top=/$(printf '%s' "$t" | cut -d/ -f2)
    case "$top" in /|/usr|/etc|/bin|/sbin|/lib|/lib32|/lib64|/libx32|/var|/proc|/sys|/dev|/run|/boot) continue ;; esac
    if [ -e "$t" ] || [ -d "$(dirname "$t")" ]; then binds="$binds $top"; fi
  done
done

mount --bind "$ROOT" "$ROOT"                # the new root must be a mount point
mount -t proc proc "$ROOT/proc"
mount --rbind /dev "$ROOT/dev"
mount --rbind /sys "$ROOT/sys"
# Host DNS config and CA trust, so apptainer itself behaves like on the host.
[ -e /etc/resolv.conf ] && mount --bind /etc/resolv.conf "$ROOT/etc/resolv.conf"
[ -f /etc/ssl/certs/ca-certificates.crt ] && \
  mount --bind /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
seen=" "
for d in $binds; do
  case "$seen" in *" $d "*) continue ;; esac
  seen="$seen$d "
  [ -d "$d" ] || continue
  mkdir -p "$ROOT$d"
  mount --rbind "$d" "$ROOT$d"
done
if [ ! -d "$ROOT$_APPTW_CWD" ]; then        # cwd not shared yet: share it
  mkdir -p "$ROOT$_APPTW_CWD"; mount --rbind "$_APPTW_CWD" "$ROOT$_APPTW_CWD"
fi

if [ "${APPTAINER_WRAPPER_BUILD_BIND_CA:-0}" = 1 ]; then
  ca=/etc/ssl/certs/ca-certificates.crt; n=$#; state=0
  for a in "$@"; do                          # insert --bind after "build"
    if [ $state = 0 ] && [ "$a" = build ]; then set -- "$@" "$a" --bind "$ca:$ca"; state=1
    else case "$a" in -*) ;; *) [ $state = 0 ] && state=2 ;; esac; set -- "$@" "$a"; fi
  done
  shift "$n"
fi

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# Apptainer aborts in a plain chroot ("Running inside a weak chrooted
# environment"), so make the chroot the real root of this namespace.
mkdir -p "$ROOT/.oldroot"
cd "$ROOT"
pivot_root . .oldroot
cwd=$_APPTW_CWD; unset _APPTW_CWD
exec chroot . /bin/sh -c 'umount -l /.oldroot; cd "$0" 2>/dev/null || cd /; p=$1; shift; exec "/usr/bin/$p" "$@"' "$cwd" "$PROG" "$@"
EOF
for name in apptainer singularity; do
  [ "$(readlink "$PREFIX/bin/$name")" = ../apptainer-wrapper ] || ln -sfn ../apptainer-wrapper "$PREFIX/bin/$name"
done

# ---- 7. smoke test: start a real container (the chroot itself as a sandbox)
log "$("$PREFIX/bin/apptainer" --version)"
"$PREFIX/bin/apptainer" exec --containall "$ROOT" /bin/true || die "apptainer smoke test failed"
log "ready: export PATH=$PREFIX/bin:\$PATH"
