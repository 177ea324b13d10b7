#!/usr/bin/env bash
# GeoMessage vs TCP across an emulated WAN, in one run: starts gmd-wan
# (bench/wan/README.md) with the given round trip and rate in two fresh
# namespaces, runs `gmd-net-bench all` in side A with its servers in side B,
# prints its table (bulk TCP vs GeoMessage encrypted, authenticated-only and
# with 1 % injected receive loss; small round trips) and the link's counters,
# then removes the namespaces.
#
# Bounded: GIB per bulk case (default 0.25), REPEAT runs (default 1), ROUNDS
# round trips (default 200), 120 s per case, 900 s in all.
#
# Usage: bench/wan.sh [RTT_MS] [RATE_MBIT]      (default 50 200)
# Environment: GIB, REPEAT, ROUNDS, DATAGRAM (GeoMessage datagram bytes,
#   default 1400: one IP packet at MTU 1500), LOSS and REORDER (gmd-wan
#   --loss/--reorder, default 0), QUEUE_BDP (default 1), SKIP_BUILD=1.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "wan.sh needs root (network namespaces, TUN)" >&2; exit 1; }
RTT=${1:-50}
RATE=${2:-200}
GIB=${GIB:-0.25}
REPEAT=${REPEAT:-1}
ROUNDS=${ROUNDS:-200}
FAIR_SECS=${FAIR_SECS:-15}
DATAGRAM=${DATAGRAM:-1400}
NS_A=wanbench$$a
NS_B=wanbench$$b
[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --release -q -p gmd-wan -p gmd-net-bench
LOG=$(mktemp)
target/release/gmd-wan up --ns-a "$NS_A" --ns-b "$NS_B" \
    --delay-ms "$(awk "BEGIN { print $RTT / 2 }")" --rate-mbit "$RATE" \
    --loss "${LOSS:-0}" --reorder "${REORDER:-0}" --queue-bdp "${QUEUE_BDP:-1}" > "$LOG" 2>&1 &
WAN=$!
cleanup() {
    kill -TERM "$WAN" 2>/dev/null || true
    wait "$WAN" 2>/dev/null || true
    cat "$LOG"
    rm -f "$LOG"
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
OUT=$(mktemp)
timeout 900 ip netns exec "$NS_A" target/release/gmd-net-bench all \
    --gib "$GIB" --repeat "$REPEAT" --datagram "$DATAGRAM" --rtt-rounds "$ROUNDS" \
    --addr0 10.77.0.1 --addr1 10.77.0.2 --server-netns "$NS_B" --tcp-cc "$TCP_CC" $INJ | tee -a "$OUT"
timeout 120 ip netns exec "$NS_A" target/release/gmd-net-bench fair \
    --secs "$FAIR_SECS" --link-mbit "$RATE" --datagram "$DATAGRAM" \
    --addr0 10.77.0.1 --addr1 10.77.0.2 --server-netns "$NS_B" --tcp-cc "$TCP_CC" | tee -a "$OUT"
