#!/usr/bin/env bash
# Builds the Debian package of gmd (gmdd, gmdctl, gmdstat, the systemd unit,
# man pages, shell completions, examples, the Grafana dashboard and the
# Prometheus alert rules) into target/debian/: the binaries first, then the
# man pages and completions from their clap definitions (`gmdctl generate`,
# a hidden command), then `cargo deb` (metadata in gmdd/Cargo.toml).
#   scripts/package.sh              release build
#   PROFILE=dev scripts/package.sh  reuse a debug build (the tests do)
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${PROFILE:-release}
command -v cargo-deb >/dev/null || {
    echo "scripts/package.sh: cargo-deb is missing: cargo install --locked cargo-deb" >&2
    exit 1
}
cargo build --profile "$PROFILE" --workspace --bins --locked
dir=$PROFILE
[ "$PROFILE" = dev ] && dir=debug
gen=target/gmd-generated
rm -rf "$gen"
"target/$dir/gmdctl" generate "$gen" >/dev/null
gzip -9n "$gen"/man/man8/*.8
cargo deb -p gmdd --no-build --profile "$PROFILE" --locked "$@"
