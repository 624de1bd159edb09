#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, with accounting (slurmdbd + MariaDB), for CI and for
# developers: the cluster the SLURM tests and hydra/launcher=slurm_local submit to.
#
#   bash scripts/slurm/start_local_cluster.sh      # install (Debian packages) if needed, start, wait until idle
#   source .cache/slurm/env.sh                     # export SLURM_CONF for sbatch/squeue/sacct and for the tests
#   bash scripts/slurm/start_local_cluster.sh --nodes 2   # also the two-host cluster (network namespaces node1, node2):
#                                                  # scripts/slurm/start_two_node_cluster.sh; env.sh then also exports
#                                                  # PREFOPT_SLURM_2NODE_CONF for tests/test_slurm_multinode.py
#   python -m pytest tests/test_slurm.py
#   bash scripts/slurm/stop_local_cluster.sh       # stop every daemon this script started (by PID)
#
# Runs as root without systemd (Debian's packages start nothing here): munged as the munge user, then
# mariadbd, slurmdbd, slurmctld and slurmd by hand, each writing its PID file into $SLURM_DIR/run, which
# is what the stop script kills. Everything else (config, state, spool, logs, database) lives in
# $SLURM_DIR too (default: .cache/slurm in the repository). Starting a running cluster again is a no-op.
# Without slurmdbd, submitit could not see that a cancelled job ended and would wait forever.
set -euo pipefail
cd "$(dirname "$0")/../.."
case "${1:-} ${2:-}" in
    " "|"--nodes 1") CLUSTER_NODES=1 ;;
    "--nodes 2") CLUSTER_NODES=2 ;;
    *) echo "usage: start_local_cluster.sh [--nodes 1|2]" >&2; exit 2 ;;
esac
SLURM_DIR=$(realpath -m "${SLURM_DIR:-.cache/slurm}")
DB_PORT=${SLURM_DB_PORT:-3307}  # MariaDB on 127.0.0.1, away from a system MariaDB's 3306
NODE=$(hostname -s)
export SLURM_CONF="$SLURM_DIR/etc/slurm.conf"
mkdir -p "$SLURM_DIR"/{etc,state,spool,log,run,mysql}

log() { echo "[slurm-local] $*"; }
wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: poll until COMMAND succeeds, or fail naming the log to read
    local seconds=$1 what=$2; shift 2
    for _ in $(seq $((seconds * 4))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.25; done
    echo "[slurm-local] $what did not come up within ${seconds}s; logs: $SLURM_DIR/log" >&2
    tail -n 20 "$SLURM_DIR"/log/*.log >&2 || true
    return 1
}
alive() { [ -f "$SLURM_DIR/run/$1.pid" ] && kill -0 "$(cat "$SLURM_DIR/run/$1.pid")" 2>/dev/null; }
write_env() {  # the exports for clients; the two-node cluster's line only while it is configured
    echo "export SLURM_CONF=$SLURM_CONF" >"$SLURM_DIR/env.sh"
    echo "if [ -f $SLURM_DIR/two_node/env.sh ]; then . $SLURM_DIR/two_node/env.sh; fi" >>"$SLURM_DIR/env.sh"
}
then_two_nodes() {  # --nodes 2: the two-host cluster next to this one (it needs this one's munge and slurmdbd)
    write_env
    [ "$CLUSTER_NODES" = 2 ] && exec bash scripts/slurm/start_two_node_cluster.sh
    exit 0
}

if alive slurmctld && alive slurmd && sinfo -h >/dev/null 2>&1; then
    log "already running (SLURM_CONF=$SLURM_CONF)"
    then_two_nodes
fi

# --- packages (Debian bookworm: Slurm 22.05); a no-op when they are installed
need=()
for pair in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge slurmdbd:slurmdbd mariadbd:mariadb-server; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin" command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
export PATH="$PATH:/usr/sbin"
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# --- munge: the default socket, which slurm's auth/munge uses; an already running munged is reused
if ! (munge -n | unmunge) >/dev/null 2>&1; then
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none; chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid --log-file=/var/log/munge/munged.log
    wait_for 10 munged bash -c "munge -n | unmunge"
    cp /run/munge/munged.pid "$SLURM_DIR/run/munged.pid"  # ours: the stop script ends it
fi

# --- MariaDB for slurmdbd, its data dir in $SLURM_DIR, TCP on 127.0.0.1 only
if ! alive mariadb; then
    if [ ! -d "$SLURM_DIR/mysql/mysql" ]; then
        mariadb-install-db --user=root --datadir="$SLURM_DIR/mysql" --auth-root-authentication-method=socket >"$SLURM_DIR/log/mariadb-install.log" 2>&1
    fi
    setsid /usr/sbin/mariadbd --user=root --datadir="$SLURM_DIR/mysql" --socket="$SLURM_DIR/run/mysqld.sock" \
        --pid-file="$SLURM_DIR/run/mariadb.pid" --port="$DB_PORT" --bind-address=127.0.0.1 \
        --log-error="$SLURM_DIR/log/mariadb.log" </dev/null >/dev/null 2>&1 &
    wait_for 60 mariadbd mariadb --socket="$SLURM_DIR/run/mysqld.sock" -e "select 1"
    mariadb --socket="$SLURM_DIR/run/mysqld.sock" -e "
        CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
        CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
fi

# --- configuration: one node (this machine, all its cores) in one partition
cpus=$(nproc)
memory_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
cat >"$SLURM_CONF" <<EOF
# written by scripts/slurm/start_local_cluster.sh
ClusterName=prefopt
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job may start again after cred_expire seconds (default 120); the scheduler looks every 2 s
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=2,bf_interval=2
StateSaveLocation=$SLURM_DIR/state
SlurmdSpoolDir=$SLURM_DIR/spool
SlurmctldPidFile=$SLURM_DIR/run/slurmctld.pid
SlurmdPidFile=$SLURM_DIR/run/slurmd.pid
SlurmctldLogFile=$SLURM_DIR/log/slurmctld.log
SlurmdLogFile=$SLURM_DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
# a job step whose task fails ends its other tasks; ended tasks get SIGKILL 2 s after SIGTERM
KillOnBadExit=1
KillWait=2
MinJobAge=600
InactiveLimit=0
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
JobAcctGatherType=jobacct_gather/none
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
cat >"$SLURM_DIR/etc/slurmdbd.conf" <<EOF
# written by scripts/slurm/start_local_cluster.sh
AuthType=auth/munge
DbdHost=$NODE
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=$SLURM_DIR/run/slurmdbd.pid
LogFile=$SLURM_DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
chmod 600 "$SLURM_DIR/etc/slurmdbd.conf"

# --- slurmdbd, then the cluster in its database, then slurmctld and slurmd (all daemonize, PID files in run/)
alive slurmdbd || /usr/sbin/slurmdbd
wait_for 60 slurmdbd sacctmgr -n list cluster
sacctmgr -n list cluster format=cluster | grep -qw prefopt || sacctmgr -i add cluster prefopt >/dev/null
alive slurmctld || /usr/sbin/slurmctld
wait_for 30 slurmctld scontrol ping
alive slurmd || /usr/sbin/slurmd
wait_for 30 "node $NODE" bash -c "sinfo -h -N -o '%T' | grep -qx idle"

log "up: node $NODE, $cpus CPUs, partition local (SLURM_CONF=$SLURM_CONF; source $SLURM_DIR/env.sh)"
sinfo
then_two_nodes
