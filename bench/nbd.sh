#!/usr/bin/env bash
# Standalone device over NBD vs the raw backing file, measured in one run.
#
# For each workload, fio runs against the backing file directly (io_uring,
# O_DIRECT), against qemu-nbd serving a file of the same size (a mature NBD
# server, cache=none, io_uring), and against gmdd's NBD export of a device on
# the first file (fio's nbd engine); the table shows the ratios. Every run is bounded by
# RUNTIME seconds. Usage: bench/nbd.sh [RUNTIME_S] [SIZE]
# Env: SKIP_BUILD=1 (use what is built), BIN (directory holding gmdd and
# gmdctl, default target/release: to compare two builds), WORKLOADS (a subset
# of the names below, space-separated).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNTIME=${1:-10}
SIZE=${2:-1G}
ROOT=$PWD
W=$(mktemp -d /tmp/gmd-bench.XXXXXX)
trap 'kill $GMDD 2>/dev/null || true; wait 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$W"' EXIT
GMDD=

[ -n "${SKIP_BUILD:-}" ] || cargo build --release --bins --quiet
export PATH=${BIN:-$ROOT/target/release}:$PATH
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
sed -e "s/256MiB/$SIZE/" -e "s/127.0.0.1:10809/127.0.0.1:$PORT/" -e 's/127.0.0.1:10810/127.0.0.1:1/' \
    examples/loopback.toml > "$W/cluster.toml"
cd "$W"
gmdctl genkey cluster.key >/dev/null
mkdir -p alpha beta
truncate -s "$SIZE" alpha/data10.img
# Allocate the file so that neither side pays for extent allocation.
fio --name=fill --filename=alpha/data10.img --rw=write --bs=1M --size="$SIZE" --direct=1 \
    --ioengine=io_uring --iodepth=16 >/dev/null
CTL="gmdctl --config cluster.toml --machine alpha --socket $W/alpha.sock"
$CTL init-state data10gmd --zeroed >/dev/null   # one machine: its data is the data
gmdd --config cluster.toml --machine alpha --socket "$W/alpha.sock" 2> gmdd.log &
GMDD=$!
for _ in $(seq 200); do [ -S alpha.sock ] && break; sleep 0.05; done
$CTL configure data10gmd >/dev/null
$CTL down data10gmd beta >/dev/null
$CTL start data10gmd >/dev/null
$CTL primary data10gmd >/dev/null
URI="nbd://127.0.0.1:$PORT/data10gmd"
# Second baseline: qemu-nbd, a mature NBD server, on a copy-sized file of its own.
QPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
truncate -s "$SIZE" qemu.img
fio --name=fill --filename=qemu.img --rw=write --bs=1M --size="$SIZE" --direct=1 \
    --ioengine=io_uring --iodepth=16 >/dev/null
qemu-nbd -f raw --cache=none --aio=io_uring -x q -b 127.0.0.1 -p "$QPORT" -t -e 8 qemu.img &
QEMU_NBD=$!
trap 'kill $GMDD $QEMU_NBD 2>/dev/null || true; wait 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$W"' EXIT
sleep 0.5

# fio JSON → "bandwidth_KiB_s iops"
measure() { # name rw bs qd target...
    local name=$1 rw=$2 bs=$3 qd=$4; shift 4
    fio --name="$name" --rw="$rw" --bs="$bs" --iodepth="$qd" --size="$SIZE" \
        --runtime="$RUNTIME" --time_based --randrepeat=0 --norandommap \
        --output-format=json "$@" > "$name.json"
    python3 - "$name.json" "$rw" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
job = json.loads(text[text.index("{"):])["jobs"][0]
side = job["read"] if "read" in sys.argv[2] else job["write"]
print(side["bw"], round(side["iops"]))
PY
}

[ -n "${HOLD:-}" ] && { echo "gmdd pid $GMDD uri $URI"; sleep "$HOLD"; }
printf '%-20s %13s %13s %13s %9s %10s\n' "workload" "raw file" "qemu-nbd" "gmd NBD" "gmd/raw" "gmd/qemu"
echo "(throughput ratios, higher is better; QD1 rows: mean latency and latency ratios, lower is better)"
for spec in "1M-seq-write-QD16 write 1M 16" "4k-randwrite-QD32 randwrite 4k 32" "4k-randread-QD32 randread 4k 32" \
    "4k-randwrite-QD1 randwrite 4k 1" "4k-randread-QD1 randread 4k 1"; do
    set -- $spec
    case " ${WORKLOADS:-$1} " in *" $1 "*) ;; *) continue ;; esac
    raw=$(measure "raw-$1" "$2" "$3" "$4" --filename=alpha/data10.img --ioengine=io_uring --direct=1)
    qemu=$(measure "qemu-$1" "$2" "$3" "$4" --ioengine=nbd --uri="nbd://127.0.0.1:$QPORT/q")
    gmd=$(measure "gmd-$1" "$2" "$3" "$4" --ioengine=nbd --uri="$URI")
    python3 - "$1" "$3" "$raw" "$qemu" "$gmd" <<'PY'
import sys
name, bs = sys.argv[1], sys.argv[2]
rbw, riops = map(float, sys.argv[3].split())
qbw, qiops = map(float, sys.argv[4].split())
gbw, giops = map(float, sys.argv[5].split())
if bs == "1M":
    fmt = lambda bw, iops: f"{bw/1024:.0f} MiB/s"
elif name.endswith("QD1"):
    # One request at a time: the mean latency says more than IOPS.
    fmt = lambda bw, iops: f"{1e6/iops:.1f} us"
else:
    fmt = lambda bw, iops: f"{iops/1000:.1f}k IOPS"
if name.endswith("QD1"):
    # Latency ratios (gmd's time over the baseline's): lower is better.
    print(f"{name:<20} {fmt(rbw,riops):>13} {fmt(qbw,qiops):>13} {fmt(gbw,giops):>13} "
          f"{riops/giops:>4.2f}x lat {qiops/giops:>5.2f}x lat")
else:
    print(f"{name:<20} {fmt(rbw,riops):>13} {fmt(qbw,qiops):>13} {fmt(gbw,giops):>13} {gbw/rbw:>8.2f}x {gbw/qbw:>9.2f}x")
PY
done
echo
$CTL status data10gmd | sed -n '3p'
gmdstat --socket "$W/alpha.sock" -l data10gmd --json | python3 -c '
import json,sys; d=json.load(sys.stdin)["devices"][0]
m=d["map_writes"]
print("map commits %d, map pages written %d, data writes %d" % (m["commits"], m["pages_written"], d["local"]["writes"]))'
