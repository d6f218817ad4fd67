#!/usr/bin/env bash
# accounts.sh [TESTBED_DIR] -- the two service accounts and the sudo rules
# that seal jobs off from the gateway.  Idempotent; run by up.sh before
# slurm.sh (which gives m2d-job its Slurm association) and apptainer.sh
# (whose wrapper drops to these accounts).
#
#   m2d      the gateway's account: web app, workers, image builds.
#            Member of group m2d-job, so it can read (and clean up) what
#            jobs write in export and log folders.
#   m2d-job  the account jobs run as.  No login shell; not in group m2d,
#            so it reads nothing of the gateway's.
#
# /usr/local/libexec/m2d/m2d-slurm (root's, from deploy/libexec/m2d-slurm):
#   the only Slurm commands that act as m2d-job; see that file.
# /etc/sudoers.d/m2d (checked with visudo -cf before it is installed):
#   m2d     may run `m2d-slurm submit|cancel ...` as root, which runs sbatch
#           (fixed options, a batch script the gateway wrote) and scancel as
#           m2d-job: no sbatch of its own choosing (--wrap would run outside
#           the container)
#   m2d-job may run `m2d-slurm credential` (no arguments) as m2d: a job's
#           relay gets its own owner's MLflow login and no other's
#   m2d, m2d-job  may run the Apptainer wrapper as root; the wrapper enters
#            its chroot and drops straight back to the caller (SUDO_UID), so
#            Apptainer itself runs unprivileged, in user-namespace mode.
#
# Kernel: unprivileged user namespaces must be on (user.max_user_namespaces
# > 0; kernel.unprivileged_userns_clone = 1 where that Debian sysctl exists).
#
# env: M2D_USER (m2d), M2D_JOB_USER (m2d-job), M2D_SUBID_START (a free
#      range of 65536 subordinate ids for m2d's fakeroot builds; default
#      the first free one from 100000).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

set_testbed_dir "${1:-}"
GW_USER=${M2D_USER:-m2d}
JOB_USER=${M2D_JOB_USER:-m2d-job}
# (fault-cluster.sh: the testbed's, for a second cluster's folder)
WRAPPER=${M2D_APPTAINER_WRAPPER:-$TESTBED_DIR/apptainer/apptainer-wrapper}
require_root

apt_install sudo

NOLOGIN=/usr/sbin/nologin
# make_user NAME HOME: a system user with its own group and a 0700 home under
# /home (the Apptainer wrapper shares /home with its chroot, not /var/lib, and
# Apptainer keeps its cache and config in $HOME).
make_user() {
  local name=$1 home=$2
  if ! id "$name" >/dev/null 2>&1; then
    log "creating system user $name (home $home)"
    useradd --system --user-group --home-dir "$home" --create-home \
      --shell "$NOLOGIN" --comment "M2D ${name}" "$name"
  fi
  mkdir -p "$home"
  [ "$(stat -c %U:%G "$home")" = "$name:$name" ] || chown "$name:$name" "$home"
  [ "$(stat -c %a "$home")" = 700 ] || chmod 700 "$home"
}
make_user "$JOB_USER" "/home/$JOB_USER"
make_user "$GW_USER" "/home/$GW_USER"
# the gateway reads what jobs write (group m2d-job); never the other way round
id -nG "$GW_USER" | tr ' ' '\n' | grep -x "$JOB_USER" >/dev/null || usermod -aG "$JOB_USER" "$GW_USER"
if id -nG "$JOB_USER" | tr ' ' '\n' | grep -x "$GW_USER" >/dev/null; then
  die "$JOB_USER is a member of group $GW_USER: remove it (gpasswd -d $JOB_USER $GW_USER)"
fi

# Subordinate ids for `apptainer build --fakeroot` as m2d (newuidmap maps
# them).  The wrapper shares /etc/subuid and /etc/subgid with its chroot.
touch /etc/subuid /etc/subgid
if ! grep -q "^$GW_USER:" /etc/subuid || ! grep -q "^$GW_USER:" /etc/subgid; then
  start=${M2D_SUBID_START:-}
  if [ -z "$start" ]; then   # after the highest range in use, from 100000
    start=$(cat /etc/subuid /etc/subgid | awk -F: 'BEGIN{m=100000} NF>=3 && $2+$3>m {m=$2+$3} END{print m}')
  fi
  grep -q "^$GW_USER:" /etc/subuid || usermod --add-subuids "$start-$((start + 65535))" "$GW_USER"
  grep -q "^$GW_USER:" /etc/subgid || usermod --add-subgids "$start-$((start + 65535))" "$GW_USER"
  log "subordinate ids for $GW_USER: $(grep "^$GW_USER:" /etc/subuid)"
fi

# Unprivileged user namespaces (Apptainer's non-setuid mode needs them).
if [ -e /proc/sys/kernel/unprivileged_userns_clone ] \
   && [ "$(cat /proc/sys/kernel/unprivileged_userns_clone)" != 1 ]; then
  log "sysctl kernel.unprivileged_userns_clone=1"
  sysctl -q -w kernel.unprivileged_userns_clone=1
fi
if [ "$(cat /proc/sys/user/max_user_namespaces)" = 0 ]; then
  log "sysctl user.max_user_namespaces=15000"
  sysctl -q -w user.max_user_namespaces=15000
fi

# The Slurm wrapper, root's: its settings are filled in here, not taken from
# whoever runs it.  Claims of handed-over credentials live in a node-local
# folder of the gateway's (one empty folder per job run).
SBATCH=$(command -v sbatch || echo /usr/bin/sbatch)
SCANCEL=$(command -v scancel || echo /usr/bin/scancel)
SCONTROL=$(command -v scontrol || echo /usr/bin/scontrol)
SLURM_WRAPPER=$M2D_SLURM_WRAPPER   # lib.sh (/usr/local/libexec/m2d/m2d-slurm)
CLAIM_DIR=/run/m2d-credentials
install -d -o root -g root -m 755 "$(dirname "$SLURM_WRAPPER")"
install -d -o "$GW_USER" -g "$GW_USER" -m 700 "$CLAIM_DIR"
tmp=$(mktemp "$(dirname "$SLURM_WRAPPER")/.m2d-slurm.XXXXXX")
sed -e "s|@GATEWAY_USER@|$GW_USER|; s|@JOB_USER@|$JOB_USER|; s|@SBATCH@|$SBATCH|; s|@SCANCEL@|$SCANCEL|" \
    -e "s|@SCONTROL@|$SCONTROL|; s|@SLURM_CONF@|$TESTBED_DIR/slurm/etc/slurm.conf|; s|@CLAIM_DIR@|$CLAIM_DIR|" \
    "$(dirname "${BASH_SOURCE[0]}")/../libexec/m2d-slurm" > "$tmp"
chown root:root "$tmp"; chmod 755 "$tmp"; mv -f "$tmp" "$SLURM_WRAPPER"

# The sudo rules.  Exact paths and arguments.
# Apptainer's cache/tmp folders and the wrapper's CA switch for builds
# (read by the unprivileged apptainer, or only adding a read-only bind).
# !use_pty: under a pty sudo would sit between slurmstepd and the job.
# M2D_SUDO_LEGACY_SLURM=1 keeps the old, wide rule (sbatch and scancel as
# m2d-job with any arguments) beside the new ones: only while a shared
# testbed still runs gateways from before the wrapper.
# Alias names are global to sudo: a second testbed's file (M2D_SUDOERS_FILE)
# has its own (m2d-nodes: M2D_NODES_SLURM ...).
A=$(basename "$M2D_SUDOERS_FILE" | tr 'a-z-' 'A-Z_')
legacy=
if [ "${M2D_SUDO_LEGACY_SLURM:-0}" = 1 ]; then
  legacy="Cmnd_Alias ${A}_LEGACY_SLURM = $SBATCH, $SCANCEL
Defaults!${A}_LEGACY_SLURM env_keep += \"SLURM_CONF\"
$GW_USER ALL = ($JOB_USER) NOPASSWD: ${A}_LEGACY_SLURM"
  log "sudo: keeping the legacy sbatch/scancel rule (M2D_SUDO_LEGACY_SLURM=1)"
fi
sudoers=$(cat <<EOF
# generated by deploy/testbed/accounts.sh -- do not edit
Cmnd_Alias ${A}_SLURM = $SLURM_WRAPPER submit *, $SLURM_WRAPPER cancel *
Cmnd_Alias ${A}_CREDENTIAL = $SLURM_WRAPPER credential
Cmnd_Alias ${A}_APPTAINER = $WRAPPER
Defaults:$GW_USER, $JOB_USER !use_pty, !lecture
Defaults!${A}_APPTAINER env_keep += "APPTAINER_CACHEDIR APPTAINER_TMPDIR APPTAINER_WRAPPER_BUILD_BIND_CA"
$GW_USER ALL = (root) NOPASSWD: ${A}_SLURM
$JOB_USER ALL = ($GW_USER) NOPASSWD: ${A}_CREDENTIAL
$legacy
$GW_USER ALL = (root) NOPASSWD: ${A}_APPTAINER
$JOB_USER ALL = (root) NOPASSWD: ${A}_APPTAINER
EOF
)
tmp=$(mktemp /etc/sudoers.d/.m2d.XXXXXX)   # (sudo skips names with a dot)
printf '%s\n' "$sudoers" > "$tmp"
chmod 440 "$tmp"
if cmp -s "$tmp" "$M2D_SUDOERS_FILE"; then
  rm -f "$tmp"
elif visudo -cqf "$tmp" >/dev/null; then
  old=$(mktemp /etc/sudoers.d/.m2d-old.XXXXXX)
  if [ -e "$M2D_SUDOERS_FILE" ]; then cp -p "$M2D_SUDOERS_FILE" "$old"; else rm -f "$old"; fi
  mv -f "$tmp" "$M2D_SUDOERS_FILE"
  # the whole configuration too (an alias another file defines is an error
  # that breaks every sudo): put the old file back if it does not parse
  if ! visudo -cq >/dev/null 2>&1; then
    visudo -c >&2 || true
    if [ -e "$old" ]; then mv -f "$old" "$M2D_SUDOERS_FILE"; else rm -f "$M2D_SUDOERS_FILE"; fi
    die "sudoers with $M2D_SUDOERS_FILE failed visudo -c; the old one is back"
  fi
  rm -f "$old"
  log "installed $M2D_SUDOERS_FILE"
else
  visudo -cf "$tmp" >&2 || true; rm -f "$tmp"
  die "sudoers drop-in failed visudo -cf"
fi
# the main sudoers must read the drop-ins (Debian's does, with @includedir)
grep -Eq '^[@#]includedir[[:space:]]+/etc/sudoers.d' /etc/sudoers \
  || die "/etc/sudoers does not include /etc/sudoers.d"

log "accounts: $(id "$GW_USER"); $(id "$JOB_USER")"
