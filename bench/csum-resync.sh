#!/usr/bin/env bash
# Checksum resync benchmark (two gmdd on loopback, file-backed devices):
#
# A volume whose two copies already hold the same data (the two images are
# byte-identical, pseudo-random data) but whose target's map says it holds
# no known data, so the pair runs its initial full copy. Run once with
# `resync_checksums = false` (every region's data moves) and once with
# `true` (each region's BLAKE3 checksum moves; the data only where the
# target's copy differs, here nowhere).
#
# Prints one table: bytes moved over the link (GeoMessage message bytes,
# both directions, from gmdstat --json), resync data sent and regions found
# the same (gmdctl status --json), the copy's wall time, and bytes moved as
# a share of the volume. The goal (gmd issue 13): with checksums, at most
# 2 % of the volume moves.
#
# Usage: bench/csum-resync.sh
# Environment: SIZE (volume size, default 1G), RATE (sync_rate_kib, default
#   4096), PROFILE (release, the default, or debug: which target/ binaries),
#   KEEP=1 (keep the work directory), SKIP_BUILD=1 (use the binaries as they
#   are).
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH_DIR=$PWD/bench
SIZE=${SIZE:-1G}
RATE=${RATE:-4096}
PROFILE=${PROFILE:-release}
ROOT=$PWD
BYTES=$(numfmt --from=iec "$SIZE")

# shellcheck source=bench/lib.sh
. "$BENCH_DIR/lib.sh"
bench_workdir csum

if [ -z "${SKIP_BUILD:-}" ]; then
    if [ "$PROFILE" = release ]; then
        timeout 2400 cargo build --release --bins --quiet
    else
        timeout 2400 cargo build --bins --quiet
    fi
fi
export PATH=$ROOT/target/$PROFILE:$PATH
log "load average at start: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) cores; work directory $W"

NBD_A=$(free_port); NBD_B=$(free_port); GM_A=$(free_udp); GM_B=$(free_udp)

cd "$W"
gmdctl genkey cluster.key >/dev/null
mkdir -p alpha beta
log "writing $SIZE of pseudo-random data, the same on both copies"
head -c "$BYTES" /dev/urandom > alpha/data10.img
cp --sparse=never alpha/data10.img beta/data10.img

write_config() { # resync_checksums
    sed -e "s/256MiB/$SIZE/" \
        -e "s/127.0.0.1:10809/127.0.0.1:$NBD_A/" -e "s/127.0.0.1:10810/127.0.0.1:$NBD_B/" \
        -e "s/127.0.0.1:6755/127.0.0.1:$GM_A/" -e "s/127.0.0.1:6756/127.0.0.1:$GM_B/" \
        -e "s/^sync_rate_kib = 32 .*/sync_rate_kib = $RATE\nresync_checksums = $1/" \
        "$ROOT/examples/loopback.toml" > cluster.toml
    grep -q "^resync_checksums = $1" cluster.toml
}
# GeoMessage message bytes this machine sent to the other one.
link_bytes() { # machine
    timeout 30 gmdstat --socket "$W/$1.sock" -A --json \
        | python3 -c "import json,sys; r=json.loads(sys.stdin.read().splitlines()[-1]); print(sum(p['bytes_sent'] for p in r['peers']))"
}
synced() {
    [ "$(status_field alpha 'd["link"]["connected"] and d["link"]["resync_remaining"]==0 and d["map"]["stale"]==0 and d["map"]["inconsistent"]==0')" = True ] &&
    [ "$(status_field beta 'd["link"]["resync_remaining"]')" = 0 ]
}

printf 'checksums\tlink_bytes\tresync_data_bytes\tsame_bytes\tseconds\tshare\timages\n' > results.tsv
for checks in false true; do
    log "full copy of $SIZE with resync_checksums = $checks"
    write_config "$checks"
    # alpha's data is declared the pair's; beta's map says it holds no
    # known data: the pair starts with a full copy to beta.
    ctl alpha init-state data10gmd --zeroed --force >/dev/null
    ctl beta init-state data10gmd --force >/dev/null
    start_alpha_alone
    start_gmdd beta
    a0=$(link_bytes alpha); b0=$(link_bytes beta)
    t0=$(date +%s.%N)
    ctl beta configure data10gmd >/dev/null
    ctl beta start data10gmd >/dev/null
    ok=
    for _ in $(seq 3000); do
        if [ "$(status_field alpha 'd["link"]["connected"]')" = True ] && synced; then ok=1; break; fi
        sleep 0.1
    done
    t1=$(date +%s.%N)
    [ -n "$ok" ] || { echo "the copy did not finish in 300 s" >&2; tail alpha.log beta.log >&2; exit 1; }
    a1=$(link_bytes alpha); b1=$(link_bytes beta)
    sent=$(status_field alpha 'd["link"]["resync_bytes_sent"]')
    same=$(status_field alpha 'd["link"].get("resync_same_bytes", 0)')
    stop_gmdd beta; stop_gmdd alpha
    if cmp -s alpha/data10.img beta/data10.img; then images=same; else images=DIFFER; fi
    python3 - "$checks" "$((a1 - a0 + b1 - b0))" "$sent" "$same" "$t0" "$t1" "$BYTES" "$images" >> results.tsv <<'EOF'
import sys
checks, link, sent, same, t0, t1, size, images = sys.argv[1:]
print(f"{checks}\t{link}\t{sent}\t{same}\t{float(t1) - float(t0):.2f}\t{int(link) / int(size) * 100:.2f}\t{images}")
EOF
done

python3 - "$SIZE" "$RATE" "$PROFILE" results.tsv <<'EOF'
import sys
size, rate, profile, tsv = sys.argv[1:]
rows = [l.rstrip("\n").split("\t") for l in open(tsv)][1:]
print(f"initial full copy of {size}, both copies already identical (sync_rate_kib {rate}, {profile} binaries)")
print(f"{'resync_checksums':>16} {'link bytes':>14} {'resync data':>14} {'same (skipped)':>15} {'time s':>8} {'% of volume':>12} {'images':>7}")
for c, link, sent, same, secs, share, images in rows:
    print(f"{c:>16} {int(link):>14} {int(sent):>14} {int(same):>15} {secs:>8} {share:>11}% {images:>7}")
on = [r for r in rows if r[0] == "true"][0]
print(f"  goal: with checksums at most 2 % of the volume moves: {on[5]} %, {'met' if float(on[5]) <= 2 else 'NOT met'}")
EOF
