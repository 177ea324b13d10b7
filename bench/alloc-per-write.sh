#!/bin/bash
# Benchmark (not a test): how many heap allocations, context switches and
# system calls each gmdd of a pair on loopback makes per 4 KiB write, in each
# of MODES (default "standalone mwc async sync"). Each gmdd runs with an
# LD_PRELOAD shim (bench/alloc/count.c) counting malloc/calloc/realloc/aligned
# allocations, and `perf stat -p` counts its threads' context switches and
# system calls while fio runs (columns "-" without perf); after one 1 MiB
# pass over the device, fio writes N (default 20000) 4 KiB blocks at random
# through alpha's NBD export at QD (default 1), and each count's growth is
# divided by N. Exact counts, not timings: they hold on a noisy host, and a
# context switch is what costs most in a one-vCPU guest. THREADS=1 also
# prints each thread's switches per write; WAKEUPS=1 records which thread
# woke which and from where (perf sched_wakeup with call stacks) and prints
# the most frequent per write and side. SYSCALLS=1 traces each side's system
# calls (perf trace -s) and prints, per thread, each call made at least
# 0.05 times per write (with how many of them failed, e.g. EAGAIN).
# Needs cc and fio (and perf).
# Usage: bench/alloc-per-write.sh     Env: MODES, N, QD, SIZE (256M), SKIP_BUILD=1,
#   DGRAM (GeoMessage datagram size, default the example's 8192: a 4 KiB write
#   in one datagram; 1400 reassembles it from four), BIN (directory holding
#   gmdd and gmdctl, default target/release: to compare two builds)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MODES=${MODES:-standalone mwc async sync}
N=${N:-20000}; QD=${QD:-1}; SIZE=${SIZE:-256M}; DGRAM=${DGRAM:-8192}
for tool in cc fio; do command -v "$tool" >/dev/null || { echo "alloc-per-write.sh needs $tool" >&2; exit 1; }; done
[ -n "${SKIP_BUILD:-}" ] || cargo build --release --bins --quiet
export PATH=${BIN:-$ROOT/target/release}:$PATH
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
bench_workdir alloc
cc -O2 -shared -fPIC -o "$W/count.so" "$ROOT/bench/alloc/count.c" -lpthread
gmdd_prefix() { echo env LD_PRELOAD="$W/count.so" ALLOC_COUNT="$W/count"; }
cd "$W"
gmdctl genkey cluster.key >/dev/null
mkdir -p alpha beta
truncate -s "$SIZE" alpha/data10.img && fallocate -l "$SIZE" alpha/data10.img
# counts MACHINE → "malloc calloc realloc aligned" of its gmdd (timeout's child)
counts() { local pid; pid=$(pgrep -P "${PID[$1]}" gmdd); cat "count.$pid"; }
# perf_start MACHINE: count its gmdd's context switches and system calls
# until perf_stop (perf stat attached to every thread, per thread)
perf_start() {
    command -v perf >/dev/null || return 0
    perf stat -p "$(pgrep -P "${PID[$1]}" gmdd)" --per-thread -x, \
        -e context-switches,raw_syscalls:sys_enter -o "perf.$1" 2>/dev/null &
    PERF[$1]=$!
}
perf_stop() {
    local p
    for p in ${PERF[$1]:-} ${WAKE[$1]:-} ${TRACE[$1]:-}; do kill -INT "$p"; wait "$p" || true; done
}
# wake_start MACHINE (WAKEUPS=1): record the wake-ups its gmdd's threads make
wake_start() {
    [ -n "${WAKEUPS:-}" ] && command -v perf >/dev/null || return 0
    perf record -q -p "$(pgrep -P "${PID[$1]}" gmdd)" -e sched:sched_wakeup -g \
        -o "wake.$1.data" >/dev/null 2>&1 &
    WAKE[$1]=$!
}
# wake_report MACHINE: "waker -> woken < kernel and user frames" per write
wake_report() {
    [ -f "wake.$1.data" ] || return 0
    perf script -i "wake.$1.data" 2>/dev/null | awk -v m="$1" -v n="$N" '
        function flush() { if (key != "") count[key]++ }
        /^[^ \t]/ { flush(); woken = ""; for (i = 1; i <= NF; i++) if ($i ~ /^comm=/) woken = substr($i, 6)
                    key = $1 " -> " woken; depth = 0; next }
        /^[ \t]+[0-9a-f]+ / { fn = $2; sub(/\+0x.*/, "", fn)
            # skip the scheduler, the wake-up and the system-call plumbing
            if (depth < 6 && fn !~ /^(__schedule|schedule|__traceiter|perf_|trace_|ttwu|try_to_wake|wake_up|__wake|autoremove|pollwake|__pollwake|ep_poll_callback|ep_autoremove|default_wake|_raw_spin|__x64_sys|do_syscall|entry_SYSCALL|futex_wake|do_futex|__futex|syscall$|vfs_write|ksys_write|__GI___libc_write|eventfd_write)/) {
                key = key " < " fn; depth++ }
            next }
        END { flush(); for (k in count) if (count[k] / n >= 0.05) printf "    %-6s %5.2f wake-ups per write: %s\n", m, count[k] / n, k }' |
        sort -k2 -rn | head -8
}
# trace_start MACHINE (SYSCALLS=1): summarise its gmdd's system calls per thread
trace_start() {
    [ -n "${SYSCALLS:-}" ] && command -v perf >/dev/null || return 0
    perf trace -s -p "$(pgrep -P "${PID[$1]}" gmdd)" -o "trace.$1" >/dev/null 2>&1 &
    TRACE[$1]=$!
}
# trace_report MACHINE: "thread call calls (failed) per write", busiest first
trace_report() {
    [ -f "trace.$1" ] || return 0
    awk -v m="$1" -v n="$N" '
        /^ [^ ].* \([0-9]+\), [0-9]+ events/ { t = $1; next }
        t != "" && /^ +[a-z_0-9]+ +[0-9]+ +[0-9]+ / { c[t " " $1] += $2; e[t " " $1] += $3 }
        END { for (k in c) if (c[k] / n >= 0.05) {
                split(k, a, " "); printf "    %-6s %-16s %-16s %5.2f per write (%.2f failed)\n", m, a[1], a[2], c[k] / n, e[k] / n } }' \
        "trace.$1" | sort -k4 -rn
}
# perf_total MACHINE EVENT → the event's count over all threads
perf_total() {
    [ -f "perf.$1" ] || { echo -; return; }
    awk -F, -v e="$2" '$4 == e { n += $2 } END { print n + 0 }' "perf.$1"
}
per_write() { [ "$1" = - ] && echo - || echo "$1 / $N" | bc -l | xargs printf '%.2f'; }
declare -A PERF=() WAKE=() TRACE=()
printf '%-11s %-6s %8s %8s %8s %8s %9s %9s\n' mode side malloc calloc realloc aligned switches syscalls
for mode in $MODES; do
    cmode=$mode; [ "$mode" = standalone ] && cmode=mwc
    NBD_A=$(free_port); NBD_B=$(free_port); GM_A=$(free_udp); GM_B=$(free_udp)
    sed -e "s/256MiB/$SIZE/" -e "s/127.0.0.1:10809/127.0.0.1:$NBD_A/" -e "s/127.0.0.1:10810/127.0.0.1:$NBD_B/" \
        -e "s/127.0.0.1:6755/127.0.0.1:$GM_A/" -e "s/127.0.0.1:6756/127.0.0.1:$GM_B/" \
        -e "s/^mode = \"mwc\"/mode = \"$cmode\"/" -e "s/^datagram_size = 8192/datagram_size = $DGRAM/" \
        "$ROOT/examples/loopback.toml" > cluster.toml
    if [ "$cmode" = async ]; then
        sed -i -e 's|^state_map = "alpha/data10.sm"|&\nrole = "primary"|' \
               -e 's|^state_map = "beta/data10.sm"|&\nrole = "secondary"|' cluster.toml
    fi
    cp --sparse=never alpha/data10.img beta/data10.img
    ctl alpha init-state data10gmd --zeroed --force >/dev/null
    ctl beta init-state data10gmd --zeroed --force >/dev/null
    start_alpha_alone 2>/dev/null
    sides=(alpha)
    if [ "$mode" != standalone ]; then
        sides+=(beta)
        start_gmdd beta
        ctl beta configure data10gmd >/dev/null
        ctl beta start data10gmd >/dev/null
        for _ in $(seq 300); do
            [ "$(status_field alpha 'd["link"]["connected"] and d["link"]["resync_remaining"]==0')" = True ] && break
            sleep 0.2
        done
    fi
    URI="nbd://127.0.0.1:$NBD_A/data10gmd"
    timeout 600 fio --name=warm --ioengine=nbd --uri="$URI" --rw=write --bs=1M --iodepth=16 --size="$SIZE" >/dev/null
    sleep 2  # the shim writes its counts every second
    declare -A before=()
    for m in "${sides[@]}"; do before[$m]=$(counts "$m"); rm -f "perf.$m" "wake.$m.data" "trace.$m"; perf_start "$m"; wake_start "$m"; trace_start "$m"; done
    timeout 600 fio --name=w --ioengine=nbd --uri="$URI" --rw=randwrite --bs=4k --iodepth="$QD" \
        --size="$SIZE" --number_ios="$N" --norandommap --randrepeat=0 >/dev/null
    for m in "${sides[@]}"; do perf_stop "$m"; done
    sleep 2.5
    for m in "${sides[@]}"; do
        read -r -a a <<< "${before[$m]}"; read -r -a b <<< "$(counts "$m")"
        printf '%-11s %-6s' "$mode" "$m"
        for i in 0 1 2 3; do printf ' %8.2f' "$(echo "(${b[$i]} - ${a[$i]}) / $N" | bc -l)"; done
        printf ' %9s %9s\n' "$(per_write "$(perf_total "$m" context-switches)")" \
            "$(per_write "$(perf_total "$m" raw_syscalls:sys_enter)")"
    done
    if [ -n "${THREADS:-}" ]; then
        for m in "${sides[@]}"; do
            [ -f "perf.$m" ] || continue
            awk -F, -v m="$m" -v n="$N" '$4 == "context-switches" && $2 > 0 {
                s[$1] += $2 } END {
                for (t in s) printf "    %-6s %-20s %6.2f switches per write\n", m, t, s[t] / n }' "perf.$m" | sort -k3 -rn | grep -v " 0.00 "
        done
    fi
    for m in "${sides[@]}"; do wake_report "$m"; done
    for m in "${sides[@]}"; do trace_report "$m"; done
    for m in "${sides[@]}"; do stop_gmdd "$m"; done
done
