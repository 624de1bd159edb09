#!/usr/bin/env bash
# Run a command "on" a host of the two-node cluster (scripts/slurm/start_two_node_cluster.sh): inside its
# network namespace (its address, no route out) and a UTS namespace whose host name is the node's, so
# hostname, socket.gethostname() and gloo's address lookup all see node1 / node2, as on a real host.
#   bash scripts/slurm/on_node.sh node2 hostname                  # -> node2
#   bash scripts/slurm/on_node.sh node1 .venv/bin/python -m prefopt.cli train ...
set -euo pipefail
source "$(dirname "$0")/two_node_common.sh"
node=${1:?usage: on_node.sh node1|node2 COMMAND [ARGS...]}
shift
has_netns "$(netns "$node")" || { echo "on_node.sh: no host $node: start it with scripts/slurm/start_local_cluster.sh --nodes 2" >&2; exit 2; }
# nsenter --net joins only the network namespace: `ip netns exec` would also mount a fresh /sys, which hides the
# cgroup hierarchy that slurmd (22.05) initializes even with proctrack/linuxproc, and it fails to start
exec nsenter --net="/run/netns/$(netns "$node")" unshare --uts sh -c 'hostname "$0" && exec "$@"' "$node" "$@"
