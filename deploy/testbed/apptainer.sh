#!/usr/bin/env bash
# apptainer.sh [TESTBED_DIR] -- make a real Apptainer (Debian sid package,
# 1.4.x) usable on a Debian 12 host, where it is not packaged and sid's .deb
# cannot be installed (it needs glibc >= 2.38):
#   TESTBED_DIR/apptainer/root               Debian trixie chroot; apptainer
#                                            from sid (apt-pinned), the rest
#                                            from trixie
#   TESTBED_DIR/apptainer/apptainer-wrapper  runs the chroot's apptainer from
#                                            the host: private mount namespace
#                                            + bind mounts + pivot_root, then
#                                            drops to the caller (non-root
#                                            callers come through sudo)
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
  debootstrap_root() {  # each try from an empty root
    rm -rf "$ROOT"
    debootstrap --variant=minbase --keyring="$KEYRING" "$SUITE" "$ROOT" "$MIRROR" > "$PREFIX/debootstrap.log" 2>&1
  }
  retry "debootstrap of $SUITE from $MIRROR" debootstrap_root \
    || { tail -n 20 "$PREFIX/debootstrap.log" >&2; die "debootstrap failed"; }
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
  chroot_apt() {
    in_root sh -ec "apt-get update -q; apt-get install -y -q --no-install-recommends $PKGS; apt-get clean" \
      > "$PREFIX/apt.log" 2>&1
  }
  retry "apt-get install in the chroot: $PKGS" chroot_apt \
    || { tail -n 20 "$PREFIX/apt.log" >&2; die "apt-get in the chroot failed"; }
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

# ---- 5b. Apptainer runs unprivileged (user-namespace mode), never setuid.
# Debian's package ships no setuid starter anyway; "allow setuid = no" makes
# that explicit, so a non-root caller can never reach a privileged flow.
conf=$ROOT/etc/apptainer/apptainer.conf
touch "$ROOT/etc/subuid" "$ROOT/etc/subgid"   # the wrapper binds the host's over them
if ! grep -qx 'allow setuid = no' "$conf"; then
  sed -i 's/^allow setuid = .*/allow setuid = no/' "$conf"
  grep -qx 'allow setuid = no' "$conf" || echo 'allow setuid = no' >> "$conf"
  log "apptainer.conf: allow setuid = no"
fi
# Setuid binaries of the chroot that a non-root caller could reach inside the
# wrapper's namespace and that nothing here needs.  (newuidmap/newgidmap stay:
# fakeroot builds map the gateway account's /etc/subuid range with them.)
for f in mount umount su chfn chsh gpasswd newgrp passwd fusermount3; do
  p=$ROOT/usr/bin/$f
  if [ -u "$p" ] || [ -g "$p" ]; then chmod ug-s "$p"; log "chroot: setuid bit removed from /usr/bin/$f"; fi
done

# ---- 6. the host-side wrapper
TOP=/$(echo "$PREFIX" | cut -d/ -f2)
sed -e "s|@ROOT@|$ROOT|" -e "s|@TOP@|$TOP|" -e "s|@SELF@|$PREFIX/apptainer-wrapper|" <<'EOF' | put_file "$PREFIX/apptainer-wrapper" 755
#!/bin/sh
# Runs the apptainer installed in a Debian trixie chroot as if it were
# native.  Generated by deploy/testbed/apptainer.sh.
#
# Root enters the chroot (private mount namespace, bind mounts, pivot_root),
# then runs apptainer as the CALLER, unprivileged:
#   - a non-root caller is sent back through `sudo -n` to this very file
#     (sudoers: /etc/sudoers.d/m2d); the user to become is SUDO_UID/SUDO_GID,
#     which sudo sets itself;
#   - root stays root, unless APPTAINER_WRAPPER_USER names a user to become.
# Apptainer then runs in user-namespace mode (apptainer.conf: allow setuid =
# no): no capabilities, file permissions apply.  The bind mounts below only
# make host folders visible; they never grant access.
#
# Root-only knobs (ignored for a caller that came through sudo):
#   APPTAINER_CHROOT             chroot to use (default below)
#   APPTAINER_WRAPPER_BINDS      extra host dirs to share (space separated)
#   APPTAINER_WRAPPER_USER       user to run apptainer as (default: root)
# For anyone:
#   APPTAINER_WRAPPER_BUILD_BIND_CA=1  "build" also gets
#       --bind /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt
#       so %post (pip, curl) trusts the host's CAs, e.g. a TLS-intercepting
#       proxy.  The image must already contain that file (ca-certificates).
set -euf   # -f: no pathname expansion of the caller's arguments
SELF=@SELF@
PROG=$(basename "$0"); case "$PROG" in singularity) ;; *) PROG=apptainer ;; esac

if [ "$(id -u)" != 0 ]; then
  # sudo's env_reset drops the caller's environment (except what the sudoers
  # file keeps), so nothing below can be steered from it.
  exec sudo -n -- "$SELF" "$@"
fi

# The inner half runs in the private mount namespace that the outer half made:
# marked by the environment AND by a mount namespace other than PID 1's, so a
# forged marker cannot make the mounts below land on the host.
if [ "${_APPTW_INNER:-}" = 1 ] && [ "$(readlink /proc/self/ns/mnt)" != "$(readlink /proc/1/ns/mnt)" ]; then
  inner=1
else
  inner=0
fi

if [ $inner = 0 ]; then
  # ---- outer half, in the host's namespace: who to become, what to share
  # SUDO_UID counts only when sudo ran this very file (SUDO_COMMAND), not in
  # a root shell someone opened with `sudo -s`.
  via_sudo=0
  case "${SUDO_COMMAND:-}" in "$SELF"|"$SELF "*) [ "${SUDO_UID:-0}" != 0 ] && via_sudo=1 ;; esac
  if [ $via_sudo = 1 ]; then
    uid=$SUDO_UID; gid=${SUDO_GID:?}
    unset APPTAINER_CHROOT APPTAINER_WRAPPER_BINDS APPTAINER_WRAPPER_USER
  elif [ -n "${APPTAINER_WRAPPER_USER:-}" ]; then
    uid=$(id -u "$APPTAINER_WRAPPER_USER") && gid=$(id -g "$APPTAINER_WRAPPER_USER") \
      || { echo "$PROG (wrapper): no user $APPTAINER_WRAPPER_USER" >&2; exit 1; }
  else
    uid=0; gid=0
  fi
  ROOT=${APPTAINER_CHROOT:-@ROOT@}
  [ -x "$ROOT/usr/bin/apptainer.real" ] || { echo "$PROG (wrapper): no apptainer in $ROOT" >&2; exit 1; }
  pw=$(getent passwd "$uid") || { echo "$PROG (wrapper): uid $uid has no passwd entry" >&2; exit 1; }
  cwd=$(pwd -P)

  # shareable TOPDIR: a plain top-level host folder that hides nothing of the
  # chroot (absent there, or an empty folder), so no mount can ever shadow a
  # file that root runs below.
  shareable() {
    case "$1" in /[!.]*) ;; *) return 1 ;; esac
    case "$1" in /*/*|*[!A-Za-z0-9._/-]*) return 1 ;; esac
    case "$1" in /usr|/etc|/bin|/sbin|/lib|/lib32|/lib64|/libx32|/var|/proc|/sys|/dev|/run|/boot|/root) return 1 ;; esac
    [ -d "$1" ] && [ ! -L "$1" ] || return 1
    [ ! -e "$ROOT$1" ] && [ ! -L "$ROOT$1" ] && return 0
    [ -d "$ROOT$1" ] && [ ! -L "$ROOT$1" ] && [ -z "$(ls -A "$ROOT$1")" ]
  }
  # Host directories visible at the same path inside the chroot: the usual
  # shared ones, the top folder of the testbed itself (@TOP@: a definition
  # file's "From: .../base.sif" names an image that no argument shows), and
  # the top folder of every absolute path in the arguments (image, recipe,
  # --bind src:dst, a build's output) and of the working folder.
  binds=""
  for t in /tmp /var/tmp /home /mnt /srv /media /work @TOP@ ${APPTAINER_WRAPPER_BINDS:-}; do
    [ -d "$t" ] && binds="$binds $t"
  done
  for a in "$@" "$cwd"; do
    for t in $(printf '%s\n' "$a" | tr ':,=' '   '); do
      case "$t" in /*) ;; *) continue ;; esac
      top=/$(printf '%s' "$t" | cut -d/ -f2)
      if shareable "$top"; then binds="$binds $top"; fi
    done
  done

  # Re-exec in a private mount namespace; all mounts below vanish with it.
  _APPTW_INNER=1 _APPTW_ROOT=$ROOT _APPTW_UID=$uid _APPTW_GID=$gid _APPTW_CWD=$cwd \
  _APPTW_BINDS=$binds _APPTW_HOME=$(echo "$pw" | cut -d: -f6) _APPTW_NAME=$(echo "$pw" | cut -d: -f1) \
    exec unshare --mount --propagation private -- "$SELF" "$@"
fi

# ---- inner half: build the chroot's view, pivot into it, drop, run apptainer
ROOT=$_APPTW_ROOT; uid=$_APPTW_UID; gid=$_APPTW_GID; cwd=$_APPTW_CWD
name=$_APPTW_NAME; home=$_APPTW_HOME; binds=$_APPTW_BINDS
unset _APPTW_INNER _APPTW_ROOT _APPTW_UID _APPTW_GID _APPTW_CWD _APPTW_NAME _APPTW_HOME _APPTW_BINDS

mount --bind "$ROOT" "$ROOT"                # the new root must be a mount point
mount -t proc proc "$ROOT/proc"
mount --rbind /dev "$ROOT/dev"
mount --rbind /sys "$ROOT/sys"
# Host DNS config and CA trust, so apptainer itself behaves like on the host;
# host accounts and subordinate ids, so the caller exists in the chroot.
for f in /etc/resolv.conf /etc/ssl/certs/ca-certificates.crt /etc/passwd /etc/group /etc/subuid /etc/subgid; do
  if [ -f "$f" ] && [ -f "$ROOT$f" ]; then mount --bind -o ro "$f" "$ROOT$f" 2>/dev/null || mount --bind "$f" "$ROOT$f"; fi
done
seen=" "
for d in $binds; do
  case "$seen" in *" $d "*) continue ;; esac
  seen="$seen$d "
  mkdir -p "$ROOT$d"
  mount --rbind "$d" "$ROOT$d"
done

mkdir -p "$ROOT/.oldroot"
if [ "$uid" != 0 ] && [ -c /dev/fuse ]; then
  # The host's /dev/fuse may be root-only (0600).  Unprivileged apptainer
  # mounts SIF images with squashfuse, so it gets its own 0666 fuse node,
  # visible only in this namespace; the host's node is left alone.
  mount -t tmpfs -o mode=755,size=16k tmpfs "$ROOT/.oldroot"
  mknod -m 666 "$ROOT/.oldroot/fuse" c $((0x$(stat -c %t /dev/fuse))) $((0x$(stat -c %T /dev/fuse)))
  mount --bind "$ROOT/.oldroot/fuse" "$ROOT/dev/fuse"
  umount "$ROOT/.oldroot"
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
if [ "$uid" != 0 ]; then
  export HOME="$home" USER="$name" LOGNAME="$name"
  unset MAIL SUDO_COMMAND SUDO_USER SUDO_UID SUDO_GID
  # setpriv: real+effective ids and groups of the caller; capabilities go
  # with the uid change.
  drop="setpriv --reuid=$uid --regid=$gid --init-groups --inh-caps=-all --"
else
  drop=""
fi
# Apptainer aborts in a plain chroot ("Running inside a weak chrooted
# environment"), so make the chroot the real root of this namespace.
cd "$ROOT"
pivot_root . .oldroot
exec chroot . /bin/sh -c 'umount -l /.oldroot; cd "$0" 2>/dev/null || cd /; d=$1; p=$2; shift 2; exec $d "/usr/bin/$p" "$@"' \
  "$cwd" "$drop" "$PROG" "$@"
EOF
for name in apptainer singularity; do
  [ "$(readlink "$PREFIX/bin/$name")" = ../apptainer-wrapper ] || ln -sfn ../apptainer-wrapper "$PREFIX/bin/$name"
done

# ---- 7. smoke test: start a real container (the chroot itself as a sandbox)
log "$("$PREFIX/bin/apptainer" --version)"
"$PREFIX/bin/apptainer" exec --containall "$ROOT" /bin/true || die "apptainer smoke test failed"
log "ready: export PATH=$PREFIX/bin:\$PATH"
