#!/bin/bash
# One cluster node: run as the first process of its own PID namespace, in
# its own mount, UTS and network namespaces (see two_node.sh):
#   unshare --net --mount --uts --pid --fork --kill-child --mount-proc \
#       --propagation private node.sh NAME ADDR NODEDIR CLUSTERDIR BINDIR AGENT
# It gives the node private copies of what Pacemaker and Corosync keep on a
# machine, waits for its address, then runs gmdd, corosync and pacemakerd
# and waits for them. Killing this process kills the whole node.
set -euo pipefail
name=$1 addr=$2 dir=$3 cluster=$4 bindir=$5 agent=$6

hostname "$name"
mkdir -p "$dir"/{etc-corosync,var-lib-corosync,log-corosync,log-pacemaker,resource.d/gmd} \
    "$dir"/var-lib-pacemaker/{cib,pengine,blackbox,cores}
chown -R hacluster:haclient "$dir/var-lib-pacemaker" "$dir/log-pacemaker"
chmod 750 "$dir"/var-lib-pacemaker/* "$dir/log-pacemaker"

# /run and /dev/shm: libqb's IPC files, pid files, the OCF originals.
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /run/lock /run/ocf-orig /run/gmd
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount --bind "$dir/etc-corosync" /etc/corosync
mount --bind "$dir/var-lib-corosync" /var/lib/corosync
mount --bind "$dir/log-corosync" /var/log/corosync 2>/dev/null || {
    mkdir -p /var/log/corosync && mount --bind "$dir/log-corosync" /var/log/corosync; }
mount --bind "$dir/var-lib-pacemaker" /var/lib/pacemaker
mount --bind "$dir/log-pacemaker" /var/log/pacemaker
# The agent as ocf:gmd:gmd, next to the host's agents, without touching
# the host's /usr/lib/ocf.
mount --bind /usr/lib/ocf/resource.d /run/ocf-orig
for provider in /run/ocf-orig/*; do
    ln -sfn "$provider" "$dir/resource.d/$(basename "$provider")"
done
install -m 755 "$agent" "$dir/resource.d/gmd/gmd"
mount --bind "$dir/resource.d" /usr/lib/ocf/resource.d

ip link set lo up
# two_node.sh moves the veth end here and gives it the address.
for _ in $(seq 300); do
    ip -4 -o addr show dev gmd0 2>/dev/null | grep -q " $addr/" && break
    sleep 0.1
done
ip -4 -o addr show dev gmd0 | grep -q " $addr/" || { echo "node $name: no address $addr on gmd0" >&2; exit 1; }

GMD_LOG=debug "$bindir/gmdd" --config "$cluster/cluster.toml" --machine "$name" \
    --socket /run/gmd/gmdd.sock </dev/null >/dev/null 2>>"$dir/gmdd.log" &
corosync -f </dev/null >>"$dir/corosync.out" 2>&1 &
# Pacemaker waits for corosync's IPC.
for _ in $(seq 100); do
    corosync-cfgtool -s >/dev/null 2>&1 && break
    sleep 0.1
done
pacemakerd -f </dev/null >>"$dir/pacemakerd.out" 2>&1 &
echo "node $name: up" >&2
wait
