#!/usr/bin/env bash
# A real two-host SLURM cluster on this one machine, for the multi-node tests (tests/test_slurm_multinode.py):
# two network namespaces are the hosts node1 and node2, each with its own address on a bridge, its own host
# name (a UTS namespace) and its own slurmd; a second slurmctld in this (the root) namespace listens on the
# bridge. Usually started through the one-node script, which it needs (munge, and slurmdbd for accounting):
#
#   bash scripts/slurm/start_local_cluster.sh --nodes 2   # the one-node cluster, then this one; waits until idle
#   source .cache/slurm/env.sh                            # SLURM_CONF (one node) and PREFOPT_SLURM_2NODE_CONF
#   SLURM_CONF=$PREFOPT_SLURM_2NODE_CONF sinfo            # partition "two": node[1-2]
#   bash scripts/slurm/on_node.sh node2 hostname          # a command "on" a host: prints node2
#   bash scripts/slurm/stop_local_cluster.sh              # stops both clusters, removes namespaces, bridge, /etc/hosts lines
#
# Why a second controller rather than two more nodes in the one-node cluster: that controller listens on
# 127.0.0.1, which no namespace can reach (every namespace has its own loopback); this one is at the bridge
# address, and the one-node cluster stays exactly as it was. Both clusters share one slurmdbd (two cluster
# names in one accounting database, as sites do).
#
# Network: bridge prefopt-br0 with $SUBNET.1 (this namespace), veth pairs prefopt-n1/-n2 whose other ends are
# eth0 inside the namespaces prefopt-node1/-node2 ($SUBNET.11/.12). Those addresses exist only here: the
# namespaces have no default route, nothing is forwarded, no traffic leaves the machine. /etc/hosts gets one
# marked block (node1, node2) so the names resolve in every namespace; the stop script removes it.
# Every daemon writes its PID file under $TWO_DIR/run, which the stop script kills. Starting it again is a no-op.
set -euo pipefail
cd "$(dirname "$0")/../.."
SLURM_DIR=$(realpath -m "${SLURM_DIR:-.cache/slurm}")
TWO_DIR="$SLURM_DIR/two_node"
SUBNET=${PREFOPT_2NODE_SUBNET:-10.213.77}  # a /24 that exists only on the bridge and inside the namespaces
CTLD_PORT=${PREFOPT_2NODE_CTLD_PORT:-6827}  # the one-node controller has 6817
NODES=(node1 node2)
export PATH="$PATH:/usr/sbin" SLURM_CONF="$TWO_DIR/etc/slurm.conf"
mkdir -p "$TWO_DIR"/{etc,state,spool,log,run}
source scripts/slurm/two_node_common.sh

log() { echo "[slurm-2node] $*"; }
alive() { [ -f "$TWO_DIR/run/$1.pid" ] && kill -0 "$(cat "$TWO_DIR/run/$1.pid")" 2>/dev/null; }
wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: poll until COMMAND succeeds, or fail naming the logs
    local seconds=$1 what=$2; shift 2
    for _ in $(seq $((seconds * 4))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.25; done
    echo "[slurm-2node] $what did not come up within ${seconds}s; logs: $TWO_DIR/log" >&2
    tail -n 20 "$TWO_DIR"/log/*.log >&2 || true
    return 1
}
both_idle() { [ "$(sinfo -h -N -p two -o '%N %T')" = $'node1 idle\nnode2 idle' ]; }
# (no `cmd | grep -q` below: under pipefail, grep leaving early can fail the pipeline through SIGPIPE)
has_address() { [[ "$(ip -4 addr show dev "$1")" == *"inet $2/"* ]]; }  # has_address DEVICE ADDRESS

if alive slurmctld && alive slurmd-node1 && alive slurmd-node2 && both_idle 2>/dev/null; then
    log "already running (PREFOPT_SLURM_2NODE_CONF=$SLURM_CONF)"
    exit 0
fi
accounting() { SLURM_CONF="$SLURM_DIR/etc/slurm.conf" timeout 30 sacctmgr "$@"; }  # through the one-node cluster's config
command -v slurmctld >/dev/null && accounting -n list cluster >/dev/null 2>&1 || {
    echo "[slurm-2node] the one-node cluster (munge, slurmdbd) must be up: bash scripts/slurm/start_local_cluster.sh --nodes 2" >&2
    exit 1
}

# --- the hosts: namespaces, bridge, veths, addresses, names (each step only when it is missing)
if ! has_netns "$(netns node1)"; then
    if ! ip netns add "$(netns node1)" 2>"$TWO_DIR/log/netns.err"; then
        echo "[slurm-2node] cannot create a network namespace here ($(cat "$TWO_DIR/log/netns.err")): the two-node cluster" \
             "needs root with CAP_SYS_ADMIN and CAP_NET_ADMIN (ip netns, veth, bridge). The one-node cluster does not." >&2
        exit 3
    fi
fi
ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
has_address "$BRIDGE" "$SUBNET.1" || ip addr add "$SUBNET.1/24" dev "$BRIDGE"
ip link set "$BRIDGE" up
for index in 1 2; do
    node=node$index ns=$(netns node$index) veth=$(veth node$index)
    has_netns "$ns" || ip netns add "$ns"
    if ! ip netns exec "$ns" ip link show eth0 >/dev/null 2>&1; then
        ip link delete "$veth" 2>/dev/null || true  # a half-removed pair from an earlier stop
        ip link add "$veth" type veth peer name eth0 netns "$ns"
    fi
    ip link set "$veth" master "$BRIDGE"
    ip link set "$veth" up
    ip netns exec "$ns" ip link set lo up
    [[ "$(ip netns exec "$ns" ip -4 addr show dev eth0)" == *"inet $SUBNET.1$index/"* ]] || ip netns exec "$ns" ip addr add "$SUBNET.1$index/24" dev eth0
    ip netns exec "$ns" ip link set eth0 up
done
write_hosts_block "$SUBNET"

# --- configuration: node1 and node2, all of this machine's cores each (they share them), one partition
cpus=$(nproc)
memory_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 4 / 10 ))
cat >"$SLURM_CONF" <<EOF
# written by scripts/slurm/start_two_node_cluster.sh
ClusterName=prefopt2node
SlurmctldHost=$(hostname -s)($SUBNET.1)
SlurmctldPort=$CTLD_PORT
# job ids start far from the one-node cluster's, so logs and ports never mix them up
FirstJobId=50000
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=2,bf_interval=2
StateSaveLocation=$TWO_DIR/state
SlurmdSpoolDir=$TWO_DIR/spool/%n
SlurmctldPidFile=$TWO_DIR/run/slurmctld.pid
SlurmdPidFile=$TWO_DIR/run/slurmd-%n.pid
SlurmctldLogFile=$TWO_DIR/log/slurmctld.log
SlurmdLogFile=$TWO_DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillOnBadExit=1
KillWait=2
MinJobAge=600
InactiveLimit=0
# a host whose slurmd stops answering is DOWN (and its jobs NODE_FAIL) after this many seconds
SlurmdTimeout=15
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
JobAcctGatherType=jobacct_gather/none
NodeName=node1 NodeAddr=$SUBNET.11 CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
NodeName=node2 NodeAddr=$SUBNET.12 CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=two Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP
EOF

# --- the controller (root namespace, on the bridge), then one slurmd per host inside its namespace
[[ $'\n'"$(accounting -n -P list cluster format=cluster)"$'\n' == *$'\nprefopt2node\n'* ]] || accounting -i add cluster prefopt2node >/dev/null
alive slurmctld || /usr/sbin/slurmctld
wait_for 30 slurmctld scontrol ping
for node in "${NODES[@]}"; do
    mkdir -p "$TWO_DIR/spool/$node"
    alive "slurmd-$node" || bash scripts/slurm/on_node.sh "$node" /usr/sbin/slurmd
done
wait_for 60 "node1 and node2" both_idle

{ echo "export PREFOPT_SLURM_2NODE_CONF=$SLURM_CONF"; } >"$TWO_DIR/env.sh"
log "up: node1 ($SUBNET.11), node2 ($SUBNET.12), partition two (PREFOPT_SLURM_2NODE_CONF=$SLURM_CONF)"
sinfo -N
