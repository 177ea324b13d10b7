#!/usr/bin/env bash
# Runs the datagram-decoder fuzzer for a bounded time (default 60 s).
#
# cargo-fuzz needs nightly flags (-Zsanitizer); the stable toolchain accepts
# them with RUSTC_BOOTSTRAP=1, which is what this script uses. It installs
# cargo-fuzz from crates.io if missing.
set -euo pipefail
cd "$(dirname "$0")"
SECONDS_TO_RUN="${GMD_FUZZ_SECONDS:-60}"
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    cargo install --locked cargo-fuzz
fi
export RUSTC_BOOTSTRAP=1
mkdir -p corpus/datagram
# A few seeds: an empty payload, a ping, an ack, a stream frame.
printf '\x01' > corpus/datagram/ping
printf '\x02\x05\x00\x00\x02' > corpus/datagram/ack
printf '\x04\x01\x00\x00\x03\x00\x03abc' > corpus/datagram/stream
cargo fuzz run datagram corpus/datagram -- \
    -max_total_time="$SECONDS_TO_RUN" -max_len=2048 -rss_limit_mb=2048 -print_final_stats=1
