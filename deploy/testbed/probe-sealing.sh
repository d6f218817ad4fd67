#!/usr/bin/env bash
# probe-sealing.sh [TESTBED_DIR] -- prove, on the running testbed, that a job
# is sealed: submit hostile jobs the way the gateway does (as m2d, through
# sudo, as m2d-job) and print PASS/FAIL for each attempt to get out.
# Builds nothing: runs deploy/testbed/probe_inside.py on images/base.sif.
# Exit status 0 only if every check passed.  Run as root, after up.sh.
#
#   job 1 (probe):  --mem=1G --cpus-per-task=1; on the host side (as m2d-job)
#                   tries the gateway's files, sudo and the wrapper; inside the
#                   container runs the probes; leaves `setsid sleep` behind
#                   on the host and in the container
#   job 2 (hog):    --mem=1G; touches 3 GiB inside the container: must end
#                   OUT_OF_MEMORY
# Keeps the last run's folder in TESTBED_DIR/probe-sealing for inspection.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

set_testbed_dir "${1:-}"
require_root
GW_USER=${M2D_USER:-m2d}
JOB_USER=${M2D_JOB_USER:-m2d-job}
APPTAINER=$TESTBED_DIR/apptainer/bin/apptainer
IMAGE=$TESTBED_DIR/images/base.sif
DATASET=$TESTBED_DIR/clam
export SLURM_CONF=$TESTBED_DIR/slurm/etc/slurm.conf
for f in "$APPTAINER" "$IMAGE" "$DATASET" "$SLURM_CONF"; do
  [ -e "$f" ] || die "$f missing: run deploy/testbed/up.sh first"
done
id "$JOB_USER" >/dev/null 2>&1 || die "no user $JOB_USER: run deploy/testbed/accounts.sh"

FAILS=0
pass() { printf 'PASS  %-40s %s\n' "$1" "${2:-}"; }
fail() { printf 'FAIL  %-40s %s\n' "$1" "${2:-}"; FAILS=$((FAILS + 1)); }
verdict() { if [ "$2" = 1 ]; then pass "$1" "${3:-}"; else fail "$1" "${3:-}"; fi; }

# ---- a submission's folders, with the ownership the gateway must give them
TAG=m2dprobe-$(date +%s)
RUN=$TESTBED_DIR/probe-sealing
rm -rf "$RUN"
mkdir -p "$RUN"/{code,export,logs,relay}
# m2d owns everything; group m2d-job reads code (2750) and writes export and
# logs (2770); the relay folder belongs to the job account alone (0700).
chown "$GW_USER:$JOB_USER" "$RUN" "$RUN"/{code,export,logs}
chmod 2750 "$RUN" "$RUN/code"; chmod 2770 "$RUN/export" "$RUN/logs"
chown "$JOB_USER:$JOB_USER" "$RUN/relay"; chmod 700 "$RUN/relay"
install -m 640 -o "$GW_USER" -g "$JOB_USER" "$M2D_TESTBED_SRC/probe_inside.py" "$RUN/code/main.py"

# canaries the job must not see: in root's home and among the testbed's secrets
CANARIES=("/root/$TAG-canary" "$TESTBED_DIR/secrets/$TAG-canary")
for c in "${CANARIES[@]}"; do echo secret > "$c"; chmod 600 "$c"; done
trap 'rm -f "${CANARIES[@]}"' EXIT
touch "$RUN/.t0"

# the exact apptainer line of a sealed job
SEALED="$APPTAINER exec --containall --cleanenv --no-privs --net --network none \
  --bind $DATASET:/mnt/dataset:ro --bind $RUN/export:/mnt/export \
  --bind $RUN/code:/code:ro --bind $RUN/relay:/run/m2d:ro --pwd /code"

cat > "$RUN/probe.sbatch" <<EOF
#!/bin/bash
#SBATCH --job-name=$TAG-probe
#SBATCH --output=$RUN/logs/slurm-%j.out
#SBATCH --error=$RUN/logs/slurm-%j.err
#SBATCH --time=00:05:00
#SBATCH --mem=1G
#SBATCH --cpus-per-task=1
echo "TIME batch_start \$(date +%s.%N)"
echo "INFO host side: \$(id)"
# host side, as the job account: nothing of the gateway's, no root
for p in $TESTBED_DIR/secrets $TESTBED_DIR/gateway.env $TESTBED_DIR/gateway /home/$GW_USER /root /etc/sudoers.d/m2d; do
  if { [ -f "\$p" ] && cat "\$p" >/dev/null 2>&1; } || { [ -d "\$p" ] && ls "\$p" >/dev/null 2>&1; }; then
    echo "CHECK host_unreadable:\$p FAIL readable"
  else echo "CHECK host_unreadable:\$p PASS"; fi
done
if sudo -n /bin/true 2>/dev/null; then echo "CHECK host_no_sudo_shell FAIL sudo /bin/true worked"
else echo "CHECK host_no_sudo_shell PASS"; fi
if sudo -n -u $GW_USER /usr/bin/id 2>/dev/null; then echo "CHECK host_no_sudo_to_gateway FAIL"
else echo "CHECK host_no_sudo_to_gateway PASS"; fi
# the wrapper runs as root: it must only ever run apptainer as us
out=\$(APPTAINER_CHROOT=/tmp APPTAINER_WRAPPER_USER=root $APPTAINER exec $IMAGE id -u 2>&1)
if [ "\$out" = "\$(id -u)" ]; then echo "CHECK wrapper_runs_as_caller PASS id -u=\$out"
else echo "CHECK wrapper_runs_as_caller FAIL \$out"; fi
if $APPTAINER exec --bind $TESTBED_DIR/secrets:/s $IMAGE ls /s >/dev/null 2>&1; then
  echo "CHECK wrapper_bind_secrets_refused FAIL"
else echo "CHECK wrapper_bind_secrets_refused PASS"; fi
if $APPTAINER exec --bind /root:/r $IMAGE cat /r/$TAG-canary >/dev/null 2>&1; then
  echo "CHECK wrapper_bind_root_refused FAIL"
else echo "CHECK wrapper_bind_root_refused PASS"; fi
if $APPTAINER exec --bind /dev:/hostdev $IMAGE head -c1 /hostdev/vda >/dev/null 2>&1; then
  echo "CHECK wrapper_host_disk_refused FAIL"
else echo "CHECK wrapper_host_disk_refused PASS"; fi
echo "INFO nproc on the host side: \$(nproc)"
# a process that tries to outlive the job, on the host side
setsid sleep 1000.\$SLURM_JOB_ID </dev/null >/dev/null 2>&1 &
echo "TIME apptainer_start \$(date +%s.%N)"
$SEALED --env PROBE_JOB=\$SLURM_JOB_ID $IMAGE python3 /code/main.py $TAG
echo "TIME batch_end \$(date +%s.%N)"
EOF

cat > "$RUN/hog.sbatch" <<EOF
#!/bin/bash
#SBATCH --job-name=$TAG-hog
#SBATCH --output=$RUN/logs/slurm-%j.out
#SBATCH --time=00:05:00
#SBATCH --mem=1G
#SBATCH --cpus-per-task=1
# Each GiB filled by one memset (C, no Python loop): a loop touching page by page
# needs its own code pages (on the image's FUSE mount, reclaimed at the limit)
# back after every page, and on a loaded machine the job thrashed at 1G for
# its whole time limit instead of being OOM-killed.
$SEALED $IMAGE python3 -c '
GiB = 1 << 30
bufs = []
for i in range(3):
    bufs.append(b"\x01" * GiB)
    print(f"touched {i + 1} GiB", flush=True)
print("hog survived 3 GiB", flush=True)
'
EOF
# ---- submit as the gateway would: m2d -> sudo m2d-slurm submit -> sbatch as
# m2d-job.  The wrapper takes only <...>/submissions/<n>/job/job.sbatch of
# the gateway's, beside a 0600 mlflow.credentials, named <prefix>-<n>.
install -d -o "$GW_USER" -g "$GW_USER" -m 711 "$RUN/submissions"
n=0
for name in probe hog; do
  n=$((n + 1))
  install -d -o "$GW_USER" -g "$JOB_USER" -m 2750 "$RUN/submissions/$n" "$RUN/submissions/$n/job"
  install -m 640 -o "$GW_USER" -g "$JOB_USER" "$RUN/$name.sbatch" "$RUN/submissions/$n/job/job.sbatch"
  printf 'nobody\nnot-a-password\n' | install -m 600 -o "$GW_USER" -g "$GW_USER" /dev/stdin \
    "$RUN/submissions/$n/job/mlflow.credentials"
done
submit() {
  (cd / && sudo -u "$GW_USER" sudo -n /usr/local/libexec/m2d/m2d-slurm submit \
     "$RUN/submissions/$1/job/job.sbatch" "$TAG-$1")
}
T_SUB=$EPOCHREALTIME
PROBE_ID=$(submit 1) || die "sbatch (probe) failed"
HOG_ID=$(submit 2) || die "sbatch (hog) failed"
log "submitted probe job $PROBE_ID and hog job $HOG_ID as $JOB_USER (through $GW_USER's sudo rule and the wrapper)"

# ---- wait for both to end in the accounting database
declare -A STATE USER START
end=$((SECONDS + 300))
while ((SECONDS < end)); do
  done_n=0
  while IFS='|' read -r jid user state start; do
    STATE[$jid]=$state; USER[$jid]=$user; START[$jid]=$start
    case "$state" in PENDING|RUNNING|REQUEUED|RESIZING|SUSPENDED|"") ;; *) done_n=$((done_n + 1)) ;; esac
  done < <(timeout 10 sacct -X -n -P -o JobIDRaw,User,State,Start -j "$PROBE_ID,$HOG_ID" 2>/dev/null)
  [ "$done_n" = 2 ] && break
  sleep 0.5
done
[ "$done_n" = 2 ] || die "jobs did not end within 300 s: $(declare -p STATE)"
sleep 1   # let slurmstepd finish killing the job's cgroup

echo
echo "==== sealing probes (probe job $PROBE_ID, hog job $HOG_ID)"
OUT=$RUN/logs/slurm-$PROBE_ID.out
verdict "job_runs_as:$JOB_USER" "$([ "${USER[$PROBE_ID]}" = "$JOB_USER" ] && echo 1)" "sacct User=${USER[$PROBE_ID]}"
verdict "probe_job_completed" "$([ "${STATE[$PROBE_ID]%% *}" = COMPLETED ] && echo 1)" "State=${STATE[$PROBE_ID]}"
verdict "hog_out_of_memory" "$([ "${STATE[$HOG_ID]%% *}" = OUT_OF_MEMORY ] && echo 1)" \
  "State=${STATE[$HOG_ID]}; $(tr '\n' ' ' < "$RUN/logs/slurm-$HOG_ID.out" | tail -c 200)"
grep -q '^DONE' "$OUT" || fail "probe_ran_to_the_end" "see $OUT and ${OUT%.out}.err"

# the checks the job printed, host side and inside
while read -r _ name result detail; do
  if [ "$result" = PASS ]; then pass "$name" "$detail"; else fail "$name" "$detail"; fi
done < <(grep '^CHECK ' "$OUT")

nproc_in=$(awk '/^RESULT nproc/{print $3}' "$OUT")
verdict "nproc_inside_is_1" "$([ "$nproc_in" = 1 ] && echo 1)" "nproc=$nproc_in"

# nothing appeared in the dataset
new=$(find "$DATASET" -newer "$RUN/.t0" -print -quit)
verdict "dataset_unchanged" "$([ -z "$new" ] && echo 1)" "${new:-no file newer than the submission}"
verdict "export_written_by_job" "$([ "$(stat -c %U "$RUN/export/$TAG-export-ok" 2>/dev/null)" = "$JOB_USER" ] && echo 1)" \
  "$(ls -l "$RUN/export" | tail -n +2 | tr '\n' ';')"

# no process of the jobs is left: the host-side and the in-container sleeper
left=""
for p in /proc/[0-9]*; do
  cmd=$(tr '\0' ' ' 2>/dev/null < "$p/cmdline") || continue
  case "$cmd" in "sleep 1000.$PROBE_ID "*|"sleep 2000.$PROBE_ID "*) left="$left ${p#/proc/}:$cmd" ;; esac
done
verdict "no_process_outlives_job" "$([ -z "$left" ] && echo 1)" "${left:-no setsid sleeper of the job is left}"
# ... nor any other process of these two jobs, in their cgroups or out of them (its
# environment names the job). Not every process of the job account: other jobs
# and sealed runs of other tests run as it meanwhile.
left_uid=""
for pid in $(pgrep -u "$JOB_USER" || true); do
  if grep -E "/job_($PROBE_ID|$HOG_ID)(/|$)" "/proc/$pid/cgroup" >/dev/null 2>&1 \
     || tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | grep -Ex "SLURM_JOB_ID=($PROBE_ID|$HOG_ID)" >/dev/null; then
    left_uid="$left_uid $pid:$(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null);"
  fi
done
verdict "no_process_of_the_jobs_as_$JOB_USER" "$([ -z "$left_uid" ] && echo 1)" "${left_uid:-none}"

# ---- timings
t_start=$(awk '/^TIME batch_start/{print $3}' "$OUT")
t_app=$(awk '/^TIME apptainer_start/{print $3}' "$OUT")
t_py=$(awk '/^TIME python_start/{print $3}' "$OUT")
t_end=$(awk '/^TIME batch_end/{print $3}' "$OUT")
echo
echo "==== timings (probe job $PROBE_ID)"
awk -v s="$T_SUB" -v b="$t_start" -v a="$t_app" -v p="$t_py" -v e="$t_end" 'BEGIN{
  printf "  sbatch -> batch script start      %6.2f s\n", b - s
  printf "  apptainer exec -> python running  %6.2f s\n", p - a
  printf "  batch script, whole               %6.2f s\n", e - b }'
echo "  (sacct Start ${START[$PROBE_ID]}; files in $RUN)"
echo
if [ "$FAILS" = 0 ]; then echo "ALL PASS"; else echo "$FAILS FAILED"; exit 1; fi
