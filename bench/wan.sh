#!/usr/bin/env bash
# GeoMessage vs TCP across an emulated WAN, in one run: starts gmd-wan
# (bench/wan/README.md) with the given round trip and rate in two fresh
# namespaces, runs `gmd-net-bench all` in side A with its servers in side B,
# prints its table (bulk TCP vs GeoMessage encrypted, authenticated-only and
# with 1 % injected receive loss; small round trips) and the link's counters,
# then removes the namespaces.
#
# Then a TCP stream and GeoMessage together for FAIR_SECS (default 15) and,
# unless GMD=0, two gmdd across the link (bench/wan-gmd.sh: resync of SIZE,
# default 1 GiB; mwc 4 KiB QD32; async 1 MiB writes with hwm_kib = 2 x BDP).
# Ends with one `summary:` line per figure and
#   wan: resync_link_ratio=<x> async_link_ratio=<x> geomsg_vs_tcp=<x>
# (n/a with the reason for a figure not measured).
#
# Bounded: GIB per bulk case (default 0.1, 0.02 with LOSS: TCP CUBIC at
# 0.5 % loss and 50 ms moves ~0.4 MiB/s), REPEAT runs (default 1), ROUNDS
# round trips (default 200), 120 s per case, 900 s for the bulk cases and
# 900 s for the gmdd cases. TCP is Linux CUBIC (TCP_CC) on the bench's
# sockets; INJECTED=1 adds GeoMessage's own 1 % injected-loss case.
#
# Usage: bench/wan.sh [RTT_MS] [RATE_MBIT]      (default 50 200)
# Environment: GIB, REPEAT, ROUNDS, DATAGRAM (GeoMessage datagram bytes;
#   default auto: discovered per path, as gmdd does with no datagram_size,
#   1 472 on the 1 500-byte link; 1400 pins the size of earlier runs),
#   LOSS and REORDER (gmd-wan
#   --loss/--reorder, default 0), QUEUE_BDP (default 1), SKIP_BUILD=1.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "wan.sh needs root (network namespaces, TUN)" >&2; exit 1; }
RTT=${1:-50}
RATE=${2:-200}
GIB=${GIB:-$(awk "BEGIN { print (${LOSS:-0} > 0) ? 0.02 : 0.1 }")}
REPEAT=${REPEAT:-1}
ROUNDS=${ROUNDS:-200}
FAIR_SECS=${FAIR_SECS:-15}
GMD=${GMD:-1}
DATAGRAM=${DATAGRAM:-auto}
export DATAGRAM
NS_A=wanbench$$a
NS_B=wanbench$$b
[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --release -q -p gmd-wan -p gmd-net-bench -p gmdd -p gmdctl
LOG=$(mktemp)
OUT=$(mktemp)
target/release/gmd-wan up --ns-a "$NS_A" --ns-b "$NS_B" \
    --delay-ms "$(awk "BEGIN { print $RTT / 2 }")" --rate-mbit "$RATE" \
    --loss "${LOSS:-0}" --reorder "${REORDER:-0}" --queue-bdp "${QUEUE_BDP:-1}" > "$LOG" 2>&1 &
WAN=$!
# One line per figure, then the `wan:` line, from the `figures:` lines.
summary() {
    python3 - "$OUT" "$GMD" <<'PY'
import re, sys
f = {}
for line in open(sys.argv[1]):
    if line.startswith("figures:"):
        f.update(re.findall(r"(\w+)=(\S+)", line))
def num(k):
    try:
        return float(f[k])
    except (KeyError, ValueError):
        return None
def show(name, value, goal, why):
    if value is None:
        print(f"summary: {name}=n/a ({why})")
        return "n/a"
    ok = "met" if value >= goal else "NOT met"
    print(f"summary: {name}={value:.2f} (goal >= {goal}: {ok})")
    return f"{value:.2f}"
tcp, gm = num("tcp_Bps"), num("geomsg_Bps")
vs = show("geomsg_vs_tcp", gm / tcp if tcp and gm is not None else None, 1.0,
          "the bulk case did not run")
show("fair_share_tcp", num("fair_tcp_link"), 0.3, "the fair-share case did not run")
show("fair_share_geomsg", num("fair_geomsg_link"), 0.3, "the fair-share case did not run")
skipped = "GMD=0: two gmdd not run" if sys.argv[2] == "0" else f.get("resync_link", "not measured")
res = show("resync_link_ratio", num("resync_link"), 0.8, skipped)
asy = show("async_link_ratio", num("async_link"), 0.8,
           skipped if sys.argv[2] == "0" else f.get("async_link", "not measured"))
iops, goal = num("mwc_qd32_iops"), num("mwc_qd32_goal")
show("mwc_qd32_vs_goal", iops / goal if iops is not None and goal else None, 1.0,
     skipped if sys.argv[2] == "0" else f.get("mwc_qd32_iops", "not measured"))
print(f"wan: resync_link_ratio={res} async_link_ratio={asy} geomsg_vs_tcp={vs}")
PY
}
cleanup() {
    kill -TERM "$WAN" 2>/dev/null || true
    wait "$WAN" 2>/dev/null || true
    cat "$LOG"
    summary
    rm -f "$LOG" "$OUT"
}
trap cleanup EXIT
for _ in $(seq 100); do
    grep -q '^gmd-wan up' "$LOG" && break
    kill -0 "$WAN" 2>/dev/null || { echo "gmd-wan failed" >&2; exit 1; }
    sleep 0.1
done
# The TCP reference is Linux CUBIC unless TCP_CC says otherwise (the host
# default may be bbr): set on the bench's own sockets.
TCP_CC=${TCP_CC:-cubic}
date -u '+%F %T UTC'
echo "bench/wan.sh $RTT $RATE: GIB=$GIB REPEAT=$REPEAT ROUNDS=$ROUNDS DATAGRAM=$DATAGRAM LOSS=${LOSS:-0} REORDER=${REORDER:-0} TCP_CC=$TCP_CC"
INJ=--no-injected-loss
[ "${INJECTED:-0}" = 1 ] && INJ=
timeout 900 ip netns exec "$NS_A" target/release/gmd-net-bench all \
    --gib "$GIB" --repeat "$REPEAT" --datagram "$DATAGRAM" --rtt-rounds "$ROUNDS" \
    --addr0 10.77.0.1 --addr1 10.77.0.2 --server-netns "$NS_B" --tcp-cc "$TCP_CC" $INJ | tee -a "$OUT"
timeout 120 ip netns exec "$NS_A" target/release/gmd-net-bench fair \
    --secs "$FAIR_SECS" --link-mbit "$RATE" --datagram "$DATAGRAM" \
    --addr0 10.77.0.1 --addr1 10.77.0.2 --server-netns "$NS_B" --tcp-cc "$TCP_CC" | tee -a "$OUT"
if [ "$GMD" = 1 ]; then
    timeout 900 bench/wan-gmd.sh "$NS_A" "$NS_B" "$RATE" "$RTT" | tee -a "$OUT"
fi
