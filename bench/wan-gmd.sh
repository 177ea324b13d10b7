#!/usr/bin/env bash
# Two gmdd across the emulated WAN (called by bench/wan.sh with gmd-wan up):
# alpha in namespace NS_A (10.77.0.1), beta in NS_B (10.77.0.2), a SIZE
# device (default 1 GiB) backed by files.
#   1. resync: init-state without --zeroed on both, alpha primary --force,
#      beta started: the whole device is copied; timed from beta's start to
#      in sync. Default configuration: no sync_rate_kib (adaptive window).
#   2. mwc 4 KiB random writes at QD32 (fio's nbd engine in NS_A), T s.
#   3. async 1 MiB sequential writes at QD16 with hwm_kib from
#      `gmdctl sizing --link --rtt-ms` (2 x BDP), T s.
# Prints one `figures:` line per case for bench/wan.sh.
#
# Usage: bench/wan-gmd.sh NS_A NS_B RATE_MBIT RTT_MS   (root; binaries in
#   target/release). Environment: SIZE (default 1G), T (default 15), KEEP=1,
#   CASES (default "resync mwc async"; without resync, mwc starts from
#   zeroed maps), REPEAT (default 1: runs of each of the mwc and async cases),
#   DATAGRAM (datagram_size; default auto: unset, discovered per path).
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH_DIR=$PWD/bench
NS_A=$1 NS_B=$2 RATE=$3 RTT=$4
SIZE=${SIZE:-1G}
T=${T:-15}
CASES=${CASES:-resync mwc async}
REPEAT=${REPEAT:-1}
ROOT=$PWD
BYTES=$(numfmt --from=iec "$SIZE")
LINK_BPS=$(awk "BEGIN { print $RATE * 1e6 / 8 }")
export PATH=$ROOT/target/release:$PATH
# shellcheck source=bench/lib.sh
. "$BENCH_DIR/lib.sh"
bench_workdir wan
cd "$W"
gmdctl genkey cluster.key >/dev/null
mkdir -p alpha beta
truncate -s "$SIZE" alpha/data10.img beta/data10.img
HWM=$(gmdctl sizing --link "${RATE}Mbit" --rtt-ms "$RTT" | sed -n 's/.*hwm_kib = \([0-9]*\).*/\1/p')

write_config() { # mode
    # DATAGRAM=auto (the default): no datagram_size, each path discovers its own.
    local dgram='/^datagram_size = /d'
    [ "${DATAGRAM:-auto}" = auto ] || dgram="s/^datagram_size = .*/datagram_size = $DATAGRAM/"
    sed -e "s/256MiB/$SIZE/" -e "$dgram" \
        -e 's/127.0.0.1:6755/10.77.0.1:6755/' -e 's/127.0.0.1:6756/10.77.0.2:6756/' \
        -e "s/^mode = \"mwc\"/mode = \"$1\"/" -e '/^sync_rate_kib/d' \
        -e "s/^hwm_kib = 128/hwm_kib = $HWM/" \
        "$ROOT/examples/loopback.toml" > cluster.toml
    if [ "$1" = async ]; then
        sed -i -e 's|^state_map = "alpha/data10.sm"|&\nrole = "primary"|' \
               -e 's|^state_map = "beta/data10.sm"|&\nrole = "secondary"|' cluster.toml
    fi
}
ns_of() { [ "$1" = alpha ] && echo "$NS_A" || echo "$NS_B"; }
gmdd_prefix() { echo ip netns exec "$(ns_of "$1")"; }
wait_until() { # seconds what command...
    local n=$(($1 * 10)) what=$2; shift 2
    for _ in $(seq "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "timed out waiting for $what" >&2; return 1
}
connected() { [ "$(status_field alpha 'd["link"]["connected"]')" = True ]; }
in_sync() {
    [ "$(status_field alpha 'd["link"]["connected"] and d["link"]["resync_remaining"]==0 and d["map"]["stale"]==0 and d["map"]["inconsistent"]==0')" = True ]
}
# fio in NS_A against alpha's NBD export; prints "iops bw_KiB_s".
fio_nbd() { # name rw bs qd
    timeout $((T + 60)) ip netns exec "$NS_A" fio --name="$1" --rw="$2" --bs="$3" --iodepth="$4" \
        --size="$SIZE" --runtime="$T" --time_based --randrepeat=0 --norandommap \
        --ioengine=nbd --uri=nbd://127.0.0.1:10809/data10gmd --output-format=json > "$1.json"
    python3 - "$1.json" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
w = json.loads(text[text.index("{"):])["jobs"][0]["write"]
print(round(w["iops"]), w["bw"])
PY
}

has_case() { [[ " $CASES " == *" $1 "* ]]; }
# Stops both daemons, then starts a pair in MODE from maps that declare
# the identical (zeroed) files in sync.
restart_zeroed() { # mode
    ctl alpha stop data10gmd >/dev/null 2>&1 || true
    ctl beta stop data10gmd >/dev/null 2>&1 || true
    stop_gmdd alpha 2>/dev/null || true
    stop_gmdd beta 2>/dev/null || true
    write_config "$1"
    ctl alpha init-state data10gmd --zeroed --force >/dev/null
    ctl beta init-state data10gmd --zeroed --force >/dev/null
    start_alpha_alone
    start_gmdd beta
    ctl beta configure data10gmd >/dev/null
    ctl beta start data10gmd >/dev/null
}

# 1. Full resync of the device, default configuration.
if has_case resync; then
write_config mwc
ctl alpha init-state data10gmd --force >/dev/null
ctl beta init-state data10gmd --force >/dev/null
start_alpha_alone --force
start_gmdd beta
ctl beta configure data10gmd >/dev/null
t0=$(date +%s.%N)
ctl beta start data10gmd >/dev/null
if wait_until 60 "mirroring" connected && wait_until 300 "resync of $SIZE" in_sync; then
    t1=$(date +%s.%N)
    python3 -c "
s = $t1 - $t0; r = $BYTES / s
print(f'  resync {$BYTES >> 20} MiB: {s:.1f} s, {r / 2**20:.1f} MiB/s = {r / $LINK_BPS:.2f} of the link')
print(f'figures: resync_link={r / $LINK_BPS:.3f}')"
    ctl alpha netstat 2>/dev/null | sed 's/^/  /' | head -8 || true
else
    echo "  resync did not finish in 300 s"
    echo "figures: resync_link=n/a(not-finished-in-300s)"
fi
elif has_case mwc; then
    # The files are identical (both zero): fresh maps declare them so.
    restart_zeroed mwc
    wait_until 60 "mirroring" connected || true
fi

# 2. mwc 4 KiB QD32 random writes (in sync now).
if has_case mwc; then
for _ in $(seq "$REPEAT"); do
if in_sync; then
    read -r IOPS _ < <(fio_nbd mwc-qd32 randwrite 4k 32)
    python3 -c "
goal = 0.9 * 32 / ($RTT / 1000)
print(f'  mwc 4 KiB QD32: {$IOPS} writes/s, goal 0.9 x 32 / RTT = {goal:.0f} ({$IOPS / goal:.2f}x)')
print(f'figures: mwc_qd32_iops={$IOPS} mwc_qd32_goal={goal:.0f}')"
else
    echo "figures: mwc_qd32_iops=n/a(not-in-sync)"
fi
done
fi

# 3. async sustained 1 MiB writes with hwm_kib = 2 x BDP. The images are
#    identical after the resync (or both still zero): fresh maps declare
#    them so. Each run starts a fresh pair.
if has_case async; then
for _ in $(seq "$REPEAT"); do
restart_zeroed async
if wait_until 60 "mirroring (async)" connected; then
    read -r _ BW < <(fio_nbd async-seq write 1M 16)
    python3 -c "
r = $BW * 1024
print(f'  async 1 MiB QD16, hwm_kib {$HWM}: {r / 2**20:.1f} MiB/s = {r / $LINK_BPS:.2f} of the link')
print(f'figures: async_link={r / $LINK_BPS:.3f} async_hwm_kib=$HWM')"
    ctl alpha netstat 2>/dev/null | sed 's/^/  /' || true
    status_field alpha 'd["backlog"]' 2>/dev/null | sed 's/^/  backlog /' || true
else
    echo "figures: async_link=n/a(async-pair-did-not-connect)"
fi
done
fi
ctl alpha stop data10gmd >/dev/null 2>&1 || true
ctl beta stop data10gmd >/dev/null 2>&1 || true
