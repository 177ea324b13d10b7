#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and property tests, and the
# end-to-end tests that run gmdd with real clients (qemu-io, fio, nbdfuse,
# losetup, mkfs.ext4, e2fsck). Needs root for loop devices and mounts, and
# the packages that .ci/run installs.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# gmdctl and gmd-core as gmdctl gets them (without io_uring): a workspace
# build turns gmd-core's `runtime` feature on for everyone, so only this
# shows that they build, and cleanly, without it.
cargo clippy -p gmdctl -p gmd-core --no-default-features --all-targets --locked -- -D warnings
cargo build --workspace --bins --locked

# gmdctl and gmdstat (the gmdctl package's binaries) link neither ublk,
# GeoMessage nor io_uring: those belong to gmdd.
tree=$(cargo tree -p gmdctl -e normal --prefix none --locked)
forbidden=$(grep -E '^(io-uring|gmd-net|gmd-ublk|libublk) ' <<<"$tree" | sed 's/ (\*)$//' | sort -u || true)
if [ -n "$forbidden" ]; then
    echo "scripts/test.sh: gmdctl and gmdstat must link neither ublk, GeoMessage nor io_uring," >&2
    echo "but \`cargo tree -p gmdctl -e normal\` lists:" >&2
    echo "$forbidden" | sed 's/^/    /' >&2
    echo "(the daemon's dependencies belong in gmdd/; gmdctl takes gmd-core without its \`runtime\` feature)" >&2
    exit 1
fi

cargo nextest run --workspace --locked --no-fail-fast
