#!/usr/bin/env bash
# Mirroring benchmark, in one run (two gmdd on loopback, file-backed devices):
#
#  * the raw backing file (fio, io_uring, O_DIRECT) as the baseline, then
#    gmd's NBD export (fio's nbd engine) with the peer recorded down
#    (standalone), and mirrored in sync, mwc and async (alpha primary, beta
#    secondary): 4 KiB randwrite QD1 mean latency, 4 KiB randwrite QD32 IOPS,
#    1 MiB sequential write QD16 throughput. Each mode first runs 4 KiB
#    randwrite QD1 over the whole device while it is cold (fresh maps: the
#    first write to each 4 MiB activity extent costs a map commit), then is
#    warmed by one sequential pass over the device, both reported on their
#    own;
#  * state map writes per data write (gmdstat --json), over the measured
#    points and over a 4 KiB randwrite into a 64 MiB hot set;
#  * resync of the device with 1 % of its 32 KiB regions dirty (beta stopped,
#    alpha writes alone, beta restarts) at sync_rate_kib 32 and 1024, against
#    `rsync --inplace --no-whole-file` of alpha's image onto a copy of beta's
#    stale image.
#
# Prints one table (absolute figures and ratios to the baselines measured in
# the same run) and the goals; writes results.tsv in the work directory.
#
# Usage: bench/mirror.sh [SECONDS_PER_POINT]      (default 10)
# Environment: SIZE (device size, default 1G), HOT (hot set, default 64M),
#   DIRTY_PERMILLE (default 10 = 1 %), RATES (sync_rate_kib values, default
#   "32 1024"), MODES (default "standalone sync mwc async"), HWM_KIB (async
#   high water mark, default 128), QUIET_WAIT (seconds to wait for 1-min load < 0.6 first,
#   default 0), KEEP=1 (keep the work directory), RESULTS (copy results.tsv
#   there), SKIP_BUILD=1 (use the binaries in target/release as they are),
#   BIN (directory holding gmdd and gmdctl instead: to compare two builds).
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH_DIR=$PWD/bench
for tool in fio rsync; do
  command -v "$tool" >/dev/null || { echo "mirror.sh needs $tool (apt-get install fio rsync)" >&2; exit 1; }
done
T=${1:-10}
SIZE=${SIZE:-1G}
HOT=${HOT:-64M}
DIRTY_PERMILLE=${DIRTY_PERMILLE:-10}
RATES=${RATES:-32 1024}
QUIET_WAIT=${QUIET_WAIT:-0}
MODES=${MODES:-standalone sync mwc async}
HWM_KIB=${HWM_KIB:-128}
ROOT=$PWD
BYTES=$(numfmt --from=iec "$SIZE")
REGIONS=$((BYTES / 32768))
DIRTY=$((REGIONS * DIRTY_PERMILLE / 1000))
FIO_T=$((T + 60))

# shellcheck source=bench/lib.sh
. "$BENCH_DIR/lib.sh"
bench_workdir mirror

[ -n "${SKIP_BUILD:-}" ] || timeout 1200 cargo build --release --bins --quiet
export PATH=${BIN:-$ROOT/target/release}:$PATH

if [ "$QUIET_WAIT" -gt 0 ]; then
    waited=0
    while awk '{exit !($1 >= 0.6)}' /proc/loadavg && [ "$waited" -lt "$QUIET_WAIT" ]; do
        sleep 20; waited=$((waited + 20))
    done
    log "waited ${waited}s for a quiet machine"
fi
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
log "load average at start: $LOAD_START; work directory $W"

NBD_A=$(free_port); NBD_B=$(free_port); GM_A=$(free_udp); GM_B=$(free_udp)
URI="nbd://127.0.0.1:$NBD_A/data10gmd"

cd "$W"
gmdctl genkey cluster.key >/dev/null
mkdir -p alpha beta

write_config() { # mode sync_rate_kib
    sed -e "s/256MiB/$SIZE/" \
        -e "s/127.0.0.1:10809/127.0.0.1:$NBD_A/" -e "s/127.0.0.1:10810/127.0.0.1:$NBD_B/" \
        -e "s/127.0.0.1:6755/127.0.0.1:$GM_A/" -e "s/127.0.0.1:6756/127.0.0.1:$GM_B/" \
        -e "s/^mode = \"mwc\"/mode = \"$1\"/" -e "s/^sync_rate_kib = 32/sync_rate_kib = $2/" \
        -e "s/^hwm_kib = 128/hwm_kib = $HWM_KIB/" \
        "$ROOT/examples/loopback.toml" > cluster.toml
    if [ "$1" = async ]; then
        sed -i -e 's|^state_map = "alpha/data10.sm"|&\nrole = "primary"|' \
               -e 's|^state_map = "beta/data10.sm"|&\nrole = "secondary"|' cluster.toml
    fi
}
GMDD_TIMEOUT=3600
stat_json() { timeout 30 gmdstat --socket "$W/alpha.sock" -l data10gmd --json; }
wait_until() { # seconds what command...
    local n=$(($1 * 5)) what=$2; shift 2
    for _ in $(seq "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
    echo "timed out waiting for $what" >&2; return 1
}
connected() { [ "$(status_field alpha 'd["link"]["connected"]')" = "$1" ]; }
in_sync() {
    [ "$(status_field alpha 'd["link"]["connected"] and d["link"]["resync_remaining"]==0 and d["map"]["stale"]==0 and d["map"]["inconsistent"]==0')" = True ]
}
# Starts a mode: fresh maps on both machines, alpha alone (peer recorded down),
# then beta unless standalone; waits until they mirror in sync.
start_mode() { # config-mode sync_rate_kib [standalone]
    write_config "$1" "$2"
    # The two images are made identical first: both maps then declare the
    # same data (--zeroed gives both the same generation), so the pair
    # starts without a full copy.
    cp --sparse=never alpha/data10.img beta/data10.img
    ctl alpha init-state data10gmd --zeroed --force >/dev/null
    ctl beta init-state data10gmd --zeroed --force >/dev/null
    start_alpha_alone
    if [ "${3:-}" != standalone ]; then
        start_gmdd beta
        ctl beta configure data10gmd >/dev/null
        ctl beta start data10gmd >/dev/null
        wait_until 120 "mirroring" connected True
        wait_until 120 "in sync" in_sync
    fi
}

# fio JSON → "clat_mean_us iops bw_KiB_s"
fio_run() { # name rw bs qd size extra...
    local name=$1 rw=$2 bs=$3 qd=$4 size=$5; shift 5
    timeout "$FIO_T" fio --name="$name" --rw="$rw" --bs="$bs" --iodepth="$qd" --size="$size" \
        --runtime="$T" --time_based --randrepeat=0 --norandommap \
        --output-format=json "$@" > "$name.json"
    python3 - "$name.json" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
w = json.loads(text[text.index("{"):])["jobs"][0]["write"]
print(round(w["clat_ns"]["mean"] / 1000, 1), round(w["iops"]), w["bw"])
PY
}
# One sequential 1 MiB pass over the whole device; prints MiB/s.
warm() { # target-args...
    local t0 t1
    t0=$(date +%s.%N)
    timeout 600 fio --name=warm --rw=write --bs=1M --iodepth=16 --size="$SIZE" "$@" >/dev/null
    t1=$(date +%s.%N)
    python3 -c "print(round($BYTES / 1048576 / ($t1 - $t0)))"
}
snap() { stat_json > "$1.stat.json"; }
# map commits, pages written and local writes between two gmdstat snapshots.
map_delta() { # from to → "commits pages writes"
    python3 - "$1.stat.json" "$2.stat.json" <<'PY'
import json, sys
a, b = (json.load(open(p))["devices"][0] for p in sys.argv[1:3])
print(b["map_writes"]["commits"] - a["map_writes"]["commits"],
      b["map_writes"]["pages_written"] - a["map_writes"]["pages_written"],
      b["local"]["writes"] - a["local"]["writes"])
PY
}

TSV=$W/results.tsv
printf 'target\tcold_qd1_us\tcold_commits/writes\tqd1_clat_us\tqd32_iops\tseq1m_qd16_MiBs\twarm_MiBs\twarm_commits/writes\tsteady_commits/writes\tsteady_pages/writes\thot_commits/writes\thot_pages/writes\thwm_fallbacks\tsrtt_us\trtt64_us\trtt8k_us\n' > "$TSV"

log "allocating the backing files ($SIZE each)"
for m in alpha beta; do
    truncate -s "$SIZE" "$m/data10.img"
    timeout 600 fio --name=fill --filename="$m/data10.img" --rw=write --bs=1M --size="$SIZE" \
        --direct=1 --ioengine=io_uring --iodepth=16 >/dev/null
done

log "raw file baseline"
RAW=(--filename=alpha/data10.img --ioengine=io_uring --direct=1)
read -r RAW_LAT _ _ < <(fio_run raw-qd1 randwrite 4k 1 "$SIZE" "${RAW[@]}")
read -r _ RAW_IOPS _ < <(fio_run raw-qd32 randwrite 4k 32 "$SIZE" "${RAW[@]}")
read -r _ _ RAW_BW < <(fio_run raw-seq randwrite 1M 16 "$SIZE" "${RAW[@]}" --rw=write)
printf 'raw file\t-\t-\t%s\t%s\t%s\t-\t-\t-\t-\t-\t-\t-\t-\t-\t-\n' "$RAW_LAT" "$RAW_IOPS" "$((RAW_BW / 1024))" >> "$TSV"

NBD=(--ioengine=nbd --uri="$URI")
for mode in $MODES; do
    log "mode $mode"
    cfgmode=$mode; [ "$mode" = standalone ] && cfgmode=mwc
    start_mode "$cfgmode" 32 "$mode"
    RTT=-; RTT8=-
    if [ "$mode" != standalone ]; then
        # idle ping-pong round trips (avg of 200 per size): 64 B and 8 KiB
        ctl alpha netprobe beta --rounds 200 > "$mode.netprobe.txt" 2>&1 || true
        read -r RTT RTT8 < <(python3 - "$mode.netprobe.txt" <<'PY'
import re, sys
unit = {"ns": 0.001, "µs": 1, "us": 1, "ms": 1000, "s": 1e6}
rows = {}
for line in open(sys.argv[1]):
    m = re.match(r"\s*(\d+ (?:B|KiB|MiB))\s+\S+\s+([\d.]+)(ns|µs|us|ms|s)\b", line)
    if m:
        rows.setdefault(m.group(1), float(m.group(2)) * unit[m.group(3)])
print(round(rows.get("64 B", float("nan")), 1), round(rows.get("8 KiB", float("nan")), 1))
PY
)
    fi
    snap "$mode-0"
    read -r COLD_LAT _ _ < <(fio_run "$mode-cold" randwrite 4k 1 "$SIZE" "${NBD[@]}")
    snap "$mode-c"
    WARM=$(warm "${NBD[@]}")
    snap "$mode-1"
    read -r LAT _ _ < <(fio_run "$mode-qd1" randwrite 4k 1 "$SIZE" "${NBD[@]}")
    read -r _ IOPS _ < <(fio_run "$mode-qd32" randwrite 4k 32 "$SIZE" "${NBD[@]}")
    read -r _ _ BW < <(fio_run "$mode-seq" write 1M 16 "$SIZE" "${NBD[@]}")
    snap "$mode-2"
    fio_run "$mode-hot" randwrite 4k 32 "$HOT" "${NBD[@]}" >/dev/null
    snap "$mode-3"
    SRTT=-
    if [ "$mode" != standalone ]; then
        SRTT=$(ctl alpha netstat --json -c 1 | python3 -c '
import json,sys; d=json.loads(sys.stdin.readline())
print(min(p["srtt_us"] for p in d["paths"] if p["peer"]=="beta"))')
    fi
    FALLBACKS=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["devices"][0]["backlog"]["hwm_fallbacks"])' "$mode-3.stat.json")
    read -r cc_ _ cn_ < <(map_delta "$mode-0" "$mode-c")
    read -r wc_ _ wn_ < <(map_delta "$mode-c" "$mode-1")
    read -r sc_ sp_ sn_ < <(map_delta "$mode-1" "$mode-2")
    read -r hc_ hp_ hn_ < <(map_delta "$mode-2" "$mode-3")
    printf '%s\t%s\t%s/%s\t%s\t%s\t%s\t%s\t%s/%s\t%s/%s\t%s/%s\t%s/%s\t%s/%s\t%s\t%s\t%s\t%s\n' "$mode" "$COLD_LAT" "$cc_" "$cn_" "$LAT" "$IOPS" "$((BW / 1024))" \
        "$WARM" "$wc_" "$wn_" "$sc_" "$sn_" "$sp_" "$sn_" "$hc_" "$hn_" "$hp_" "$hn_" "$FALLBACKS" "$SRTT" "$RTT" "$RTT8" >> "$TSV"
    stop_gmdd beta; stop_gmdd alpha
done

# Resync of 1 % dirty regions vs rsync.
log "resync: making both images identical"
cp --sparse=never alpha/data10.img beta/data10.img
sync
RESYNC_TSV=$W/resync.tsv
: > "$RESYNC_TSV"
first=1
for rate in $RATES; do
    log "resync at sync_rate_kib $rate"
    start_mode mwc "$rate"
    stop_gmdd beta
    wait_until 60 "alpha alone" connected False
    timeout 120 fio --name=dirty --rw=randwrite --bs=32k --size="$SIZE" --number_ios="$DIRTY" \
        --iodepth=8 --randrepeat=0 "${NBD[@]}" >/dev/null
    STALE=$(status_field alpha 'd["map"]["stale"]')
    if [ "$first" = 1 ]; then cp --sparse=never beta/data10.img stale.img; sync; fi
    before=$(grep -c "resync finished" alpha.log || true)
    T0=$(date +%s.%N)
    start_gmdd beta
    for _ in $(seq 3000); do
        [ "$(grep -c "resync finished" alpha.log || true)" -gt "$before" ] && break; sleep 0.02
    done
    T1=$(date +%s.%N)
    wait_until 120 "in sync" in_sync
    # Times from the log lines: gmdd logs RFC 3339 timestamps first.
    python3 - "$T0" "$T1" "$rate" "$STALE" alpha.log "$before" >> "$RESYNC_TSV" <<'PY'
import sys, re, datetime
t0, t1, rate, stale, path, before = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6])
lines = open(path, errors="replace").read().splitlines()
def ts(line):
    m = re.search(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)(Z|[+-]\d\d:?\d\d)?", line)
    if not m:
        return None
    s = m.group(1)
    if "." in s:
        head, frac = s.split(".")
        s = head + "." + frac[:6]
    z = m.group(2) or "Z"
    if z == "Z":
        z = "+00:00"
    return datetime.datetime.fromisoformat(s + z).timestamp()
fin = [l for l in lines if "resync finished" in l]
tf = ts(fin[before]) if len(fin) > before else None
# the "mirroring" line that precedes this resync's end: when the link came up
mir = None
if tf is not None:
    for l in lines:
        if "mirroring device=" in l:
            t = ts(l)
            if t is not None and t0 - 1 <= t <= tf:
                mir = t
end = tf if tf is not None and tf >= t0 - 0.5 else t1
total = end - t0
transfer = (end - mir) if mir is not None else float("nan")
print(f"{rate}\t{stale}\t{total:.3f}\t{transfer:.3f}\t{t1 - t0:.3f}")
PY
    stop_gmdd beta; stop_gmdd alpha
    cmp alpha/data10.img beta/data10.img >/dev/null && echo same > "same-$rate" || echo DIFFER > "same-$rate"
    first=0
done

log "rsync --inplace --no-whole-file baseline"
sync
R0=$(date +%s.%N)
# --ignore-times: the two images have the same size and may have the same
# modification time, and rsync would skip the copy on that alone.
timeout 600 rsync --inplace --no-whole-file --ignore-times alpha/data10.img stale.img
R1=$(date +%s.%N)
RSYNC_S=$(python3 -c "print(round($R1 - $R0, 3))")
# the stale copy is from the first resync; later passes changed other regions
RSYNC_OK=$(cmp -s alpha/data10.img stale.img && echo same || echo DIFFER)
if [ "$RSYNC_OK" != same ]; then
  echo "mirror.sh: the rsync baseline did not make the copies identical; its time means nothing" >&2
  exit 1
fi
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

python3 - "$TSV" "$RESYNC_TSV" "$RSYNC_S" "$RAW_LAT" "$W" "$T" "$SIZE" "$HOT" "$DIRTY" "$REGIONS" "$RSYNC_OK" <<'PY'
import csv, sys, math, os
tsv, rtsv, rsync_s, raw_lat, w, t, size, hot, dirty, regions, rsync_ok = sys.argv[1:]
rsync_s, raw_lat = float(rsync_s), float(raw_lat)
rows = {r["target"]: r for r in csv.DictReader(open(tsv), delimiter="\t")}
raw, sa = rows["raw file"], rows.get("standalone")
f = lambda r, k: float(r[k])
# Ratio to standalone, or "-" when MODES left standalone out.
xsa = lambda r, k: f"{f(r, k) / f(sa, k):>5.2f}x" if sa else f"{'-':>6}"
def frac(s):
    a, b = map(float, s.split("/"))
    return f"{a/b:.4f} ({int(a)}/{int(b)})" if b else "-"
print(f"\nmirror.sh: {t} s per point, device {size}, hot set {hot}, loopback\n")
print(f"{'target':<11} {'4k QD1 us':>9} {'x raw':>6} {'x sa':>6} {'4k QD32 IOPS':>12} {'x raw':>6} {'x sa':>6} {'1M QD16 MiB/s':>13} {'x raw':>6} {'x sa':>6} {'warm MiB/s':>10}")
for name in [n for n in ["raw file", "standalone", "sync", "mwc", "async"] if n in rows]:
    r = rows[name]
    print(f"{name:<11} {f(r,'qd1_clat_us'):>9.1f} {f(r,'qd1_clat_us')/f(raw,'qd1_clat_us'):>5.2f}x {xsa(r,'qd1_clat_us')}"
          f" {f(r,'qd32_iops'):>12.0f} {f(r,'qd32_iops')/f(raw,'qd32_iops'):>5.2f}x {xsa(r,'qd32_iops')}"
          f" {f(r,'seq1m_qd16_MiBs'):>13.0f} {f(r,'seq1m_qd16_MiBs')/f(raw,'seq1m_qd16_MiBs'):>5.2f}x {xsa(r,'seq1m_qd16_MiBs')}"
          f" {r['warm_MiBs']:>10}")
print(f"\nfirst touch: 4k randwrite QD1 over the whole cold device ({t} s; raw file {raw_lat:.1f} us)")
print(f"{'mode':<11} {'QD1 us':>9} {'x raw':>6} {'map commits/writes':>24}")
for name in [n for n in ["standalone", "sync", "mwc", "async"] if n in rows]:
    r = rows[name]
    print(f"{name:<11} {f(r,'cold_qd1_us'):>9.1f} {f(r,'cold_qd1_us')/raw_lat:>5.2f}x {frac(r['cold_commits/writes']):>24}")
print(f"\nstate map writes per data write (commits/writes; pages/writes)")
print(f"{'mode':<11} {'warm-up pass':>22} {'measured points':>24} {'pages':>8} {'hot set '+hot:>22} {'pages':>8} {'HWM fallbacks':>13} {'srtt us':>8}")
for name in [n for n in ["standalone", "sync", "mwc", "async"] if n in rows]:
    r = rows[name]
    pg = lambda k: (lambda a, b: f"{a/b:.4f}" if b else "-")(*map(float, r[k].split("/")))
    print(f"{name:<11} {frac(r['warm_commits/writes']):>22} {frac(r['steady_commits/writes']):>24} {pg('steady_pages/writes'):>8}"
          f" {frac(r['hot_commits/writes']):>22} {pg('hot_pages/writes'):>8} {r['hwm_fallbacks']:>13} {r['srtt_us']:>8}")
print(f"\nresync of {dirty} of {regions} regions (32 KiB) vs rsync --inplace --no-whole-file ({rsync_s:.2f} s, result {rsync_ok})")
print(f"{'sync_rate_kib':>13} {'stale':>6} {'start->finished s':>18} {'link up->finished s':>20} {'rsync/resync':>13} {'images':>7}")
best = 0
for line in open(rtsv):
    rate, stale, total, transfer, polled = line.split("\t")
    same = open(os.path.join(w, f"same-{rate}")).read().strip()
    ratio = rsync_s / float(total)
    best = max(best, ratio)
    print(f"{rate:>13} {stale:>6} {float(total):>18.3f} {float(transfer):>20.3f} {ratio:>12.1f}x {same:>7}")
print("\ngoals")
if "async" in rows and sa:
    a_ratio = f(rows["async"], "seq1m_qd16_MiBs") / f(sa, "seq1m_qd16_MiBs")
    print(f"  async 1M throughput / standalone = {a_ratio:.2f}x (goal >= 0.9x): {'met' if a_ratio >= 0.9 else 'NOT met'}"
          f"; HWM fallbacks {rows['async']['hwm_fallbacks']}")
if "mwc" in rows:
    mwc = rows["mwc"]
    rtt = float(mwc["rtt64_us"])
    rtt8 = float(mwc["rtt8k_us"])
    mlat = f(mwc, "qd1_clat_us")
    print(f"  (idle GeoMessage round trip, netprobe, avg of 200, in the mwc run: 64 B {rtt:.0f} us, 8 KiB {rtt8:.0f} us;"
          f" smoothed RTT after the runs, netstat: {mwc['srtt_us']} us)")
    bounds = [("raw local write", "RTT 64 B", rtt, raw_lat), ("raw local write", "RTT 8 KiB", rtt8, raw_lat)]
    if sa:
        bounds.append(("standalone gmd write", "RTT 64 B", rtt, f(sa, "qd1_clat_us")))
    for label, rl, r_, loc in bounds:
        bound = max(loc, r_ + loc)
        print(f"  mwc QD1 {mlat:.1f} us vs max({label} {loc:.1f}, {rl} {r_:.0f} + remote write ~{loc:.1f}) = {bound:.1f} us:"
              f" {mlat/bound:.2f}x (goal <= 1.1x): {'met' if mlat <= 1.1*bound else 'NOT met'}")
for name in [n for n in ["sync", "mwc", "async"] if n in rows]:
    a, b = map(float, rows[name]["hot_commits/writes"].split("/"))
    print(f"  {name} map commits per write, 4k randwrite in {hot}: {a/b:.4f} = 1/{b/max(a,1):.0f} (goal <= 1/64): {'met' if a/b <= 1/64 else 'NOT met'}")
print(f"  resync vs rsync: best {best:.1f}x (goal >= 20x): {'met' if best >= 20 else 'NOT met'}")
PY
echo
echo "load average: start $LOAD_START, end $LOAD_END"
echo "results: $TSV"
[ -z "${RESULTS:-}" ] || cp "$TSV" "$RESYNC_TSV" "$RESULTS"/
