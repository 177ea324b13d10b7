# shellcheck shell=bash
# The two-VM mode of bench/ublk-vm.sh (sourced by it: ROOT, VM, W set, the
# release binaries and the kernel ready). See ublk-vm.sh's header.
BENCH_S=${BENCH_S:-20}
# The build under test (BIN: another build's directory, as in ublk-vm.sh).
REL=${BIN:-$ROOT/target/release}
MODES=${MODES:-mwc async}
key=$(mktemp -u)
"$REL/gmdctl" genkey "$key" >/dev/null
{
  echo '#!/bin/busybox sh'
  echo "BENCH_S=$BENCH_S DGRAM=${DGRAM:-auto} HWM_KIB=${HWM_KIB:-128} ENCRYPT=${ENCRYPT:-true} MTU=${MTU:-1500} JOB=${JOB:-} PERF=${PERF:-} SCHED_LINES=${SCHED_LINES:-} CLUSTER_KEY=$(cat "$key")"
  cat "$VM/guest/lib.sh" "$ROOT/bench/vm-fio.sh" "$ROOT/bench/ublk-2vm-guest.sh"
} > "$W/bench2-init.sh"
rm -f "$key"
perf=(); [ -z "${PERF:-}" ] || perf=("$(command -v perf)")
# The guest's own ceilings (seal+open per datagram, a 1 MiB copy), printed
# with the table: what one emulated vCPU can carry of a mirrored stream.
netbench=(); [ ! -x "$REL/gmd-net-bench" ] || netbench=("$REL/gmd-net-bench")
# DRBD 8.4 (the guest kernel's drbd module) for the drbd-* modes: its 8.4
# tools from Debian's drbd-utils.
drbd=()
case " $MODES " in *" drbd-"*)
  for t in /lib/drbd/drbdsetup-84 /sbin/drbdmeta; do
    [ -x "$t" ] || { echo "MODES $MODES needs $t: apt-get install drbd-utils" >&2; exit 1; }
    drbd+=("$t")
  done;;
esac
EXTRA_MODULES="virtio_blk virtio_net" "$VM/mkinitramfs.sh" "$W" "$W/bench2-init.sh" \
  "$REL/gmdd" "$REL/gmdctl" "$REL/gmdstat" "$(command -v fio)" \
  "${perf[@]}" "${netbench[@]}" "${drbd[@]}" >/dev/null
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
# vm NAME MODE RAW PORT PEER_PORT MAC: boots one machine's VM in the background.
vm() {
  local name=$1 mode=$2 raw=$3 port=$4 peer=$5 mac=$6 disks=()
  rm -f "$W/2vm-$name-data.img" "$W/2vm-$name-map.img"
  truncate -s 1G "$W/2vm-$name-data.img"
  truncate -s 64M "$W/2vm-$name-map.img"
  disks=(-drive "file=$W/2vm-$name-data.img,format=raw,if=virtio,cache=none"
         -drive "file=$W/2vm-$name-map.img,format=raw,if=virtio,cache=none")
  if [ "$raw" = 1 ]; then
    rm -f "$W/2vm-raw.img"; truncate -s 1G "$W/2vm-raw.img"
    disks+=(-drive "file=$W/2vm-raw.img,format=raw,if=virtio,cache=none")
  fi
  timeout "${TMO:-900}" qemu-system-x86_64 -accel tcg -cpu max -smp 1 -m 1024 \
    -nographic -no-reboot -kernel "$W/kernel/vmlinuz" -initrd "$W/initramfs.cpio.gz" "${disks[@]}" \
    -netdev "socket,id=n0,udp=127.0.0.1:$peer,localaddr=127.0.0.1:$port" \
    -device "virtio-net-pci,netdev=n0,mac=$mac" \
    -append "console=ttyS0 quiet panic=-1 gmdrole=$name gmdmode=$mode gmdraw=$raw ${GUEST_APPEND:-}" \
    </dev/null >"$W/2vm-$name.console" 2>&1 &
}
: > "$W/2vm-bench.out"
raw=1
for mode in $MODES; do
  pa=$(free_udp); pb=$(free_udp)
  beta_pid=
  if [ "$mode" != standalone ]; then
    vm beta "$mode" 0 "$pb" "$pa" 52:54:00:99:00:02; beta_pid=$!
  fi
  vm alpha "$mode" "$raw" "$pa" "$pb" 52:54:00:99:00:01; alpha_pid=$!
  wait "$alpha_pid" || true
  if [ -n "$beta_pid" ]; then
    kill "$beta_pid" 2>/dev/null || true
    wait "$beta_pid" 2>/dev/null || true
  else
    : > "$W/2vm-beta.console"
  fi
  tr -d '\r' < "$W/2vm-alpha.console" >> "$W/2vm-bench.out"
  # Each side's datagram counters at the end (Udp: InDatagrams NoPorts
  # InErrors OutDatagrams RcvbufErrors ...; eth0 ring drops).
  for m in alpha beta; do
    { tr -d '\r' < "$W/2vm-$m.console" | grep '^BENCH-NET' || true; } | tail -n 1 | sed "s/^BENCH-NET/  $mode:/"
  done
  for m in alpha beta; do
    tr -d '\r' < "$W/2vm-$m.console" | sed -n "s/^BENCH-PERF/  $mode perf:/p"
  done
  if ! grep -q 'RESULT: PASS' "$W/2vm-alpha.console"; then
    echo "two-vm $mode failed; alpha's console:" >&2; tail -40 "$W/2vm-alpha.console" >&2
    echo "beta's console:" >&2; tail -20 "$W/2vm-beta.console" >&2
    exit 1
  fi
  raw=0
done
sed -n 's/.*BENCH-INFO netstat \(.*\)/\1/p' "$W/2vm-bench.out" | python3 -c '
import json, sys
for line in sys.stdin:
    mode, _, text = line.partition(" ")
    try:
        d = json.loads(text)
    except ValueError:
        continue
    for p in d.get("paths", []):
        print(f"  {mode} netstat path:", {k: p[k] for k in ("peer", "srtt_us", "rttvar_us", "rto_us", "cwnd_bytes") if k in p})
    for m in d.get("machines", []):
        print(f"  {mode} netstat peer:", {k: m[k] for k in ("name", "bytes_sent", "resends", "failures", "fragmented") if k in m})
    for n in d.get("networks", []):
        print(f"  {mode} netstat network:", {k: n[k] for k in ("name", "packets_sent", "resends", "spurious", "timeouts") if k in n})
'
sed -n 's/.*BENCH-INFO gmdstat \(.*\)/\1/p' "$W/2vm-bench.out" | python3 -c '
import json, sys
for line in sys.stdin:
    mode, _, text = line.partition(" ")
    try:
        dev = json.loads(text)["devices"][0]
    except (ValueError, KeyError, IndexError):
        continue
    c, w = dev["map_writes"]["commits"], dev["local"]["writes"]
    print(f"  {mode} map commits / local writes: {c} / {w}" + (f" = {c / w:.4f}" if w else ""))
'
sed -n 's/.*BENCH-INFO gso \([^ ]*\) \(..*\)/  \1 alpha: \2/p' "$W/2vm-bench.out"
sed -n 's/^BENCH-CRYPTO /  in the guest (one vCPU): /p' "$W/2vm-bench.out"
bench_table 3 < "$W/2vm-bench.out"
