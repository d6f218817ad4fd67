#!/usr/bin/env bash
# nodes.sh start|stop [TESTBED_DIR] -- the compute nodes' network: a private
# bridge (M2D_TESTBED_BRIDGE, this host at SUBNET.1) and, per node, a network
# namespace (BRIDGE-nodeI) with one veth on the bridge at SUBNET.(10+I) and
# its own loopback, no default route: traffic stays on this machine.
# slurm.sh starts each node's slurmd in its namespace (and a UTS namespace of
# its own, hostname = node name).  Nothing here when M2D_TESTBED_NODES=1.
#
# What a node may reach on this host is what a real site's compute node may
# reach on the gateway/controller host: slurmctld and MLflow's port (and the
# fault tests' MLflow proxies, M2D_MLFLOW_PROXY_PORTS).  Redis, the
# databases (PostgreSQL, slurmdbd's MariaDB), slurmdbd, the gateway's web port
# and SMTP are not: they listen on 127.0.0.1, which in a node's namespace is
# the node's own loopback, and an nftables table of this testbed's rejects
# everything else that comes in from the bridge (a second layer, for what
# listens on all addresses).  The filesystem is shared, as a site's shared
# filesystem is (the nodes are namespaces of this machine).
#
# start is idempotent (what exists is kept, the firewall is rewritten whole);
# stop removes the namespaces, the bridge and the table.  Run slurm.sh stop
# first: a namespace with processes in it is not removed.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ACTION=${1:-}; shift || true
set_testbed_dir "${1:-}"
BR=$M2D_TESTBED_BRIDGE
TABLE=m2d_${BR//-/_}

veth_host() { echo "$BR-${1#node}"; }   # the host's end of node I's veth (<= 15 characters)

firewall() {
  # ports a node may open on this host; everything else from the bridge is refused
  # (reject, not drop: a test or a job learns at once, without a timeout)
  local ports="$SLURMCTLD_PORT, $M2D_MLFLOW_PORT, $M2D_MLFLOW_PROXY_PORTS"
  nft -f - <<EOF
table inet $TABLE
delete table inet $TABLE
table inet $TABLE {
  chain input {
    type filter hook input priority 0; policy accept;
    iifname "$BR" ct state established,related accept
    iifname "$BR" tcp dport { $ports } accept
    iifname "$BR" meta l4proto tcp reject with tcp reset
    iifname "$BR" reject
  }
  chain forward {
    type filter hook forward priority 0; policy accept;
    iifname "$BR" oifname != "$BR" drop
    oifname "$BR" iifname != "$BR" drop
  }
}
EOF
}

# A node resolves its own name and the others' as a site's DNS would: sudo on
# a node (the job's credential hand-over) looks its host name up, and without
# an answer it warns on stderr and waits for the resolver on every call.
HOSTS_MARK="# m2d-testbed node"
hosts_file() {
  local node kept
  kept=$(grep -v -- "$HOSTS_MARK" /etc/hosts || true)
  {
    printf '%s\n' "$kept"
    for node in $(node_names); do printf '%s\t%s\t%s\n' "$(node_addr "$node")" "$node" "$HOSTS_MARK"; done
  } > /etc/hosts.m2d-testbed
  cat /etc/hosts.m2d-testbed > /etc/hosts  # in place: /etc/hosts may be a bind mount
  rm -f /etc/hosts.m2d-testbed
}

start() {
  require_root
  multi_node || { log "single-node mode (M2D_TESTBED_NODES=1): no node network"; return 0; }
  apt_install iproute2 nftables
  [ ${#BR} -le 13 ] || die "M2D_TESTBED_BRIDGE '$BR' is too long (13 characters at most: its veths are BR-I)"
  if ! ip link show "$BR" >/dev/null 2>&1; then
    ip link add "$BR" type bridge
    log "bridge $BR"
  fi
  ip addr replace "$GATEWAY_ADDR/24" dev "$BR"
  ip link set "$BR" up
  local node ns host addr
  for node in $(node_names); do
    ns=$(node_netns "$node"); host=$(veth_host "$node"); addr=$(node_addr "$node")
    [ -e "/run/netns/$ns" ] || ip netns add "$ns"
    if ! ip link show "$host" >/dev/null 2>&1; then
      ip link add "$host" type veth peer name eth0 netns "$ns"
    fi
    ip link set "$host" master "$BR" up
    ip -n "$ns" link set lo up
    ip -n "$ns" addr replace "$addr/24" dev eth0
    ip -n "$ns" link set eth0 up
    log "$node: namespace $ns, $addr"
  done
  hosts_file
  firewall
  log "nodes reach $GATEWAY_ADDR on ports $SLURMCTLD_PORT (slurmctld), $M2D_MLFLOW_PORT (MLflow), $M2D_MLFLOW_PROXY_PORTS (test proxies) only"
}

stop() {
  require_root
  local node ns
  for node in $(node_names); do
    ns=$(node_netns "$node")
    [ -e "/run/netns/$ns" ] || continue
    if [ -n "$(ip netns pids "$ns")" ]; then
      log "WARNING: $ns still has processes ($(ip netns pids "$ns" | tr '\n' ' ')); kept"
      continue
    fi
    ip netns del "$ns"   # its veth goes with it
  done
  ! ip link show "$BR" >/dev/null 2>&1 || ip link del "$BR"
  if grep -q -- "$HOSTS_MARK" /etc/hosts; then
    grep -v -- "$HOSTS_MARK" /etc/hosts > /etc/hosts.m2d-testbed || true
    cat /etc/hosts.m2d-testbed > /etc/hosts && rm -f /etc/hosts.m2d-testbed
  fi
  ! nft list table inet "$TABLE" >/dev/null 2>&1 || nft delete table inet "$TABLE"
}

case "$ACTION" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop [TESTBED_DIR]" >&2; exit 2 ;;
esac
