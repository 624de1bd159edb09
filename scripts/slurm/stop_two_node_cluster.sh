#!/usr/bin/env bash
# Stop the two-node cluster of scripts/slurm/start_two_node_cluster.sh and remove its hosts: the slurmds and
# the controller by the PIDs in $TWO_DIR/run, then whatever still runs inside the two namespaces (job steps
# left behind by a killed slurmd: only processes in those namespaces, which only this cluster starts), the
# namespaces, veths and bridge, and the /etc/hosts block. Safe to run twice, or when nothing runs.
# stop_local_cluster.sh runs it first; on its own:  bash scripts/slurm/stop_two_node_cluster.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
SLURM_DIR=$(realpath -m "${SLURM_DIR:-.cache/slurm}")
TWO_DIR="$SLURM_DIR/two_node"
export SLURM_CONF="$TWO_DIR/etc/slurm.conf" PATH="$PATH:/usr/sbin"
source scripts/slurm/two_node_common.sh

stop() {  # stop NAME: SIGTERM the PID in run/NAME.pid, SIGKILL it after 10 s, forget the file
    local file="$TWO_DIR/run/$1.pid" pid
    [ -f "$file" ] || return 0
    pid=$(cat "$file")
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
        echo "[slurm-2node] stopped $1 (pid $pid)"
    fi
    rm -f "$file"
}

if [ -f "$TWO_DIR/run/slurmctld.pid" ] && command -v scancel >/dev/null; then
    timeout 10 scancel --user="$(id -un)" 2>/dev/null  # the jobs still queued or running on this cluster
fi
for daemon in slurmd-node1 slurmd-node2 slurmctld; do
    stop "$daemon"
done
for node in node1 node2; do
    ns=$(netns "$node")
    if has_netns "$ns"; then
        for pid in $(ip netns pids "$ns" 2>/dev/null); do
            kill -KILL "$pid" 2>/dev/null && echo "[slurm-2node] killed pid $pid left in $ns"
        done
        ip netns delete "$ns" && echo "[slurm-2node] removed host $node (namespace $ns)"
    fi
    ip link delete "$(veth "$node")" 2>/dev/null
done
ip link delete "$BRIDGE" 2>/dev/null && echo "[slurm-2node] removed bridge $BRIDGE"
remove_hosts_block
rm -f "$TWO_DIR/env.sh"  # env.sh of the one-node cluster sources it while it exists
exit 0
