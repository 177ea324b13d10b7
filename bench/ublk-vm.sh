#!/bin/bash
# Benchmark (not a test): inside the test VM (TCG), in one run, fio 4 KiB
# randwrite QD32, 1 MiB sequential write QD16 and 4 KiB randread QD32 (the
# direct read path of the ublk queue threads) on the raw virtio disk, on
# /dev/ublkb<minor> standalone, and mirrored in mwc, async and sync mode (two
# gmdd on loopback, backing files on the same virtio disk), plus 4 KiB
# randwrite QD1 (latency-bound). Each target is written once before it is
# measured (steady state: blocks allocated, regions marked). Prints each
# figure and its ratio to the raw disk (absolute TCG figures mean nothing),
# and how many of the device's writes ran on the ublk queue threads.
# Env: VM_WORK (default target/vm), BENCH_S (seconds per fio job, default 10),
# SKIP_BUILD=1 (use the release binaries as they are), BIN (directory
# holding the gmdd, gmdctl and gmdstat to put in the VMs, default
# target/release: to compare two builds).
#
# bench/ublk-vm.sh two-vm: alpha and beta each in its own TCG VM (one vCPU,
# 1 GiB each), joined by a qemu `-netdev socket,udp=` link, 1 GiB virtio
# data disks with cache=none, the state maps on their own small virtio
# disks; fio (libaio, direct, BENCH_S seconds per job, default 20) in
# alpha's VM on a raw virtio disk of the same size, then on /dev/ublkb0
# mirrored in each of MODES (default "mwc async"; "standalone": alpha alone,
# beta recorded down and no beta VM; "drbd-c", "drbd-a": DRBD 8.4, the
# guest kernel's module, protocol C or A, on the same disks and link, its
# metadata on the small disk; needs drbd-utils on the host), a fresh pair
# per mode.
# Env: DGRAM (GeoMessage datagram size; default auto: no datagram_size,
# discovered per path as users get it, 1 472 at the link's MTU of 1500;
# 1400 pins the size of runs before 2026-12-07 evening), HWM_KIB (async high water mark, default 128),
# ENCRYPT (GeoMessage encryption, default true; false: authentication only),
# MTU (of the guests' link, default 1500; DGRAM must fit in it),
# GUEST_APPEND (extra guest kernel parameters, e.g. idle=poll),
# JOB (one job's name, e.g. randwrite-4k-qd1: run only that one, raw
# included), PERF=1 (profile both VMs while the mirrored job runs: perf,
# cpu-clock, system-wide — the share of each program and the hottest
# symbols, context switches, system calls per thread; SCHED_LINES=N adds
# N lines of one second's thread switches, wake-ups and system calls).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VM=$ROOT/tests/vm
W=${VM_WORK:-$ROOT/target/vm}
mkdir -p "$W"
[ -n "${SKIP_BUILD:-}" ] || (cd "$ROOT" && cargo build --release -p gmdd -p gmdctl -p gmd-net-bench --bins --quiet)
"$VM/setup-kernel.sh" "$W" >/dev/null
# bench_table DIGITS: "BENCH <target> <job> <MiB/s> <IOPS>" lines in (others
# ignored) → the table, each figure with its ratio to the raw disk's.
bench_table() {
  sed -n 's/.*BENCH /BENCH /p' | awk -v digits="$1" '
    $1 == "BENCH" { key = $3; if ($2 == "raw") raw[key] = $4; line[++n] = $0 }
    END {
      printf "%-11s %-18s %10s %8s %9s\n", "target", "job", "MiB/s", "IOPS", "vs raw"
      for (i = 1; i <= n; i++) { split(line[i], f, " ")
        r = raw[f[3]] > 0 ? sprintf("%." digits "f", f[4] / raw[f[3]]) : "-"
        printf "%-11s %-18s %10s %8s %9s\n", f[2], f[3], f[4], f[5], r }
    }'
}
if [ "${1:-}" = two-vm ]; then
  . "$ROOT/bench/ublk-2vm.sh"
  exit
fi
{ echo '#!/bin/busybox sh'; echo "BENCH_S=${BENCH_S:-10}"; cat "$VM/guest/lib.sh" "$ROOT/bench/vm-fio.sh" "$ROOT/bench/ublk-vm-guest.sh"; } > "$W/bench-init.sh"
EXTRA_MODULES=virtio_blk "$VM/mkinitramfs.sh" "$W" "$W/bench-init.sh" "${BIN:-$ROOT/target/release}/gmdd" "${BIN:-$ROOT/target/release}/gmdctl" "${BIN:-$ROOT/target/release}/gmdstat" "$(command -v fio)" >/dev/null
truncate -s 2G "$W/bench-disk.img"
DISK=$W/bench-disk.img TMO=${TMO:-1200} MEM=${MEM:-2560} "$VM/boot.sh" "$W" 'RESULT: PASS' > "$W/bench.out" 2>&1 || { tail -40 "$W/console.log"; exit 1; }
tr -d '\r' < "$W/console.log" | sed -n 's/.*BENCH-INFO /  /p'
tr -d '\r' < "$W/console.log" | bench_table 2
