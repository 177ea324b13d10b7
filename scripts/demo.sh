#!/usr/bin/env bash
# A tour of gmd on file-backed defaults, in ./demo (nothing outside it).
#
# Sets up the example cluster (examples/loopback.toml) as a user would,
# starts gmdd for machine alpha with its peer beta recorded as down,
# writes through the NBD export with qemu-io, shows the state map and
# gmdstat, restarts gmdd and reads the data back.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEMO=$ROOT/demo
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

say "Building gmd (release)"
cargo build --release --bins --quiet
export PATH=$ROOT/target/release:$PATH

say "Setting up the example cluster in $DEMO"
if [ -S "$DEMO/alpha.sock" ]; then gmdctl --socket "$DEMO/alpha.sock" stop -A >/dev/null 2>&1 || true; fi
pkill -f "gmdd --config $DEMO/loopback.toml" 2>/dev/null || true
rm -rf "$DEMO" && mkdir -p "$DEMO" && cd "$DEMO"
cp "$ROOT/examples/loopback.toml" .
run gmdctl genkey cluster.key
run mkdir -p alpha beta
run truncate -s 256M alpha/data10.img beta/data10.img
CTL="gmdctl --config loopback.toml --machine alpha --socket $DEMO/alpha.sock"
run $CTL init-state data10gmd
run $CTL verify

say "Starting gmdd for machine alpha"
gmdd --config loopback.toml --machine alpha --socket "$DEMO/alpha.sock" 2> alpha.log &
GMDD=$!
trap 'kill $GMDD 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -S alpha.sock ] && break; sleep 0.05; done
run $CTL configure data10gmd
echo "(beta is not running: start must refuse and say what to do)"
$CTL start data10gmd || true
run $CTL down data10gmd beta
run $CTL start data10gmd
run $CTL status data10gmd

say "Writing through the NBD export with qemu-io"
URL=nbd://127.0.0.1:10809/data10gmd
run qemu-io -f raw "$URL" -c "write -P 0xa5 0 4M" -c "write -P 0x5a 100M 64k"
run gmdstat --socket "$DEMO/alpha.sock" -A
echo "(every written region is stale: it must go to beta when beta returns)"
$CTL show-state data10gmd || true

say "Restarting gmdd: the device comes back AVAILABLE with its data and map"
kill $GMDD; wait $GMDD || true
gmdd --config loopback.toml --machine alpha --socket "$DEMO/alpha.sock" 2>> alpha.log &
GMDD=$!
for _ in $(seq 100); do [ -S alpha.sock ] && break; sleep 0.05; done
sleep 0.2
run $CTL status data10gmd
run qemu-io -f raw "$URL" -c "read -P 0xa5 0 4M" -c "read -P 0x5a 100M 64k"

say "Stopping"
run $CTL stop data10gmd
run $CTL unconfigure data10gmd
kill $GMDD; wait $GMDD || true
trap - EXIT
echo
echo "Demo finished. Files and logs are in $DEMO."
