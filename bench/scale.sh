#!/usr/bin/env bash
# Scale of one machine: a large device (default 4 TiB, sparse files) with a
# fraction of its 32 KiB regions stale (default 1 %), two gmdd on loopback.
#
#  1. both sides initialised --zeroed; alpha starts alone (beta recorded
#     down), becomes primary;
#  2. fio (nbd engine) writes 4 KiB into every (1000 / STALE_PERMILLE)-th
#     region through alpha's export: those regions are marked stale;
#  3. beta is started: measured are configure + start time, the time until
#     the handshake is done and the resync runs (the offer carries the
#     stale regions as packed runs), the resync's region count (must be
#     exactly the stale ones), the resync rate over RESYNC_SECONDS, and both
#     gmdd's resident memory;
#  4. `gmdstat -A` time, and the baseline: the same start with a clean map.
#
# The resync is not run to its end by default (1 % of 4 TiB is 43 GB of
# copies): RESYNC_SECONDS bounds it. Prints one table; results.tsv in the
# work directory.
#
# Usage: bench/scale.sh
# Environment: SIZE (default 4T), STALE_PERMILLE (default 10 = 1 %),
#   RESYNC_SECONDS (default 20), KEEP=1, SKIP_BUILD=1.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v fio >/dev/null || { echo "scale.sh needs fio (apt-get install fio)" >&2; exit 1; }
SIZE=${SIZE:-4T}
STALE_PERMILLE=${STALE_PERMILLE:-10}
RESYNC_SECONDS=${RESYNC_SECONDS:-20}
ROOT=$PWD
BYTES=$(numfmt --from=iec "$SIZE")
REGIONS=$((BYTES / 32768))
STRIDE=$((32768 * 1000 / STALE_PERMILLE))
WRITES=$((BYTES / STRIDE))

# shellcheck source=bench/lib.sh
. "$PWD/bench/lib.sh"
bench_workdir scale
W0=$W

[ -n "${SKIP_BUILD:-}" ] || timeout 1200 cargo build --release --bins --quiet
export PATH=$ROOT/target/release:$PATH
cd "$W"
sed -e "s/^size = .*/size = \"$SIZE\"/" \
    -e 's/127.0.0.1:10809/127.0.0.1:13809/; s/127.0.0.1:10810/127.0.0.1:13810/' \
    -e 's/127.0.0.1:6755/127.0.0.1:8755/; s/127.0.0.1:6756/127.0.0.1:8756/' \
    "$ROOT/examples/loopback.toml" > cluster.toml
gmdctl genkey cluster.key >/dev/null
mkdir -p alpha beta
truncate -s "$BYTES" alpha/data10.img beta/data10.img
ctl() { local m=$1; shift; timeout 120 gmdctl --config cluster.toml --machine "$m" --socket "$W/$m.sock" "$@"; }
start_gmdd() {
    timeout 3600 gmdd --config cluster.toml --machine "$1" --socket "$W/$1.sock" 2>>"$1.log" &
    PID[$1]=$!
    for _ in $(seq 200); do [ -S "$1.sock" ] && return 0; sleep 0.05; done
    echo "gmdd $1 did not start" >&2; exit 1
}
rss_mib() { # gmdd runs under timeout(1): its child
    local pid
    pid=$(pgrep -P "${PID[$1]}" -x gmdd || echo "${PID[$1]}")
    awk '/VmRSS/ {printf "%.0f", $2 / 1024}' "/proc/$pid/status"
}
now() { date +%s.%N; }
status_json() { ctl "$1" status data10gmd --json; }
field() { python3 -c "import json,sys; d=json.load(sys.stdin)[0]; print(eval(sys.argv[1]))" "$1"; }

ctl alpha init-state data10gmd --zeroed >/dev/null
ctl beta init-state data10gmd --zeroed >/dev/null
start_gmdd alpha
start_gmdd beta
t0=$(now)
ctl alpha configure data10gmd >/dev/null
ctl alpha down data10gmd beta >/dev/null
ctl alpha start data10gmd >/dev/null 2>&1
ctl alpha primary data10gmd >/dev/null
t_alpha=$(python3 -c "print(f'{$(now) - $t0:.2f}')")
log "alpha up alone in ${t_alpha} s; writing 4 KiB into $WRITES regions (every $((STRIDE / 32768))th)"
t0=$(now)
timeout 1800 fio --name=scatter --ioengine=nbd --uri=nbd://127.0.0.1:13809/data10gmd \
    --rw=write:$((STRIDE - 4096)) --bs=4k --iodepth=32 --number_ios="$WRITES" \
    --size="$BYTES" --output-format=terse >/dev/null
t_fio=$(python3 -c "print(f'{$(now) - $t0:.1f}')")
stale=$(status_json alpha | field 'd["map"]["stale"]')
log "$stale regions stale after ${t_fio} s of fio"
rss_alpha_before=$(rss_mib alpha)

t0=$(now)
ctl beta configure data10gmd >/dev/null
ctl beta start data10gmd >/dev/null 2>&1
t_start=$(python3 -c "print(f'{$(now) - $t0:.2f}')")
for _ in $(seq 1200); do
    status_json alpha | field 'd["link"] is not None and d["link"]["connected"]' | grep -q True && break
    sleep 0.1
done
t_connected=$(python3 -c "print(f'{$(now) - $t0:.2f}')")
total=$(status_json alpha | field 'd["link"]["resync_total"]')
log "beta started in ${t_start} s, connected after ${t_connected} s, resync of $total regions"
sleep "$RESYNC_SECONDS"
left=$(status_json alpha | field 'd["link"]["resync_remaining"]')
rate=$(python3 -c "print(f'{($total - $left) * 32 / 1024 / $RESYNC_SECONDS:.1f}')")
rss_alpha=$(rss_mib alpha)
rss_beta=$(rss_mib beta)
t0=$(now)
gmdstat --socket "$W/alpha.sock" -A >/dev/null
t_stat=$(python3 -c "print(f'{$(now) - $t0:.3f}')")

printf '\nscale: %s device (%s regions), %s %%o stale, two gmdd on loopback\n' "$SIZE" "$REGIONS" "$STALE_PERMILLE"
printf '%-46s %s\n' \
    "alpha configure + down + start + primary (s)" "$t_alpha" \
    "fio: 4 KiB into $WRITES regions (s)" "$t_fio" \
    "stale regions on alpha" "$stale" \
    "beta configure + start (s)" "$t_start" \
    "beta start to handshake done (s)" "$t_connected" \
    "resync regions (= stale: $stale)" "$total" \
    "resync rate over ${RESYNC_SECONDS} s (MiB/s)" "$rate" \
    "gmd RSS alpha before/after handshake (MiB)" "$rss_alpha_before / $rss_alpha" \
    "gmd RSS beta (MiB)" "$rss_beta" \
    "gmdstat -A (s)" "$t_stat" | tee results.tsv
[ "$total" = "$stale" ] || { echo "scale: the resync covers $total regions, not the $stale stale ones" >&2; exit 1; }

# Part 2: many devices on one gmdd, all mirrored.
DEVICES=${DEVICES:-64}
log "part 2: $DEVICES devices of 64 MiB on each gmdd, all mirrored"
for m in "${!PID[@]}"; do kill "${PID[$m]}" 2>/dev/null || true; done
wait 2>/dev/null || true
PID=()
rm -rf "$W/many" && mkdir -p "$W/many" && cd "$W/many"
cp ../cluster.key .
python3 - "$ROOT/examples/loopback.toml" "$DEVICES" > cluster.toml <<'PY'
import re, sys
text = open(sys.argv[1]).read()
head = text[: text.index("[devices.data10gmd]")]
head = head.replace("127.0.0.1:10809", "127.0.0.1:13809").replace("127.0.0.1:10810", "127.0.0.1:13810")
head = head.replace("127.0.0.1:6755", "127.0.0.1:8755").replace("127.0.0.1:6756", "127.0.0.1:8756")
out = [head]
for i in range(int(sys.argv[2])):
    out.append(f'''[devices.d{i}gmd]
minor = {i + 10}
mode = "mwc"
role = "none"
size = "64MiB"
export = ["nbd"]

[devices.d{i}gmd.machines.alpha]
data = "alpha/d{i}.img"
state_map = "alpha/d{i}.sm"

[devices.d{i}gmd.machines.beta]
data = "beta/d{i}.img"
state_map = "beta/d{i}.sm"
''')
print("\n".join(out))
PY
mkdir -p alpha beta
for i in $(seq 0 $((DEVICES - 1))); do
    truncate -s 64M "alpha/d$i.img" "beta/d$i.img"
    ctl alpha init-state "d${i}gmd" --zeroed >/dev/null
    ctl beta init-state "d${i}gmd" --zeroed >/dev/null
done
W=$W/many
start_gmdd alpha
start_gmdd beta
t0=$(now)
ctl alpha configure -A >/dev/null
ctl beta configure -A >/dev/null
for i in $(seq 0 $((DEVICES - 1))); do ctl alpha down "d${i}gmd" beta >/dev/null; done
ctl alpha start -A >/dev/null 2>&1
ctl beta start -A >/dev/null 2>&1
for i in $(seq 0 $((DEVICES - 1))); do ctl alpha primary "d${i}gmd" >/dev/null 2>&1; done
mirrored=0
for _ in $(seq 600); do
    mirrored=$(ctl alpha status --json | python3 -c 'import json,sys; print(sum(1 for d in json.load(sys.stdin) if d["link"] and d["link"]["connected"]))')
    [ "$mirrored" -ge "$DEVICES" ] && break
    sleep 0.2
done
t_many=$(python3 -c "print(f'{$(now) - $t0:.1f}')")
best=99
for _ in 1 2 3; do
    t0=$(now)
    gmdstat --socket "$W/alpha.sock" -A >/dev/null
    t=$(python3 -c "print(f'{$(now) - $t0:.3f}')")
    best=$(python3 -c "print(min($best, $t))")
done
printf '%-46s %s\n' \
    "$DEVICES devices: configure to all mirrored (s)" "$t_many" \
    "devices mirroring" "$mirrored / $DEVICES" \
    "gmdstat -A with $DEVICES devices, best of 3 (s)" "$best" \
    "gmd RSS alpha with $DEVICES devices (MiB)" "$(rss_mib alpha)" | tee -a "$W0/results.tsv"
[ "$mirrored" -ge "$DEVICES" ] || { echo "scale: only $mirrored of $DEVICES devices mirror" >&2; exit 1; }
