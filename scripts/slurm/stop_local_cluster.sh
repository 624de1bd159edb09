#!/usr/bin/env bash
# Stop the local cluster that scripts/slurm/start_local_cluster.sh started: each daemon by the PID in its
# PID file under $SLURM_DIR/run (nothing else is touched), jobs first, then slurmd, slurmctld, slurmdbd,
# mariadbd and munged (only if that script started it). Safe to run twice, or when nothing runs.
# The two-node cluster (start_local_cluster.sh --nodes 2) goes first: it uses this cluster's slurmdbd and munge.
#   bash scripts/slurm/stop_local_cluster.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
bash scripts/slurm/stop_two_node_cluster.sh
SLURM_DIR=$(realpath -m "${SLURM_DIR:-.cache/slurm}")
export SLURM_CONF="$SLURM_DIR/etc/slurm.conf" PATH="$PATH:/usr/sbin"

stop() {  # stop NAME: SIGTERM the PID in run/NAME.pid, SIGKILL it after 10 s, forget the file
    local file="$SLURM_DIR/run/$1.pid" pid
    [ -f "$file" ] || return 0
    pid=$(cat "$file")
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
        echo "[slurm-local] stopped $1 (pid $pid)"
    fi
    rm -f "$file"
}

if [ -f "$SLURM_DIR/run/slurmctld.pid" ] && command -v scancel >/dev/null; then
    timeout 10 scancel --user="$(id -un)" 2>/dev/null  # the jobs still queued or running on this cluster
fi
for daemon in slurmd slurmctld slurmdbd mariadb munged; do
    stop "$daemon"
done
exit 0
