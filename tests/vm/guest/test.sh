# /init body (after lib.sh): the ublk end-to-end scenarios. Prints one
# "MODE <name>: PASS|FAIL" line per scenario and "RESULT: PASS|FAIL".
boot_guest
FAILED=0
ALL="mwc async sync recover failover nodriver"

# mirror_scenario MODE MINOR: ext4 on /dev/ublkb<minor> on alpha, peer cut
# (SIGTERM) and restarted mid-way, e2fsck, both backing files identical.
mirror_scenario() {
  local mode=$1 minor=$2 d=/t/$1 dev=d$2 bdev=/dev/ublkb$2
  make_cluster "$d" "$mode" "$minor" 128 || return 1
  gmdd_up "$d" alpha && gmdd_up "$d" beta || return 1
  ctl "$d" alpha configure $dev && ctl "$d" alpha down $dev beta && ctl "$d" alpha start $dev || return 1
  ctl "$d" beta configure $dev || return 1
  start_beta "$d" $dev || return 1
  wait_until 60 in_sync "$d" alpha $dev || { log "$mode: never in sync"; return 1; }
  [ -b $bdev ] || { log "$mode: no $bdev"; return 1; }
  # Direct writes of a whole ublk request (512 KiB) go to the engine in the
  # tag's own buffer while a fresh one takes its place; small ones are
  # copied. Two large writers and a small one at once, read back: exactly
  # the data (the peer's copy is compared through the backing files below).
  dd if=/dev/urandom of=/tmp/big.$mode bs=1M count=17 2>/dev/null
  local p1 p2 p3
  dd if=/tmp/big.$mode of=$bdev bs=512k count=16 oflag=direct 2>/dev/null & p1=$!
  dd if=/tmp/big.$mode of=$bdev bs=512k skip=16 seek=16 count=16 oflag=direct 2>/dev/null & p2=$!
  dd if=/tmp/big.$mode of=$bdev bs=4k skip=4096 seek=4096 count=256 oflag=direct 2>/dev/null & p3=$!
  wait $p1 && wait $p2 && wait $p3 || { log "$mode: direct writes failed"; return 1; }
  [ "$(dd if=$bdev bs=1M count=17 iflag=direct 2>/dev/null | sha256sum)" = "$(sha256sum < /tmp/big.$mode)" ] ||
    { log "$mode: large direct writes read back differ"; return 1; }
  rm -f /tmp/big.$mode
  log "$mode: large and small direct writes read back intact"
  mkfs.ext4 -q -F $bdev || return 1
  mkdir -p /mnt/$mode && mount -t ext4 $bdev /mnt/$mode || return 1
  write_tree /mnt/$mode before 40; sync
  log "$mode: cutting the peer"
  gmdd_kill "$d" beta TERM || return 1
  write_tree /mnt/$mode during 40; sync
  log "$mode: peer back"
  gmdd_up "$d" beta || return 1
  wait_until 120 in_sync "$d" alpha $dev || { log "$mode: no resync"; return 1; }
  log "$mode: resynchronised"
  link_log "$d"
  # Read the files back from the device with a cold page cache: ublk queue
  # threads serve these reads themselves (direct reads), and must return
  # exactly what was written.
  (cd /mnt/$mode && find before during -type f | sort | xargs sha256sum) > /tmp/sums.$mode
  sync; echo 3 > /proc/sys/vm/drop_caches
  (cd /mnt/$mode && sha256sum -c -s /tmp/sums.$mode) || { log "$mode: files read back differ"; return 1; }
  direct_count "$d" alpha $dev reads || { log "$mode: no direct reads counted"; return 1; }
  io_flushers "$d" alpha || return 1
  # Writes run on the queue threads too; in sync mode the local write
  # follows the peer's answer, on the device thread.
  if [ "$mode" = sync ]; then
    direct_count "$d" alpha $dev writes || true
  else
    direct_count "$d" alpha $dev writes || { log "$mode: no direct writes counted"; return 1; }
  fi
  write_tree /mnt/$mode after 10; sync
  # A stop while mounted is refused ("in use") and changes nothing.
  if ctl "$d" alpha stop $dev 2>/tmp/stop.err; then log "$mode: stop while mounted was accepted"; return 1; fi
  grep -q "in use" /tmp/stop.err || { cat /tmp/stop.err; return 1; }
  umount /mnt/$mode || return 1
  e2fsck -fn $bdev > /tmp/fsck.log 2>&1 || { cat /tmp/fsck.log; return 1; }
  log "$mode: e2fsck clean"
  wait_until 120 in_sync "$d" alpha $dev || return 1
  ctl "$d" alpha stop $dev || return 1
  [ ! -e $bdev ] || { log "$mode: $bdev still there after stop"; return 1; }
  ctl "$d" beta stop $dev || return 1
  log "$mode: both stopped, comparing"
  local a b
  a=$(sha256sum < "$d/alpha/data.img"); b=$(sha256sum < "$d/beta/data.img")
  [ "$a" = "$b" ] || { log "$mode: backing files differ"; return 1; }
  gmdd_kill "$d" alpha TERM; gmdd_kill "$d" beta TERM
  return 0
}

# recover: SIGKILL of alpha's gmdd while ext4 is mounted and being written;
# a new gmdd reattaches the quiesced /dev/ublkb<minor> and I/O goes on.
recover_scenario() {
  local d=/t/recover minor=3 dev=d3 bdev=/dev/ublkb3
  make_cluster "$d" mwc $minor 128 || return 1
  gmdd_up "$d" alpha && gmdd_up "$d" beta || return 1
  ctl "$d" alpha configure $dev && ctl "$d" alpha down $dev beta && ctl "$d" alpha start $dev || return 1
  ctl "$d" beta configure $dev || return 1
  start_beta "$d" $dev || return 1
  wait_until 60 in_sync "$d" alpha $dev || return 1
  mkfs.ext4 -q -F $bdev && mkdir -p /mnt/r && mount -t ext4 $bdev /mnt/r || return 1
  write_tree /mnt/r before 20; sync
  log "recover: SIGKILL of alpha's gmdd"
  gmdd_kill "$d" alpha KILL || return 1
  # I/O now waits in the kernel (no server): run some in the background.
  ( write_tree /mnt/r during 20; sync; echo done > /tmp/recover-writer ) &
  sleep 2
  [ -b $bdev ] || { log "recover: $bdev vanished"; return 1; }
  mv "$d/alpha.log" "$d/alpha.log.1"
  gmdd_up "$d" alpha || return 1
  wait_until 60 grep -q "ublk device /dev/ublkb3 up" "$d/alpha.log" || { dump_logs "$d"; return 1; }
  grep -q "recovered=true" "$d/alpha.log" || { log "recover: not a recovery"; dump_logs "$d"; return 1; }
  wait_until 120 test -e /tmp/recover-writer || { log "recover: writer stuck"; return 1; }
  wait_until 120 in_sync "$d" alpha $dev || { log "recover: not in sync"; sync_report "$d" $dev; return 1; }
  log "recover: in sync"
  link_log "$d"
  umount /mnt/r && e2fsck -fn $bdev > /tmp/fsck.log 2>&1 || { cat /tmp/fsck.log; return 1; }
  wait_until 120 in_sync "$d" alpha $dev || { log "recover: not in sync after fsck"; sync_report "$d" $dev; return 1; }
  ctl "$d" alpha stop $dev && ctl "$d" beta stop $dev || return 1
  [ "$(sha256sum < "$d/alpha/data.img")" = "$(sha256sum < "$d/beta/data.img")" ] || return 1
  gmdd_kill "$d" alpha TERM; gmdd_kill "$d" beta TERM
}

# failover: ext4 on alpha's /dev/ublkb6 (primary), beta's copy read-only on
# /dev/ublkb106; alpha's gmdd SIGKILLed with the file system mounted; on
# beta `down` + `primary`: its ublk device becomes writable, the file system
# mounts there (journal replay) with every file synced before the failure,
# more is written, e2fsck is clean. Failback: alpha's gmdd comes back as
# secondary by itself and receives beta's changes; the roles are switched
# back and alpha holds every file.
failover_scenario() {
  local d=/t/failover minor=6 dev=d6 abdev=/dev/ublkb6 bbdev=/dev/ublkb106
  make_cluster "$d" mwc $minor 128 || return 1
  sed -i 's|^state_map = "beta/data.sm"$|state_map = "beta/data.sm"\nublk_id = 106|' "$d/cluster.toml"
  grep -q "ublk_id = 106" "$d/cluster.toml" || { log "failover: no ublk_id in the config"; return 1; }
  gmdd_up "$d" alpha && gmdd_up "$d" beta ublk || return 1
  ctl "$d" alpha configure $dev && ctl "$d" alpha down $dev beta && ctl "$d" alpha start $dev || return 1
  ctl "$d" beta configure $dev || return 1
  start_beta "$d" $dev || return 1
  wait_until 60 in_sync "$d" alpha $dev || { log "failover: never in sync"; return 1; }
  [ -b $abdev ] && [ -b $bbdev ] || { log "failover: missing $abdev or $bbdev"; return 1; }
  # The secondary's block device refuses writes.
  if dd if=/dev/zero of=$bbdev bs=4096 count=1 oflag=direct 2>/dev/null; then
    log "failover: a write on the secondary was accepted"; return 1
  fi
  mkfs.ext4 -q -F $abdev || return 1
  mkdir -p /mnt/fa /mnt/fb && mount -t ext4 $abdev /mnt/fa || return 1
  write_tree /mnt/fa before 30; sync
  (cd /mnt/fa && find before -type f | sort | xargs sha256sum) > /tmp/fo.before
  write_tree /mnt/fa unsynced 5
  log "failover: SIGKILL of alpha's gmdd (the primary site is lost)"
  gmdd_kill "$d" alpha KILL || return 1
  ctl "$d" beta down $dev alpha || return 1
  ctl "$d" beta primary $dev || { dump_logs "$d"; return 1; }
  wait_until 30 test -b $bbdev || { log "failover: $bbdev did not come back"; return 1; }
  mount -t ext4 $bbdev /mnt/fb || { log "failover: mount on beta failed"; return 1; }
  (cd /mnt/fb && sha256sum -c -s /tmp/fo.before) || { log "failover: files synced before the failure differ on beta"; return 1; }
  log "failover: beta serves every file synced before the failure"
  # No global sync from here on: alpha's file system hangs with its server.
  write_tree /mnt/fb after 20
  (cd /mnt/fb && find before after -type f | sort | xargs sha256sum) > /tmp/fo.all
  umount /mnt/fb || return 1
  e2fsck -fn $bbdev > /tmp/fsck.log 2>&1 || { cat /tmp/fsck.log; return 1; }
  log "failover: e2fsck clean on beta"
  # Failback: alpha's gmdd returns. Its device comes back as secondary; the
  # old file system's writes still queued in the kernel are reissued and
  # refused, so that file system gives up and can be unmounted.
  mv "$d/alpha.log" "$d/alpha.log.1"
  gmdd_up "$d" alpha || return 1
  wait_until 120 in_sync "$d" beta $dev || { log "failover: no failback resync"; sync_report "$d" $dev; return 1; }
  ctl "$d" alpha status $dev --json | tr -d ' \n' | grep -q '"role":"secondary"' || { log "failover: alpha did not come back secondary"; sync_report "$d" $dev; return 1; }
  log "failover: alpha came back as secondary and resynchronised"
  umount /mnt/fa 2>/dev/null || umount -l /mnt/fa 2>/dev/null
  log "failover: alpha's old file system unmounted"
  link_log "$d"
  ctl "$d" beta secondary $dev || return 1
  wait_until 60 ctl "$d" alpha primary $dev || { log "failover: alpha not promoted"; sync_report "$d" $dev; return 1; }
  wait_until 30 test -b $abdev || return 1
  mount -t ext4 $abdev /mnt/fa || { log "failover: mount on alpha failed"; return 1; }
  (cd /mnt/fa && sha256sum -c -s /tmp/fo.all) || { log "failover: alpha lacks files after failback"; return 1; }
  umount /mnt/fa && e2fsck -fn $abdev > /tmp/fsck.log 2>&1 || { cat /tmp/fsck.log; return 1; }
  wait_until 120 in_sync "$d" alpha $dev || return 1
  ctl "$d" alpha stop $dev && ctl "$d" beta stop $dev || return 1
  [ "$(sha256sum < "$d/alpha/data.img")" = "$(sha256sum < "$d/beta/data.img")" ] || { log "failover: backing files differ"; return 1; }
  gmdd_kill "$d" alpha TERM; gmdd_kill "$d" beta TERM
}

# nodriver: a host without ublk (GMD_UBLK_CONTROL elsewhere): ublk asked
# for is refused with the clear message and nothing is created; the
# default falls back to NBD.
nodriver_scenario() {
  local d=/t/nodriver
  make_cluster "$d" mwc 4 64 || return 1
  sed -i 's/^ublk_queues = 2$/export = ["ublk"]/' "$d/cluster.toml"
  GMD_UBLK_CONTROL=/nonexistent gmdd --config "$d/cluster.toml" --machine alpha --socket "$d/alpha.sock" >> "$d/alpha.log" 2>&1 &
  echo $! > "$d/alpha.pid"; wait_until 30 test -S "$d/alpha.sock" || return 1
  ctl "$d" alpha configure d4 && ctl "$d" alpha down d4 beta || return 1
  if ctl "$d" alpha start d4 2>/tmp/nd.err; then return 1; fi
  grep -q "ublk_drv is not loaded" /tmp/nd.err || { cat /tmp/nd.err; return 1; }
  [ ! -e /dev/ublkb4 ] && [ ! -e /dev/ublkc4 ] || return 1
  ctl "$d" alpha status d4 | grep STOPPED >/dev/null || return 1
  gmdd_kill "$d" alpha TERM
}

run() {
  local name=$1; shift
  log "scenario $name"
  if "$@"; then echo "MODE $name: PASS"; else echo "MODE $name: FAIL"; FAILED=1; dump_logs "/t/$name"; fi
}

run mwc mirror_scenario mwc 0
run async mirror_scenario async 1
run sync mirror_scenario sync 2
run recover recover_scenario
run failover failover_scenario
run nodriver nodriver_scenario

if [ $FAILED = 0 ]; then echo "RESULT: PASS"; else echo "RESULT: FAIL"; fi
poweroff -f
