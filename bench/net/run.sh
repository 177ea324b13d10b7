#!/usr/bin/env bash
# GeoMessage vs TCP on loopback (see src/main.rs). Bounded: 1 GiB per bulk
# case, 3 repetitions, 20 000 round trips, 120 s timeout per case.
# Usage: bench/net/run.sh [--gib N] [--datagram BYTES] [--repeat N]
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -q -p gmd-net-bench
exec target/release/gmd-net-bench all --gib 1 "$@"
