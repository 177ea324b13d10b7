#!/usr/bin/env bash
# A tour of gmd's main job on file-backed defaults, all inside ./demo:
# two machines (alpha and beta, two gmdd on loopback) mirror a 256 MiB
# device in mwc mode. We write through alpha's NBD export, look at gmdstat,
# kill beta's daemon, write more (alpha goes on alone after its peer's
# promote-failure timeout and marks what it writes stale), bring beta back,
# watch the resync, and end by comparing both backing files.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEMO=$ROOT/demo
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

# What the demo needs beyond Rust: libclang (bindgen, for the ublk
# bindings), qemu-io (the NBD client that writes) and python3. Installed
# here with apt as .ci/run does when we are root on Debian; otherwise the
# command to run is printed.
missing=""
ls /usr/lib/llvm-*/lib/libclang*.so* /usr/lib/*/libclang*.so* >/dev/null 2>&1 || missing="$missing libclang-dev"
command -v qemu-io >/dev/null || missing="$missing qemu-utils"
command -v python3 >/dev/null || missing="$missing python3"
command -v cargo >/dev/null || { echo "scripts/demo.sh: cargo is missing: install Rust (https://rustup.rs)" >&2; exit 1; }
if [ -n "$missing" ]; then
    if [ "$(id -u)" -eq 0 ] && [ -z "${GMD_DEMO_NO_INSTALL:-}" ] && command -v apt-get >/dev/null; then
        say "Installing what the demo needs:$missing"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
    else
        echo "scripts/demo.sh needs:$missing" >&2
        echo "install them first: sudo apt-get install$missing" >&2
        exit 1
    fi
fi

say "Building gmd (release)"
cargo build --release --bins --quiet
export PATH=$ROOT/target/release:$PATH

say "Setting up the example cluster in $DEMO"
for m in alpha beta; do [ -f "$DEMO/$m.pid" ] && kill "$(cat "$DEMO/$m.pid")" 2>/dev/null || true; done
sleep 0.5
rm -rf "$DEMO" && mkdir -p "$DEMO" && cd "$DEMO"
cp "$ROOT/examples/loopback.toml" .
run gmdctl genkey cluster.key
run mkdir -p alpha beta
run truncate -s 256M alpha/data10.img beta/data10.img
A="gmdctl --config loopback.toml --machine alpha --socket $DEMO/alpha.sock"
B="gmdctl --config loopback.toml --machine beta --socket $DEMO/beta.sock"
echo "(new files hold only zeroes: --zeroed tells gmd both sides start identical, so no initial copy)"
run $A init-state data10gmd --zeroed
run $B init-state data10gmd --zeroed
run $A verify

start_gmdd() { # machine
    gmdd --config loopback.toml --machine "$1" --socket "$DEMO/$1.sock" 2>> "$1.log" &
    echo $! > "$1.pid"
    for _ in $(seq 100); do [ -S "$1.sock" ] && break; sleep 0.05; done
}
wait_for() { # description, command...
    local what=$1; shift
    for _ in $(seq 600); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "timed out waiting for $what" >&2; return 1
}
mirroring() { $1 status data10gmd --json | python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin)[0]["link"]["connected"] else 1)'; }
in_sync() { $1 status data10gmd --json | python3 -c '
import json,sys
d=json.load(sys.stdin)[0]
sys.exit(0 if d["link"]["connected"] and d["map"]["stale"]==0 and d["link"]["resync_remaining"]==0 else 1)'; }
stop_daemons() { # SIGTERM, then wait: the demo leaves nothing running
    for m in alpha beta; do
        [ -f "$m.pid" ] || continue
        pid=$(cat "$m.pid")
        kill "$pid" 2>/dev/null || continue
        for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    done
}
trap stop_daemons EXIT

say "Starting gmdd on alpha and beta"
start_gmdd alpha
start_gmdd beta
run $A configure data10gmd
echo "(alpha starts first; beta's device is not running yet, so start must refuse and say what to do)"
$A start data10gmd || true
run $A down data10gmd beta
run $A start data10gmd
echo "(the example's role is \"none\": a device starts as secondary; one side is made primary, the one writer)"
run $A primary data10gmd
run $B configure data10gmd
run $B start data10gmd
wait_for "mirroring" mirroring "$A"
run $A status data10gmd

say "Writing through alpha's NBD export: mirrored to beta"
URL=nbd://127.0.0.1:10809/data10gmd
run qemu-io -f raw "$URL" -c "write -P 0xa5 0 16M"
run gmdstat --socket "$DEMO/alpha.sock" -l data10gmd
run gmdstat --socket "$DEMO/beta.sock" -l data10gmd

say "Cutting the peer: beta's daemon is killed (SIGKILL)"
run kill -9 "$(cat beta.pid)"
echo "(alpha waits for beta's promote-failure timeout, 5 s, then goes on alone)"
run qemu-io -f raw "$URL" -c "write -P 0x5a 64M 8M" -c "write -P 0x3c 200M 1M"
wait_for "alpha alone" bash -c "! $A status data10gmd --json | grep -q '\"connected\": true'"
run $A status data10gmd
$A show-state data10gmd | head -14 || true

say "Bringing beta back: it restores its device and resynchronises from alpha"
start_gmdd beta
wait_for "mirroring again" mirroring "$A"
$A status data10gmd | grep -E "mirroring|resync|state map" || true
wait_for "resync" in_sync "$A"
run $A status data10gmd
grep -h "resync finished" alpha.log beta.log | sed 's/^/  log: /'

say "Stopping both devices and comparing the backing files"
run $A stop data10gmd
run $B stop data10gmd
run cmp alpha/data10.img beta/data10.img
echo "alpha/data10.img and beta/data10.img are identical."
stop_daemons
echo
echo "Demo finished. Files and logs are in $DEMO."
