# Helpers for the guest scripts (sourced into /init by tests/vm/run.sh).
# Two gmdd on loopback: alpha (ublk, the primary) and beta (NBD only: both
# daemons share one kernel, and one ublk id can serve only one of them).

boot_guest() {
  /bin/busybox --install -s /bin
  export PATH=/bin:/sbin
  mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
  mkdir -p /run /tmp; mount -t tmpfs tmpfs /run
  ip link set lo up
  load() { while read -r m; do insmod "/modules/$m" 2>/dev/null; done < "/modules/$1.list"; }
  load ublk; load ext4
  # Backing files on tmpfs: it lacks FALLOC_FL_ZERO_RANGE, so write-zeroes
  # takes gmd's punch-hole fallback.
  mkdir -p /t; mount -t tmpfs -o size=1400m tmpfs /t
  export GMD_LOG=info
  log "init started"
}

log() { echo "[guest $(cut -d' ' -f1 /proc/uptime)s] $*"; }

# wait_until SECONDS COMMAND...: polls every 0.2 s.
wait_until() {
  local n=$(( $1 * 5 )); shift
  while [ $n -gt 0 ]; do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; n=$((n-1)); done
  return 1
}

# make_cluster DIR MODE MINOR SIZE_MIB
make_cluster() {
  local d=$1 mode=$2 minor=$3 size=$4
  mkdir -p "$d/alpha" "$d/beta"
  cat > "$d/cluster.toml" <<TOML
[cluster]
name = "vm-$mode"
key_file = "cluster.key"
[sites.austin]
dominant = true
[sites.dallas]
[networks.geonet1]
datagram_size = 8192
[machines.alpha]
site = "austin"
promote_failure_timeout = 5
interfaces = { geonet1 = "127.0.0.1:$((6755 + minor * 2))" }
nbd_listen = "127.0.0.1:$((10809 + minor * 2))"
[machines.beta]
site = "dallas"
promote_failure_timeout = 5
interfaces = { geonet1 = "127.0.0.1:$((6756 + minor * 2))" }
nbd_listen = "127.0.0.1:$((10810 + minor * 2))"
[devices.d$minor]
minor = $minor
mode = "$mode"
size = "${size}MiB"
ublk_queues = 2
[devices.d$minor.machines.alpha]
data = "alpha/data.img"
state_map = "alpha/data.sm"
role = "primary"
[devices.d$minor.machines.beta]
data = "beta/data.img"
state_map = "beta/data.sm"
role = "secondary"
TOML
  gmdctl genkey "$d/cluster.key" >/dev/null
  truncate -s $((size * 1048576)) "$d/alpha/data.img" "$d/beta/data.img"
  # New zeroed volumes on both sides: the pair starts without a copy.
  for m in alpha beta; do
    gmdctl --config "$d/cluster.toml" --machine $m init-state "d$minor" --zeroed >/dev/null
  done
}

# gmdd_up DIR MACHINE [ublk]: starts gmdd (beta without ublk unless asked:
# its ublk ids must then differ from alpha's, see ublk_id) and waits for its
# socket.
gmdd_up() {
  local d=$1 m=$2 env=
  [ "$m" = beta ] && [ "${3:-}" != ublk ] && env="GMD_UBLK_CONTROL=/nonexistent"
  env $env gmdd --config "$d/cluster.toml" --machine $m --socket "$d/$m.sock" >> "$d/$m.log" 2>&1 &
  echo $! > "$d/$m.pid"
  wait_until 30 test -S "$d/$m.sock"
}

ctl() { local d=$1 m=$2; shift 2; gmdctl --config "$d/cluster.toml" --machine $m --socket "$d/$m.sock" "$@"; }

gmdd_kill() { # DIR MACHINE SIGNAL
  local pid; pid=$(cat "$1/$2.pid"); kill -"$3" "$pid" 2>/dev/null
  local n=300; while kill -0 "$pid" 2>/dev/null && [ $n -gt 0 ]; do sleep 0.1; n=$((n-1)); done
  ! kill -0 "$pid" 2>/dev/null
}

# io_flushers DIR MACHINE: every thread of the machine's gmdd (ublk queue
# threads, device thread, io_uring workers, runtime) is in the IO_FLUSHER
# state: PF_MEMALLOC_NOIO (0x80000) in the flags field of its stat.
io_flushers() {
  local pid t f n=0; pid=$(cat "$1/$2.pid")
  for t in /proc/$pid/task/*; do
    f=$(sed 's/.*) //' "$t/stat" 2>/dev/null | cut -d' ' -f7)
    [ -n "$f" ] || continue  # the thread ended meanwhile (an io_uring worker)
    [ $(( f & 0x80000 )) -ne 0 ] || { log "$2: thread ${t##*/} ($(cat "$t/comm")) is not an IO_FLUSHER (flags $f)"; return 1; }
    n=$((n+1))
  done
  log "$2: all $n gmdd threads are IO_FLUSHERs"
}

# in_sync DIR MACHINE DEVICE: connected, nothing left to resync, map clean.
in_sync() {
  local s; s=$(ctl "$1" "$2" status "$3" --json 2>/dev/null | tr -d ' \n')
  case $s in *'"connected":true'*) ;; *) return 1;; esac
  case $s in *'"resync_remaining":0'*) ;; *) return 1;; esac
  case $s in *'"stale":0'*) ;; *) return 1;; esac
  case $s in *'"inconsistent":0'*) ;; *) return 1;; esac
}

# direct_count DIR MACHINE DEVICE KIND: the device counted KIND (reads or
# writes) whose local part its ublk queue threads ran themselves, without
# the device thread (logs the count; fails when there were none).
direct_count() {
  local n
  n=$(gmdstat --socket "$1/$2.sock" -l "$3" --json | tr -d ' \n' | sed -n "s/.*\"direct_$4\":\([0-9]*\).*/\1/p")
  log "$3: $n direct $4"
  [ "${n:-0}" -gt 0 ]
}

# write_tree DIR TAG COUNT: files of various sizes in nested directories.
write_tree() {
  local i
  mkdir -p "$1/$2"
  for i in $(seq 1 "$3"); do
    mkdir -p "$1/$2/d$((i % 4))"
    dd if=/dev/urandom of="$1/$2/d$((i % 4))/f$i" bs=4k count=$(( (i * 37) % 200 + 1 )) 2>/dev/null
  done
}

# link_log DIR: the link's story (connects, refusals, peer loss) on both sides.
link_log() {
  for m in alpha beta; do
    grep -E 'mirroring|refused|not mirroring|goes on alone|restarted|unreachable|resync' "$1/$m.log" |
      sed -e 's/\x1b\[[0-9;]*m//g' -e "s/^/[$m] /" | tail -n 12
  done
}

# sync_report DIR DEVICE: both sides' status (why in_sync does not hold).
sync_report() {
  for m in alpha beta; do echo "--- $m status"; ctl "$1" $m status "$2" --json | tr -d ' \n' | cut -c1-1500; echo; done
  link_log "$1"
}

dump_logs() { for m in alpha beta; do echo "--- $1/$m.log (tail)"; tail -n 30 "$1/$m.log"; done; }

# start_beta DIR DEV: starts DEV on beta; if beta keeps answering "alpha
# cannot be reached" for 30 s, restarts beta's gmdd and tries again (a safety
# net: gmdd once missed a peer that came up while it restored its devices,
# fixed in fcb0509).
start_beta() {
  local d=$1 dev=$2 try
  for try in 1 2 3; do
    wait_until 30 ctl "$d" beta start "$dev" && return 0
    echo "[guest] beta: start of $dev refused for 30 s; restarting gmdd ($try)"
    gmdd_kill "$d" beta TERM; gmdd_up "$d" beta || return 1
    ctl "$d" beta configure "$dev" >/dev/null 2>&1
  done
  return 1
}
