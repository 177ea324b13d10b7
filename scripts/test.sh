#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and property tests, and the
# end-to-end tests that run gmdd with real clients (qemu-io, fio, nbdfuse,
# losetup, mkfs.ext4, e2fsck). Needs root for loop devices and mounts, and
# the packages that .ci/run installs.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo build --workspace --bins --locked
cargo nextest run --workspace --locked --no-fail-fast
