#!/usr/bin/env bash
# slurm.sh start|stop [TESTBED_DIR] -- a private Slurm cluster with job
# accounting (munged + MariaDB + slurmdbd + slurmctld + slurmds) on a Debian
# 12 machine without systemd.  M2D_TESTBED_NODES (lib.sh) compute nodes,
# node1..nodeN, each a slurmd in network and UTS namespaces of its own
# (nodes.sh makes the network), and the fault node node(N+1), in no partition
# but its own (lib.sh); or with M2D_TESTBED_NODES=1 this host as the one node;
# each node has M2D_TESTBED_GPUS fake GPUs; partition `debug` has node1..nodeN;
# `sacct` works.  State, configs and logs live in TESTBED_DIR/slurm.
#
# start is idempotent: daemons that are already running (by our PID files)
# are left alone.  stop stops only the daemons that start started.
#
# slurm.sh stop-daemon|start-daemon slurmctld|slurmdbd [TESTBED_DIR] -- one
# daemon alone, for the fault tests (tests/test_slurm_faults.py): jobs keep
# running on slurmd, slurmctld recovers its state at start, slurmdbd's records
# are spooled by slurmctld meanwhile.  start-daemon waits until it answers.
# slurm.sh power-off|power-on NODE [TESTBED_DIR] -- a namespaced node's power
# cut and its return (tests/test_node_failure.py).
#
# Settings (lib.sh's testbed_settings): SLURM_CLUSTER_NAME, SLURMCTLD_PORT
#   SLURMD_PORT SLURMDBD_PORT MYSQL_PORT (6817 6818 6819 3307: 3307 because a
#   system MariaDB may already own 3306), SLURM_FIRST_JOB_ID, SLURM_LINK_ETC
#   (1: symlink /etc/slurm/slurm.conf so plain sbatch/sacct work without
#   SLURM_CONF).  env: SLURM_WAIT_S (120), M2D_JOB_USER (m2d-job: gets an
#   association in testacct), M2D_USER (m2d: the gateway, coordinator of the
#   parent account), M2D_SLURM_PARENT_ACCOUNT (m2d: parent of the
#   researchers' m2d-<user> accounts), M2D_SLURM_QOS (m2d: their QOS),
#   SLURM_USAGE_RESET (MONTHLY: when fair-share usage and GPU-minute budgets
#   start again).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ACTION=${1:-}; shift || true
DAEMON=
case "$ACTION" in *-daemon|power-*) DAEMON=${1:-}; shift || true ;; esac
set_testbed_dir "${1:-}"
DIR=$TESTBED_DIR/slurm
CLUSTER=$SLURM_CLUSTER_NAME   # these from lib.sh's testbed_settings
CTLD_PORT=$SLURMCTLD_PORT
DBD_PORT=$SLURMDBD_PORT
WAIT_S=${SLURM_WAIT_S:-120}
JOB_USER=${M2D_JOB_USER:-m2d-job}   # made by accounts.sh
GW_USER=${M2D_USER:-m2d}            # made by accounts.sh
PARENT_ACCOUNT=${M2D_SLURM_PARENT_ACCOUNT:-m2d}
QOS=${M2D_SLURM_QOS:-m2d}
USAGE_RESET=${SLURM_USAGE_RESET:-MONTHLY}
HOST=$(hostname -s)
# the compute nodes: this host itself (single-node mode), or node1..nodeN,
# each a slurmd in namespaces of its own (nodes.sh), reaching slurmctld at
# this host's address on the bridge
if multi_node; then
  NODES=$(node_names | tr '\n' ' '); CTLD_ADDR=$GATEWAY_ADDR
else
  NODES=$HOST; CTLD_ADDR=127.0.0.1
fi
MUNGE_SOCK=$DIR/munge/run/munge.socket.2
MYSQL_SOCK=$DIR/mysql/mysqld.sock
export SLURM_CONF=$DIR/etc/slurm.conf

# name -> glob for the basename of /proc/PID/exe (Debian's Slurm daemons are
# slurmctld-wlm, slurmd-wlm, slurmdbd-wlm)
declare -A EXE=(
  [munged]=munged [mariadbd]=mariadbd
  [slurmdbd]='@(slurmdbd|slurmdbd-wlm)' [slurmctld]='@(slurmctld|slurmctld-wlm)'
  [slurmd]='@(slurmd|slurmd-wlm)'
)
pidfile() { echo "$DIR/pids/$1.pid"; }
exe_of() { echo "${EXE[${1%%-*}]}"; }   # slurmd-node1 is a slurmd
running() { pid_alive "$(pidfile "$1")" "$(exe_of "$1")" >/dev/null; }
# slurmd_of NODE: the daemon's name here (its pid file, log)
slurmd_of() { if multi_node; then echo "slurmd-$1"; else echo slurmd; fi; }
# daemon NAME CMD...: start one daemon in the background, logging to log/NAME.out
daemon() {
  local name=$1; shift
  need_free_port "$name"
  start_bg "$(pidfile "$name")" "$DIR/log/$name.out" "$@"
}
# need_free_port NAME: die if the port NAME is to listen on is taken
need_free_port() {
  local port
  case "$1" in
    mariadbd) port=$MYSQL_PORT ;; slurmdbd) port=$DBD_PORT ;;
    slurmctld) port=$CTLD_PORT ;; slurmd) port=$SLURMD_PORT ;; *) return 0 ;;  # (a node's slurmd: its own namespace)
  esac
  ! port_busy "$port" || die "port $port (for $1) is already in use by another process"
}
# wait_daemon SECONDS NAME CMD...: wait for CMD to succeed while NAME lives
wait_daemon() {
  local s=$1 name=$2; shift 2
  WAIT_PID=$(cat "$(pidfile "$name")") WAIT_LOG=$DIR/log/$name.out wait_until "$s" "$name" "$@"
  log "$name started (pid $(cat "$(pidfile "$name")"))"
}

# install_event_hook: deploy/libexec/m2d-slurm-event, root's, posting to the
# gateways whose curl configs are in $EVENTS_DIR (gateway.sh and the tests'
# stacks put theirs there). Named after the cluster's Slurm wrapper
# (/usr/local/libexec/m2d/m2d-slurm-event), so another cluster on this machine
# (fault-cluster.sh, second.env) has a hook of its own.
EVENT_HOOK=$M2D_SLURM_WRAPPER-event
EVENTS_DIR=$DIR/events.d
install_event_hook() {
  install -d -o root -g root -m 755 "$(dirname "$EVENT_HOOK")"
  install -d -o root -g root -m 700 "$EVENTS_DIR"
  local tmp; tmp=$(mktemp "$(dirname "$EVENT_HOOK")/.m2d-slurm-event.XXXXXX")
  sed -e "s|@EVENTS_DIR@|$EVENTS_DIR|; s|@EVENTS_LOG@|$DIR/log/events.log|" \
    "$M2D_TESTBED_SRC/../libexec/m2d-slurm-event" > "$tmp"
  chown root:root "$tmp"; chmod 755 "$tmp"; mv -f "$tmp" "$EVENT_HOOK"
}

write_configs() {
  local cpus boards spb cps tpc mem
  if [ ! -s "$DIR/etc/munge.key" ]; then
    dd if=/dev/urandom of="$DIR/etc/munge.key" bs=1024 count=1 status=none
  fi
  chown munge:munge "$DIR/etc/munge.key"; chmod 400 "$DIR/etc/munge.key"

  # describe the node exactly as slurmd sees it, else it is drained as INVAL
  read -r cpus boards spb cps tpc mem < <(slurmd -C | awk '/^NodeName/{
    for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
    print v["CPUs"], v["Boards"], v["SocketsPerBoard"], v["CoresPerSocket"], v["ThreadsPerCore"], v["RealMemory"] }')
  mem=$(( mem > 2048 ? mem - 1024 : mem ))
  # Namespaced nodes share this machine: each advertises all of its cores
  # (slurmd -C sees them all, and fewer would pin every node's jobs to the same
  # first cores) and a share of its memory, so the nodes' jobs together stay
  # within it.  Single-node mode: all of it, as before.
  local nodes_n=1 node_lines="" gres_lines="" node_partitions="" node ctld_name=$HOST per_node="" slurmd_timeout=300
  local cluster_nodes=ALL
  local gpu_files=0
  [ "$M2D_TESTBED_GPUS" -eq 1 ] || gpu_files="[0-$((M2D_TESTBED_GPUS - 1))]"   # nvidia0, or nvidia[0-N]
  if multi_node; then
    nodes_n=$M2D_TESTBED_NODES per_node=-%n slurmd_timeout=30
    mem=$((mem / nodes_n))
    for node in $NODES; do
      node_lines+="NodeName=$node NodeAddr=$(node_addr "$node") CPUs=$cpus Boards=$boards SocketsPerBoard=$spb CoresPerSocket=$cps ThreadsPerCore=$tpc RealMemory=$mem Gres=gpu:fake:$M2D_TESTBED_GPUS State=UNKNOWN"$'\n'
      gres_lines+="NodeName=$node Name=gpu Type=fake File=$DIR/dev/nvidia$gpu_files"$'\n'
      # a partition per node too, so a test can send its jobs to one node (M2D_SLURM_PARTITION)
      node_partitions+="PartitionName=$node Nodes=$node MaxTime=INFINITE State=UP"$'\n'
    done
    # the default partition: the cluster's nodes, not the fault node (its memory share
    # is counted twice: only the node failure test's one sleeping job runs there)
    cluster_nodes=$(cluster_node_names | paste -sd,)
  else
    node_lines="NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus Boards=$boards SocketsPerBoard=$spb CoresPerSocket=$cps ThreadsPerCore=$tpc RealMemory=$mem Gres=gpu:fake:$M2D_TESTBED_GPUS State=UNKNOWN"$'\n'
    gres_lines="NodeName=$HOST Name=gpu Type=fake File=$DIR/dev/nvidia$gpu_files"$'\n'
  fi

  install_event_hook
  FILE_CHANGED=0
  put_file "$DIR/etc/slurm.conf" <<EOF
# generated by deploy/testbed/slurm.sh
ClusterName=$CLUSTER
SlurmctldHost=$ctld_name($CTLD_ADDR)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCK
StateSaveLocation=$DIR/state/slurmctld
SlurmdSpoolDir=$DIR/state/slurmd$per_node
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd$per_node.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd$per_node.log
SlurmctldDebug=info
SlurmdDebug=info
# Jobs are sealed in cgroups (cgroup.conf): memory (RAM + swap) and cores
# are hard limits, and the job's whole cgroup is killed when it ends, so no
# process outlives its job (proctrack/cgroup; linuxproc loses setsid'ed
# children).  Slurm 22.05's cgroup/v1 plugin needs no systemd.
ProctrackType=proctrack/cgroup
TaskPlugin=task/cgroup,task/affinity
JobAcctGatherType=jobacct_gather/cgroup
JobAcctGatherFrequency=30
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
# memory is a consumable resource, or --mem would be a no-op: with CR_Core the
# job's memory cgroup gets the whole node (task/cgroup: "alloc=0MB").  A job
# without --mem gets DefMemPerCPU per CPU (the node's memory / its CPUs).
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$((mem / cpus))
# sacct needs slurmdbd (accounting_storage/filetxt is gone since 20.11)
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# for slurmdbd connections the munge socket comes from AccountingStoragePass,
# not from AuthInfo (Slurm 22.05)
AccountingStoragePass=$MUNGE_SOCK
AccountingStorageTRES=gres/gpu
# Fair share and quotas in Slurm's own terms (docs/admin.md): a job needs an
# association (the gateway makes m2d-<user> under $PARENT_ACCOUNT), and the
# associations' and QOS' limits hold.  The associations exist before this
# is read: start() makes them before it restarts slurmctld.
AccountingStorageEnforce=associations,limits,qos
# Who waits is decided by fair share: an account that used more waits
# behind one that used less; age only breaks ties.  Usage (and with it the
# GPU-minute budgets, GrpTRESMins) is not decayed but starts again each
# $USAGE_RESET, so a budget is "per period".  Recomputed every minute, so
# sshare is at most a minute behind.
PriorityType=priority/multifactor
PriorityWeightFairshare=10000
PriorityWeightAge=100
PriorityMaxAge=1-0
PriorityDecayHalfLife=0
PriorityUsageResetPeriod=$USAGE_RESET
PriorityCalcPeriod=1
# The gateway hears at once when a job starts and ends (jobs/events.py); the
# hook always exits 0 at once, so it never delays or fails a job. Ends come
# from jobcomp/script, not EpilogSlurmctld: the next job would wait for a
# periodic scheduling pass. A restart of slurmctld reads these (start() does it
# when this file changes): 22.05 shows them after 'scontrol reconfigure' but
# does not run them.
PrologSlurmctld=$EVENT_HOOK
JobCompType=jobcomp/script
JobCompLoc=$EVENT_HOOK
GresTypes=gpu
MinJobAge=300
FirstJobId=$SLURM_FIRST_JOB_ID
# Room for a cluster-sized queue (bench/scale.py holds 20,000 jobs): the
# default 10,000 counts pending, running and recently ended (MinJobAge) jobs
# together, and sbatch is refused past it.  Only a slurmctld restart reads
# it (start() restarts it when this file changes); MaxDBDMsgs, the records
# slurmctld spools while slurmdbd is away, follows it (2 x MaxJobCount).
MaxJobCount=50000
KillWait=5
InactiveLimit=0
SlurmctldTimeout=120
# a node that stops answering is DOWN after this long, and its jobs end
# NODE_FAIL (tests/test_node_failure.py stops one): short on the namespaced nodes
SlurmdTimeout=$slurmd_timeout
# a job on a node that fails is not started again: the gateway reports
# NODE_FAIL (the job's export image was on that node's /tmp)
JobRequeue=0
Waittime=0
# start queued batch jobs as soon as resources free up (default delay 3 s)
SchedulerParameters=batch_sched_delay=0
${node_lines}PartitionName=debug Nodes=$cluster_nodes Default=YES MaxTime=INFINITE State=UP
${node_partitions%$'\n'}
EOF

  # The fake GPUs.  Slurm 22.05 drops a GPU without File= ("Removing file-less
  # GPU") and the node goes INVAL, so File= names symlinks to /dev/null whose
  # names end in the device index; a job then gets CUDA_VISIBLE_DEVICES=0 (or 1...).
  mkdir -p "$DIR/dev"
  local i
  for ((i = 0; i < M2D_TESTBED_GPUS; i++)); do
    [ "$(readlink "$DIR/dev/nvidia$i")" = /dev/null ] || ln -sfn /dev/null "$DIR/dev/nvidia$i"
  done
  put_file "$DIR/etc/gres.conf" <<EOF
AutoDetect=off
${gres_lines%$'\n'}
EOF

  # Read by slurmd and every slurmstepd (next to slurm.conf).  This VM mounts
  # cgroup v1 (memory, cpuset, devices, freezer... under /sys/fs/cgroup).
  # ConstrainDevices stays off: the fake GPU is /dev/null, which the devices
  # controller would then take away from every job that asks for no GPU.
  put_file "$DIR/etc/cgroup.conf" <<EOF
# generated by deploy/testbed/slurm.sh
CgroupPlugin=cgroup/v1
CgroupMountpoint=/sys/fs/cgroup
CgroupAutomount=no
ConstrainRAMSpace=yes
ConstrainSwapSpace=yes
AllowedSwapSpace=0
ConstrainCores=yes
ConstrainDevices=no
EOF

  put_file "$DIR/etc/slurmdbd.conf" 600 <<EOF
# generated by deploy/testbed/slurm.sh
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=$HOST
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MYSQL_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
  # put_file rewrites a config only when it changed, so a re-run touches nothing
  CONF_CHANGED=$FILE_CHANGED

  if [ "$SLURM_LINK_ETC" = 1 ]; then
    mkdir -p /etc/slurm
    if [ -L /etc/slurm/slurm.conf ] || [ ! -e /etc/slurm/slurm.conf ]; then
      [ "$(readlink /etc/slurm/slurm.conf)" = "$SLURM_CONF" ] \
        || ln -sfn "$SLURM_CONF" /etc/slurm/slurm.conf
    else
      log "WARNING: /etc/slurm/slurm.conf is a real file; not replacing it (use SLURM_CONF)"
    fi
  fi
}

start() {
  require_root
  apt_install munge mariadb-server slurmctld slurmd slurm-client slurmdbd slurm-wlm-mysql-plugin

  mkdir -p "$DIR"/{etc,log,run,pids,state/slurmctld,state/slurmd,munge/run,munge/lib,munge/log,mysql}
  local node
  for node in $NODES; do mkdir -p "$DIR/state/slurmd-$node"; done
  ! multi_node || "$M2D_TESTBED_SRC/nodes.sh" start "$TESTBED_DIR"
  chmod 755 "$DIR" "$DIR"/{etc,log,run,pids,state,munge,mysql}
  chown -R munge:munge "$DIR/munge"
  chmod 700 "$DIR/munge/lib" "$DIR/munge/log"; chmod 755 "$DIR/munge/run"
  chown mysql:mysql "$DIR/mysql"
  DB_PASS=$(secret_file "$TESTBED_DIR/secrets/slurmdb-password")
  write_configs

  # ---- munged: private socket, so the system's munge (if any) is untouched
  if running munged; then
    log "munged already running (pid $(cat "$(pidfile munged)"))"
  else
    rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock"
    daemon munged setpriv --reuid=munge --regid=munge --init-groups \
      munged -F --key-file="$DIR/etc/munge.key" --socket="$MUNGE_SOCK" \
        --pid-file="$DIR/munge/run/munged.pid" --log-file="$DIR/munge/log/munged.log" \
        --seed-file="$DIR/munge/lib/munged.seed"
    wait_daemon 15 munged sh -c "munge -n -S '$MUNGE_SOCK' | unmunge -S '$MUNGE_SOCK'"
  fi

  # ---- MariaDB for slurmdbd: own datadir and port, --no-defaults so the
  # system's my.cnf (and a system server on 3306) play no part
  if running mariadbd; then
    log "mariadbd already running (pid $(cat "$(pidfile mariadbd)"))"
  else
    if [ ! -d "$DIR/mysql/data/mysql" ]; then
      log "initialising MariaDB datadir"
      mariadb-install-db --no-defaults --user=mysql --datadir="$DIR/mysql/data" \
        --skip-test-db >"$DIR/log/mariadb-install-db.log" 2>&1
    fi
    rm -f "$MYSQL_SOCK"
    daemon mariadbd mariadbd --no-defaults --user=mysql --datadir="$DIR/mysql/data" \
      --socket="$MYSQL_SOCK" --port="$MYSQL_PORT" --bind-address=127.0.0.1 \
      --pid-file="$DIR/mysql/mariadbd.pid" --log-error="$DIR/log/mariadbd.log" \
      --skip-name-resolve --innodb-buffer-pool-size=256M \
      --innodb-log-file-size=64M --innodb-lock-wait-timeout=900
    wait_daemon 60 mariadbd mariadb --no-defaults -S "$MYSQL_SOCK" -u root -e 'SELECT 1'
  fi
  timeout 30 mariadb --no-defaults -S "$MYSQL_SOCK" -u root <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
EOF

  # ---- slurmdbd (`env` execs, so the recorded pid is slurmdbd's own).
  # Every failed sacctmgr try costs ~2 s, hence the bounded waits.
  if running slurmdbd; then
    log "slurmdbd already running (pid $(cat "$(pidfile slurmdbd)"))"
  else
    daemon slurmdbd env SLURMDBD_CONF="$DIR/etc/slurmdbd.conf" slurmdbd -D
    wait_daemon 60 slurmdbd sacctmgr -n -P show cluster format=cluster
  fi

  # accounting objects: the cluster must exist before slurmctld registers
  timeout 30 sacctmgr -n -P show cluster format=cluster | grep -x "$CLUSTER" >/dev/null \
    || timeout 30 sacctmgr -i add cluster "$CLUSTER" >/dev/null
  timeout 30 sacctmgr -n -P show account format=account | grep -x testacct >/dev/null \
    || timeout 30 sacctmgr -i add account testacct Cluster="$CLUSTER" \
         Description=testbed Organization=testbed >/dev/null
  timeout 30 sacctmgr -n -P show assoc where cluster="$CLUSTER" user=root account=testacct \
      format=user | grep -x root >/dev/null \
    || timeout 30 sacctmgr -i add user root Account=testacct Cluster="$CLUSTER" \
         DefaultAccount=testacct >/dev/null

  # the job account (deploy/testbed/accounts.sh) submits under testacct
  # when no --account is given (AccountingStorageEnforce needs one).
  if id "$JOB_USER" >/dev/null 2>&1; then
    timeout 30 sacctmgr -n -P show assoc where cluster="$CLUSTER" user="$JOB_USER" \
        account=testacct format=user | grep -x "$JOB_USER" >/dev/null \
      || timeout 30 sacctmgr -i add user "$JOB_USER" Account=testacct \
           Cluster="$CLUSTER" DefaultAccount=testacct >/dev/null
  fi

  # the researchers' accounts' parent and QOS.  The gateway's account
  # coordinates the parent: it may add and limit the accounts under it
  # (m2d-<user>) and nothing else.
  timeout 30 sacctmgr -n -P show qos format=name | grep -x "$QOS" >/dev/null \
    || timeout 30 sacctmgr -i add qos "$QOS" Description="gateway researchers" >/dev/null
  timeout 30 sacctmgr -n -P show account format=account | grep -x "$PARENT_ACCOUNT" >/dev/null \
    || timeout 30 sacctmgr -i add account "$PARENT_ACCOUNT" Cluster="$CLUSTER" \
         Description="gateway researchers" Organization=m2d QOS="normal,$QOS" DefaultQOS="$QOS" >/dev/null
  if id "$GW_USER" >/dev/null 2>&1; then
    timeout 30 sacctmgr -n -P show assoc where cluster="$CLUSTER" user="$GW_USER" \
        account="$PARENT_ACCOUNT" format=user | grep -x "$GW_USER" >/dev/null \
      || timeout 30 sacctmgr -i add user "$GW_USER" Account="$PARENT_ACCOUNT" \
           Cluster="$CLUSTER" DefaultAccount="$PARENT_ACCOUNT" >/dev/null
    timeout 30 sacctmgr -n -P show user "$GW_USER" withcoord format=coordinators \
        | tr ',' '\n' | grep -x "$PARENT_ACCOUNT" >/dev/null \
      || timeout 30 sacctmgr -i add coordinator account="$PARENT_ACCOUNT" names="$GW_USER" >/dev/null
  fi

  # ---- a configuration the running daemons did not start with: restart
  # slurmctld and slurmd (plugin and GRES changes are not picked up by
  # `scontrol reconfigure`).  Running jobs survive; their slurmstepds keep
  # the old settings until they end.  Takes a few seconds.
  local want have
  want=$(conf_sha); have=$(cat "$DIR/run/conf.sha" 2>/dev/null || true)
  if [ "$want" != "$have" ] && { running slurmctld || any_slurmd_running; }; then
    log "configuration differs from the one slurmctld/slurmd started with: restarting them"
    stop_slurmds
    stop_pid slurmctld "$(pidfile slurmctld)" "${EXE[slurmctld]}" '*' 15
  fi

  # ---- slurmctld.  Never start a second one: a new slurmctld SIGTERMs the
  # one named in SlurmctldPidFile.
  if running slurmctld; then
    log "slurmctld already running (pid $(cat "$(pidfile slurmctld)"))"
  else
    daemon slurmctld slurmctld -D -f "$SLURM_CONF"
    wait_daemon 60 slurmctld scontrol ping
  fi

  for node in $NODES; do start_slurmd "$node"; done
  for node in $NODES; do wait_node_ready "$node"; done
  echo "$want" > "$DIR/run/conf.sha"
  log "cluster $CLUSTER ready (SLURM_CONF=$SLURM_CONF)"
}

# the configuration files slurmctld and slurmd read at start
conf_sha() { cat "$DIR"/etc/{slurm,cgroup,gres}.conf | sha256sum | cut -c1-64; }

# start_slurmd NODE: its slurmd, on a namespaced node in that node's network
# namespace and a UTS namespace of its own whose hostname is the node's name
# (Slurm's tools on the node, e.g. `scontrol pidinfo`, find their slurmd by
# hostname).  nsenter, not `ip netns exec`, which also mounts a /sys of its
# own and so hides the cgroup mounts (slurmd: "cgroup namespace 'freezer' not
# mounted").  nsenter, unshare and sh each exec the next: the pid is slurmd's.
start_slurmd() {
  local node=$1 name; name=$(slurmd_of "$1")
  if running "$name"; then
    log "$name already running (pid $(cat "$(pidfile "$name")"))"
  elif multi_node; then
    start_bg "$(pidfile "$name")" "$DIR/log/$name.out" nsenter --net="/run/netns/$(node_netns "$node")" \
      unshare --uts sh -c 'hostname "$1" && exec slurmd -D -N "$1" -f "$2"' sh "$node" "$SLURM_CONF"
    # until nsenter, unshare and sh have exec'ed into slurmd, /proc/PID/exe is theirs
    local pid i; pid=$(cat "$(pidfile "$name")")
    for ((i = 0; i < 100; i++)); do running "$name" && break; alive "$pid" || break; sleep 0.05; done
    log "$name started in $(node_netns "$node") (pid $pid)"
  else
    daemon slurmd slurmd -D -N "$node" -f "$SLURM_CONF"
    log "slurmd started (pid $(cat "$(pidfile slurmd)"))"
  fi
}
any_slurmd_running() { local node; for node in $NODES; do running "$(slurmd_of "$node")" && return 0; done; return 1; }
# every slurmd this folder started, of either mode (a mode change stops the old ones)
stop_slurmds() {
  local f name
  for f in "$DIR"/pids/slurmd.pid "$DIR"/pids/slurmd-*.pid; do
    [ -e "$f" ] || continue
    name=$(basename "$f" .pid); stop_pid "$name" "$f" "${EXE[slurmd]}" '*' 15
  done
}

node_state() { timeout 10 sinfo -h -n "$1" -o %T 2>/dev/null | head -1; }

# wait_node_ready NODE
wait_node_ready() {
  local NODE=$1 end=$((SECONDS + WAIT_S)) st name; name=$(slurmd_of "$1")
  while ((SECONDS < end)); do
    running "$name" || { tail -n 20 "$DIR/log/$name.out" >&2; die "$name exited; see $DIR/log/"; }
    running slurmctld || { tail -n 20 "$DIR/log/slurmctld.out" >&2; die "slurmctld exited; see $DIR/log/"; }
    st=$(node_state "$NODE")
    case "$st" in
      idle|mixed|allocated) return 0 ;;
      drain*|down*)  # left over from an earlier run: put it back in service
        timeout 10 scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.2
  done
  timeout 10 sinfo -R >&2 || true
  die "node $NODE not ready after ${WAIT_S}s (state '$(node_state "$NODE")'); see $DIR/log/"
}

stop() {
  [ -d "$DIR/pids" ] || { log "nothing to stop ($DIR/pids missing)"; return 0; }
  # cancel the remaining jobs first, so no slurmstepd outlives slurmd
  if running slurmctld; then
    local ids
    ids=$(timeout 10 squeue -h -t PD,R,CG,S -o %i 2>/dev/null | tr '\n' ' ') || true
    if [ -n "${ids// }" ]; then
      log "cancelling jobs: $ids"
      # shellcheck disable=SC2086
      timeout 10 scancel $ids || true
      local end=$((SECONDS + 15))
      while ((SECONDS < end)) && [ -n "$(timeout 10 squeue -h -t R,CG -o %i 2>/dev/null)" ]; do
        sleep 0.2
      done
    fi
  fi
  stop_slurmds
  local name grace
  for name in slurmctld slurmdbd mariadbd munged; do
    grace=15; [ $name = mariadbd ] && grace=60
    stop_pid "$name" "$(pidfile "$name")" "${EXE[$name]}" '*' "$grace"
  done
  # the /etc/slurm/slurm.conf link, if it is ours
  if [ -L /etc/slurm/slurm.conf ] && [ "$(readlink /etc/slurm/slurm.conf)" = "$SLURM_CONF" ]; then
    rm -f /etc/slurm/slurm.conf
  fi
}

# one daemon alone (the fault tests): slurmctld or slurmdbd
one_daemon() {
  require_root
  case "$DAEMON" in slurmctld|slurmdbd) ;; *) die "stop-daemon/start-daemon take slurmctld or slurmdbd, not '$DAEMON'" ;; esac
  if [ "$ACTION" = stop-daemon ]; then
    stop_pid "$DAEMON" "$(pidfile "$DAEMON")" "${EXE[$DAEMON]}" '*' 15
    return 0
  fi
  if running "$DAEMON"; then
    log "$DAEMON already running (pid $(cat "$(pidfile "$DAEMON")"))"
  elif [ "$DAEMON" = slurmctld ]; then
    daemon slurmctld slurmctld -D -f "$SLURM_CONF"
    wait_daemon 60 slurmctld scontrol ping
  else
    daemon slurmdbd env SLURMDBD_CONF="$DIR/etc/slurmdbd.conf" slurmdbd -D
    wait_daemon 60 slurmdbd sacctmgr -n -P show cluster format=cluster
  fi
}

# A namespaced node's power cut (tests/test_node_failure.py): SIGKILL to its
# slurmd, to everything in its network namespace, and to everything in the
# cgroups of the jobs it runs (the containers have network namespaces of
# their own, their cgroup is the job's); slurmctld finds out the way it would
# on a site, when the node stops answering (SlurmdTimeout), and its jobs end
# NODE_FAIL.  power-on starts its slurmd again and waits for the node.
power() {
  require_root
  multi_node || die "power-off/power-on need the namespaced nodes (M2D_TESTBED_NODES >= 2)"
  [[ " $NODES " == *" $DAEMON "* ]] || die "no node '$DAEMON' (nodes: $NODES)"
  local node=$DAEMON ns pids job
  ns=$(node_netns "$node")
  if [ "$ACTION" = power-on ]; then
    start_slurmd "$node"
    wait_node_ready "$node"
    return 0
  fi
  pids=$(ip netns pids "$ns")
  for job in $(timeout 10 squeue -h -w "$node" -o %A 2>/dev/null); do
    pids+=" $(cat /sys/fs/cgroup/freezer/slurm_"$node"/uid_*/job_"$job"/{,*/,*/*/}cgroup.procs 2>/dev/null | tr '\n' ' ' || true)"
  done
  # shellcheck disable=SC2086
  [ -z "${pids// }" ] || kill -KILL $pids 2>/dev/null || true
  rm -f "$(pidfile "$(slurmd_of "$node")")"
  log "$node powered off (killed: ${pids:-nothing})"
}

case "$ACTION" in
  start) start ;;
  stop) stop ;;
  stop-daemon|start-daemon) one_daemon ;;
  power-off|power-on) power ;;
  *) echo "usage: $0 start|stop [TESTBED_DIR] | stop-daemon|start-daemon slurmctld|slurmdbd [TESTBED_DIR]" \
       "| power-off|power-on NODE [TESTBED_DIR]" >&2; exit 2 ;;
esac
