# /init body (after tests/vm/guest/lib.sh and bench/vm-fio.sh) for
# bench/ublk-vm.sh two-vm: one machine of a mirrored pair, each in its own
# VM, joined by a qemu UDP socket link (10.99.0.1 alpha, 10.99.0.2 beta).
# The kernel command line says which: gmdrole=alpha|beta gmdmode=MODE
# gmdraw=0|1. Disks: /dev/vda the 1 GiB data volume, /dev/vdb the state
# map's own small disk (ext4), on alpha with gmdraw=1 also /dev/vdc, the
# raw baseline disk. alpha runs fio (libaio, direct) on /dev/vdc first
# when asked, then on /dev/ublkb0 once the pair mirrors, and prints "BENCH
# <target> <job> <MiB/s> <IOPS>" lines and "RESULT: PASS"; beta serves
# until the host stops its VM.
boot_guest
while read -r m; do insmod "/modules/$m" 2>/dev/null; done < /modules/extra.list
arg() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" /proc/cmdline; }
role=$(arg gmdrole); mode=$(arg gmdmode); raw=$(arg gmdraw)
fail() { echo "[$role] $*"; echo "RESULT: FAIL"; poweroff -f; }
# Where datagrams are lost: this kernel's UDP counters (receive buffer
# errors: gmdd did not read in time) and eth0's drops (the virtio ring).
net_counters() {
  local c=/sys/class/net/eth0/statistics
  echo "BENCH-NET $role udp $(grep '^Udp: [0-9]' /proc/net/snmp | cut -d' ' -f2-) eth0 rx_packets $(cat $c/rx_packets) rx_dropped $(cat $c/rx_dropped) rx_missed $(cat $c/rx_missed_errors) tx_packets $(cat $c/tx_packets) tx_dropped $(cat $c/tx_dropped)"
}
wait_until 10 test -b /dev/vdb || fail "no /dev/vdb"
n=1; peer=beta; [ "$role" = beta ] && { n=2; peer=alpha; }
ip addr add 10.99.0.$n/24 dev eth0 && ip link set eth0 mtu "$MTU" up || fail "no eth0 (MTU $MTU)"
mkfs.ext4 -q -F /dev/vdb && mkdir -p /m && mount -t ext4 /dev/vdb /m || fail "map disk"
d=/m/pair
mkdir -p "$d"
echo "$CLUSTER_KEY" > "$d/cluster.key"; chmod 600 "$d/cluster.key"
cat > "$d/cluster.toml" <<TOML
[cluster]
name = "vm2-$mode"
key_file = "cluster.key"
encrypt = $ENCRYPT
[sites.austin]
dominant = true
[sites.dallas]
[networks.geonet1]
datagram_size = $DGRAM
[machines.alpha]
site = "austin"
interfaces = { geonet1 = "10.99.0.1:6755" }
[machines.beta]
site = "dallas"
interfaces = { geonet1 = "10.99.0.2:6755" }
[devices.d0]
minor = 0
mode = "$mode"
size = "1GiB"
hwm_kib = $HWM_KIB
ublk_queues = 1
[devices.d0.machines.alpha]
data = "/dev/vda"
state_map = "/m/pair/data.sm"
role = "primary"
[devices.d0.machines.beta]
data = "/dev/vda"
state_map = "/m/pair/data.sm"
role = "secondary"
TOML
# Both data disks are new sparse files (zeros): the pair starts without a copy.
gmdctl --config "$d/cluster.toml" --machine "$role" init-state d0 --zeroed >/dev/null || fail "init-state"
FIO="fio --ioengine=libaio --direct=1 --time_based --runtime=$BENCH_S --ramp_time=2 --group_reporting --randrepeat=0 --norandommap"
job() { # TARGET DEVICE
  echo "BENCH $1 randwrite-4k-qd32 $($FIO --name=r4k --filename=$2 --size=1G --rw=randwrite --bs=4k --iodepth=32 | parse write)"
  echo "BENCH $1 randwrite-4k-qd1 $($FIO --name=r4k1 --filename=$2 --size=1G --rw=randwrite --bs=4k --iodepth=1 | parse write)"
  echo "BENCH $1 write-1m-qd16 $($FIO --name=s1m --filename=$2 --size=1G --rw=write --bs=1m --iodepth=16 | parse write)"
}
log "$role: up"
if [ "$role" = alpha ] && [ "$raw" = 1 ]; then
  wait_until 10 test -b /dev/vdc || fail "no /dev/vdc"
  job raw /dev/vdc
  log "alpha: raw disk measured"
fi
if [ "$role" = beta ]; then
  gmdd_up "$d" beta || fail "gmdd"
else
  gmdd_up "$d" alpha ublk || fail "gmdd"
fi
ctl "$d" "$role" configure d0 >/dev/null || fail "configure"
# The first device of a new pair starts with its peer recorded down (alpha);
# beta starts once alpha's device is AVAILABLE (alpha may still be
# measuring its raw disk): it retries until then.
if [ "$role" = alpha ]; then
  ctl "$d" alpha down d0 beta >/dev/null 2>&1 || fail "down"
fi
if ! wait_until 60 ctl "$d" "$role" start d0; then
  log "$role: not started after 60 s; the link so far:"
  ctl "$d" "$role" netstat; tail -n 15 "$d/$role.log"
  wait_until 1140 ctl "$d" "$role" start d0 || { ctl "$d" "$role" start d0; fail "start"; }
fi
log "$role: d0 started ($mode)"
if [ "$role" = beta ]; then
  while :; do sleep 5; net_counters; done
fi
wait_until 300 in_sync "$d" alpha d0 || { sync_report "$d" d0; fail "not in sync"; }
wait_until 10 test -b /dev/ublkb0 || fail "no /dev/ublkb0"
log "alpha: mirroring in sync"
job "$mode" /dev/ublkb0
log "alpha: $mode measured"
# beta prints its counters every 5 s: after 6 s idle its last line covers
# every datagram of the jobs, comparable with alpha's.
sleep 6
net_counters
ctl "$d" alpha netstat --json -c 1 | tr -d '\n' | sed "s/^/BENCH-INFO netstat $mode /"; echo
gmdstat --socket "$d/alpha.sock" -l d0 --json | tr -d ' \n' | sed "s/^/BENCH-INFO gmdstat $mode /"; echo
echo "RESULT: PASS"
poweroff -f
