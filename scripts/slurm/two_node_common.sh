# Names shared by the two-node cluster's scripts (sourced, not run): start_two_node_cluster.sh,
# stop_two_node_cluster.sh, on_node.sh. A host nodeN is the network namespace prefopt-nodeN, reached from
# this namespace through the veth prefopt-nN on the bridge prefopt-br0.
BRIDGE=prefopt-br0
HOSTS_BEGIN="# >>> prefopt two-node cluster (scripts/slurm/start_two_node_cluster.sh)"
HOSTS_END="# <<< prefopt two-node cluster"

netns() { echo "prefopt-$1"; }                 # netns node1 -> prefopt-node1
veth() { echo "prefopt-n${1#node}"; }          # veth node1 -> prefopt-n1 (this namespace's end)
has_netns() { [ -e "/run/netns/$1" ]; }         # where `ip netns add` keeps a namespace's name

remove_hosts_block() {  # rewritten in place: /etc/hosts may be a bind mount, which a rename (sed -i) would fail on
    grep -q "^$HOSTS_BEGIN" /etc/hosts || return 0
    local kept
    kept=$(awk -v begin="$HOSTS_BEGIN" -v end="$HOSTS_END" '$0 == begin {skip=1} !skip {print} $0 == end {skip=0}' /etc/hosts)
    printf '%s\n' "$kept" >/etc/hosts
}

write_hosts_block() {  # write_hosts_block SUBNET: node1 and node2 resolvable in every namespace (they share /etc)
    remove_hosts_block
    printf '%s\n%s\n%s\n%s\n' "$HOSTS_BEGIN" "$1.11 node1" "$1.12 node2" "$HOSTS_END" >>/etc/hosts
}
