#!/bin/bash
# The ublk end-to-end test: builds gmdd/gmdctl (release), fetches the test
# kernel (Debian bookworm-backports 6.12, which has ublk_drv), builds an
# initramfs and boots it under qemu (TCG). Inside, two gmdd on loopback mirror
# an ext4 on /dev/ublkb<minor> in mwc, async and sync mode through a peer cut,
# recover a SIGKILLed gmdd, and refuse ublk on a host without it.
# Prints the guest's "MODE <name>: PASS|FAIL" lines; exits 0 only if every
# scenario passed (and non-zero on a FAIL, a missing line or a timeout).
# Env: VM_WORK (scratch folder, default target/vm), TMO (seconds, default 840:
# the scenarios take ~8 min under TCG on a busy 2-core host, ~3–5 min on a quiet one).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE=$ROOT/tests/vm
W=${VM_WORK:-$ROOT/target/vm}
mkdir -p "$W"
t0=$(date +%s)
if ! command -v clang >/dev/null && ! ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1; then
  echo "libclang is needed to build libublk (apt-get install libclang-dev)" >&2; exit 1
fi
(cd "$ROOT" && cargo build --release -p gmdd -p gmdctl --bins --quiet)
"$HERE/setup-kernel.sh" "$W" >/dev/null
cat "$HERE/guest/lib.sh" > "$W/init.sh"
sed -i '1i #!/bin/busybox sh' "$W/init.sh"
cat "$HERE/guest/test.sh" >> "$W/init.sh"
"$HERE/mkinitramfs.sh" "$W" "$W/init.sh" "$ROOT/target/release/gmdd" "$ROOT/target/release/gmdctl" "$ROOT/target/release/gmdstat" >/dev/null
echo "vm: booting (TCG) after $(( $(date +%s) - t0 )) s of preparation"
set +e
TMO=${TMO:-840} MEM=${MEM:-2560} SMP=${SMP:-2} "$HERE/boot.sh" "$W" 'RESULT: PASS' > "$W/boot.out" 2>&1
set -e
grep '^vm: ' "$W/boot.out" || true
grep -E '^\[guest|^MODE |^RESULT' "$W/console.log" | tr -d '\r' || true
status=0
for mode in mwc async sync recover failover nodriver; do
  if ! grep -q "^MODE $mode: PASS" <(tr -d '\r' < "$W/console.log"); then
    grep -q "^MODE $mode: FAIL" <(tr -d '\r' < "$W/console.log") || echo "MODE $mode: FAIL (no result: VM timed out or crashed)"
    status=1
  fi
done
grep -q '^RESULT: PASS' <(tr -d '\r' < "$W/console.log") || status=1
if [ $status -ne 0 ]; then echo "vm: console log in $W/console.log"; tail -n 60 "$W/console.log"; fi
echo "vm: total $(( $(date +%s) - t0 )) s, $( [ $status = 0 ] && echo PASS || echo FAIL)"
exit $status
