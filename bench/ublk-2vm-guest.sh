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
# gmdmode=standalone: alpha alone (beta recorded down, no beta VM), the
# device in mwc mode: the ublk path and the local write without the peer.
standalone=; [ "$mode" = standalone ] && { standalone=1; mode=mwc; }
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
# drbd-c / drbd-a: the same pair with DRBD 8.4 (the guest kernel's module)
# in protocol C or A instead of gmd, on the same disks and link: data on
# /dev/vda, metadata (activity log, bitmap) on /dev/vdb, DRBD's defaults
# otherwise. New zeroed disks on both sides: the initial sync is skipped
# (new-current-uuid --clear-bitmap), as gmd's pair starts without a copy.
drbd_state() { sed -n 's/.* cs:\([A-Za-z]*\) ro:\([A-Za-z/]*\) ds:\([A-Za-z/]*\).*/\1 \2 \3/p' /proc/drbd; }
drbd_is() { [ "$(drbd_state)" = "$*" ]; }
drbd_pair() {
  local proto=$1
  load drbd
  test -e /proc/drbd || fail "no drbd module"
  mkdir -p /var/lock /var/run/drbd /var/lib/drbd
  drbdmeta --force 0 v08 /dev/vdb flex-external create-md > /t/drbdmeta.log 2>&1 || { cat /t/drbdmeta.log; fail "drbdmeta create-md"; }
  drbdsetup-84 new-resource r0 && drbdsetup-84 new-minor r0 0 0 &&
    drbdsetup-84 attach 0 /dev/vda /dev/vdb flexible || fail "drbd attach"
  drbdsetup-84 connect r0 "ipv4:10.99.0.$n:7789" "ipv4:10.99.0.$((3 - n)):7789" --protocol="$proto" ||
    fail "drbd connect"
  log "$role: drbd protocol $proto, $(drbd_state)"
  if [ "$role" = beta ]; then
    while :; do sleep 5; net_counters; done
  fi
  wait_until 1200 drbd_is Connected Secondary/Secondary Inconsistent/Inconsistent || fail "drbd not connected: $(drbd_state)"
  drbdsetup-84 new-current-uuid 0 --clear-bitmap || fail "drbd new-current-uuid"
  wait_until 60 drbd_is Connected Secondary/Secondary UpToDate/UpToDate || fail "drbd not in sync: $(drbd_state)"
  drbdsetup-84 primary 0 || fail "drbd primary"
  wait_until 10 test -b /dev/drbd0 || fail "no /dev/drbd0"
  log "alpha: drbd ready, $(drbd_state)"
  job "$mode" /dev/drbd0
  log "alpha: $mode measured"
  # A figure is a mirrored one only if the pair stayed connected.
  drbd_is Connected Primary/Secondary UpToDate/UpToDate || fail "drbd pair not together at the end: $(drbd_state)"
  sleep 6
  net_counters
  echo "RESULT: PASS"
  poweroff -f
}
# gmd's state map lives in an ext4 file system on /dev/vdb; DRBD's
# metadata takes the whole disk.
gmd_setup() {
  mkfs.ext4 -q -F /dev/vdb && mkdir -p /m && mount -t ext4 /dev/vdb /m || fail "map disk"
  d=/m/pair
  mkdir -p "$d"
  echo "$CLUSTER_KEY" > "$d/cluster.key"; chmod 600 "$d/cluster.key"
  dgram_line="datagram_size = $DGRAM"
  [ "$DGRAM" != auto ] || dgram_line="# no datagram_size: each path discovers its own"
  cat > "$d/cluster.toml" <<TOML
[cluster]
name = "vm2-$mode"
key_file = "cluster.key"
encrypt = $ENCRYPT
[sites.austin]
dominant = true
[sites.dallas]
[networks.geonet1]
$dgram_line
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
}
case $mode in drbd-*) ;; *) gmd_setup;; esac
FIO="fio --ioengine=libaio --direct=1 --time_based --runtime=$BENCH_S --ramp_time=2 --group_reporting --randrepeat=0 --norandommap"
# profile SECONDS: what this VM does meanwhile, printed as "BENCH-PERF
# <role> ..." lines: a system-wide CPU profile (perf, cpu-clock: TCG has no
# hardware counters; the share of each program and kernel, then the
# hottest symbols) for half the time, then context switches for 3 s, then
# system calls per thread (perf trace -s) for the rest.
profile() {
  local rec=$(($1 / 2)) tr=$(($1 - $1 / 2 - 3))
  perf record -q -e cpu-clock -F 499 -a -o /t/perf.data -- sleep "$rec" >/dev/null 2>&1 || { echo "BENCH-PERF $role perf record failed"; return; }
  perf stat -e context-switches,cpu-migrations,page-faults -a -- sleep 3 2>&1 | grep -E 'context|migr|faults|elapsed' | sed "s/^/BENCH-PERF $role stat /"
  mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null
  # One second of thread switches, wake-ups and system calls, in order
  # (a few writes' worth, to follow one through the threads).
  if [ -n "$SCHED_LINES" ]; then
    perf record -q -e sched:sched_switch -e sched:sched_wakeup -e raw_syscalls:sys_enter -e raw_syscalls:sys_exit \
      -a -o /t/sched.data -- sleep 1 >/dev/null 2>&1
    perf script -i /t/sched.data -F comm,tid,time,event,trace 2>/dev/null | grep -v '^ *perf ' | tail -n +200 | head -n "$SCHED_LINES" |
      sed "s/^/BENCH-PERF $role sched /"
  fi
  perf trace -s -a -o /t/trace.txt -- sleep "$tr" >/dev/null 2>&1 || echo "BENCH-PERF $role perf trace failed"
  awk '/^ [^ ].*\(/ { keep = ($0 ~ /gmd|ublk|fio|iou/) } keep && (/^ [^ ].*\(/ || /^ +[a-z_0-9]+ +[0-9]+ /)' /t/trace.txt 2>/dev/null |
    head -n 150 | sed "s/^/BENCH-PERF $role trace /"
  for sort in comm,dso comm,dso,sym; do
    perf report -i /t/perf.data --stdio --no-children --sort $sort --percent-limit 0.5 2>/dev/null |
      grep -v '^#' | grep -v '^ *$' | head -n 50 | sed "s/^/BENCH-PERF $role /"
  done
}
# fio_job NAME RW BS QD DEVICE → "MiB/s IOPS"; with PERF set, alpha
# profiles its VM while the job runs on the mirror (after the 2 s ramp).
fio_job() {
  local name=$1 rw=$2 bs=$3 qd=$4 dev=$5
  if [ -n "$PERF" ] && [ "$dev" != /dev/vdc ]; then
    (sleep 3; profile $((BENCH_S - 2)) > /t/perf.alpha) &
    echo $! > /t/perf.pid
  fi
  $FIO --name="$name" --filename="$dev" --size=1G --rw="$rw" --bs="$bs" --iodepth="$qd" | parse write
}
job() { # TARGET DEVICE
  # JOB alone: mark every 4 MiB activity extent first (4096 random writes,
  # not measured), as the QD32 job does for the others; otherwise the job
  # measures first-touch state map commits too.
  # Standalone: write the whole device once (1 MiB, not measured), as
  # bench/ublk-vm.sh does: a device alone marks each 32 KiB region stale
  # on its first write, which a device that has run alone for a while has
  # done long ago.
  if [ -n "$standalone" ] && [ "$2" != /dev/vdc ]; then
    fio --ioengine=libaio --direct=1 --name=fill --filename="$2" --size=1G --rw=write --bs=1m \
      --iodepth=16 >/dev/null
  elif [ -n "$JOB" ] && [ "$2" != /dev/vdc ]; then
    fio --ioengine=libaio --direct=1 --name=warm --filename="$2" --size=1G --rw=randwrite --bs=4k \
      --iodepth=32 --number_ios=4096 --norandommap --randrepeat=0 >/dev/null
  fi
  for j in "randwrite-4k-qd32 randwrite 4k 32" "randwrite-4k-qd1 randwrite 4k 1" "write-1m-qd16 write 1m 16"; do
    set -- "$1" "$2" $j
    # JOB=<job>: that job only (raw included, for its ratio).
    [ -z "$JOB" ] || [ "$JOB" = "$3" ] || continue
    echo "BENCH $1 $3 $(fio_job "$3" "$4" "$5" "$6" "$2")"
  done
  # Not a bare wait: gmdd runs in the background of this shell too.
  [ ! -f /t/perf.pid ] || { wait "$(cat /t/perf.pid)"; cat /t/perf.alpha; rm -f /t/perf.pid /t/perf.alpha; }
}
log "$role: up"
if [ "$role" = alpha ] && [ "$raw" = 1 ]; then
  wait_until 10 test -b /dev/vdc || fail "no /dev/vdc"
  job raw /dev/vdc
  log "alpha: raw disk measured"
  ! command -v gmd-net-bench >/dev/null || echo "BENCH-CRYPTO $(gmd-net-bench crypto --datagram "$([ "$DGRAM" = auto ] && echo $((MTU - 28)) || echo "$DGRAM")")"
fi
case $mode in drbd-c) drbd_pair C;; drbd-a) drbd_pair A;; esac
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
[ -z "$standalone" ] || mode=standalone
if ! wait_until 60 ctl "$d" "$role" start d0; then
  log "$role: not started after 60 s; the link so far:"
  ctl "$d" "$role" netstat; tail -n 15 "$d/$role.log"
  wait_until 1140 ctl "$d" "$role" start d0 || { ctl "$d" "$role" start d0; fail "start"; }
fi
log "$role: d0 started ($mode)"
if [ "$role" = beta ]; then
  if [ -n "$PERF" ]; then
    # Profile the peer's side of the same job: from when alpha's writes
    # arrive (1 MiB received since the pair was in sync), as long as alpha.
    rx() { cat /sys/class/net/eth0/statistics/rx_bytes; }
    rx_above() { [ "$(rx)" -gt "$1" ]; }
    wait_until 300 in_sync "$d" beta d0
    wait_until 1200 rx_above $(( $(rx) + 1048576 ))
    sleep 3; profile $((BENCH_S - 2))
  fi
  while :; do sleep 5; net_counters; done
fi
if [ -z "$standalone" ]; then
  wait_until 300 in_sync "$d" alpha d0 || { sync_report "$d" d0; fail "not in sync"; }
fi
wait_until 10 test -b /dev/ublkb0 || fail "no /dev/ublkb0"
log "alpha: ${standalone:+standalone, }ready"
job "$mode" /dev/ublkb0
log "alpha: $mode measured"
[ -n "$standalone" ] || log "alpha: datagrams to beta of $(ctl "$d" alpha netstat --json | tr -d ' \n' | sed -n 's/.*"datagram_bytes":\([0-9]*\).*/\1/p') bytes"
# A figure is a mirrored one only if the pair stayed together: one
# mirroring session from the start, still connected at the end.
if [ -z "$standalone" ]; then
  sessions=$(sed 's/\x1b\[[0-9;]*m//g' "$d/alpha.log" | grep -c 'gmdd::link: mirroring' || true)
  s=$(ctl "$d" alpha status d0 --json | tr -d ' \n')
  case $s in *'"connected":true'*) ;; *) sessions=0;; esac
  if [ "$sessions" != 1 ]; then
    grep -E 'mirroring|not mirroring|goes on alone|unreachable|down' "$d/alpha.log" | tail -n 20
    fail "the pair did not stay connected through the $mode job (mirroring sessions: $sessions, connected at the end: $([ "$sessions" = 0 ] && echo no || echo yes))"
  fi
fi
if [ -n "$PERF" ] && [ -z "$standalone" ]; then
  # The link itself, idle (after the job: beta's profile starts on traffic):
  # ICMP round trips, then GeoMessage's (netprobe).
  ping -c 20 -i 0.2 10.99.0.2 | tail -n 1 | sed 's/^/BENCH-PERF alpha ping /'
  ctl "$d" alpha netprobe beta --rounds 50 | sed 's/^/BENCH-PERF alpha netprobe /'
fi
# beta prints its counters every 5 s: after 6 s idle its last line covers
# every datagram of the jobs, comparable with alpha's.
sleep 6
net_counters
ctl "$d" alpha netstat --json -c 1 | tr -d '\n' | sed "s/^/BENCH-INFO netstat $mode /"; echo
gmdstat --socket "$d/alpha.sock" -l d0 --json | tr -d ' \n' | sed "s/^/BENCH-INFO gmdstat $mode /"; echo
# Whether this kernel took UDP GSO (it needs checksum offload on the link;
# without it every datagram is its own trip through the stack and the
# virtio queue).
echo "BENCH-INFO gso $mode $(sed 's/\x1b\[[0-9;]*m//g' "$d/alpha.log" | grep -o 'UDP GSO failed.*' | head -n 1)"
echo "RESULT: PASS"
poweroff -f
