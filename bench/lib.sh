# shellcheck shell=bash
# Helpers shared by the bench scripts that run two gmdd (alpha, beta) from
# a cluster.toml in the work directory $W (the current directory, made by
# `bench_workdir`).
#   GMDD_TIMEOUT  seconds a gmdd may run at most (default 900)
#   gmdd_prefix   a function printing the command a machine's gmdd runs
#                 under (default none; wan-gmd.sh: `ip netns exec NS`)
#   KEEP          set: the work directory is kept at exit

gmdd_prefix() { :; }

# A free TCP or UDP port on the loopback (the kernel's choice).
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
free_udp() { python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }

# Makes the work directory $W (/tmp/gmd-$1.XXXXXX) and the table PID of
# the gmdd started; at exit they are stopped and $W removed.
bench_workdir() {
    W=$(mktemp -d "/tmp/gmd-$1.XXXXXX")
    BENCH_WORKDIR=$W
    declare -gA PID=()
    trap bench_cleanup EXIT
}

bench_cleanup() {
    for m in "${!PID[@]}"; do kill "${PID[$m]}" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ -n "${KEEP:-}" ]; then
        echo "work directory kept: $BENCH_WORKDIR" >&2
    else
        rm -rf "$BENCH_WORKDIR"
    fi
}

# gmdctl against machine $1's daemon.
ctl() { local m=$1; shift; timeout 60 gmdctl --config cluster.toml --machine "$m" --socket "$W/$m.sock" "$@"; }

# Starts machine $1's gmdd; its output goes to a log file, never to a pipe.
start_gmdd() {
    rm -f "$1.sock"
    # shellcheck disable=SC2046 # the prefix is words on purpose
    timeout "${GMDD_TIMEOUT:-900}" $(gmdd_prefix "$1") gmdd --config cluster.toml \
        --machine "$1" --socket "$W/$1.sock" </dev/null >>"$1.log" 2>&1 &
    PID[$1]=$!
    for _ in $(seq 200); do [ -S "$1.sock" ] && return 0; sleep 0.05; done
    echo "gmdd $1 did not come up" >&2; tail "$1.log" >&2; return 1
}

# Stops machine $1's gmdd (TERM, then KILL after 30 s).
stop_gmdd() {
    local pid=${PID[$1]:-}
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    unset "PID[$1]"
}

# A field of machine $1's device status: python expression $2 over `d`.
# Starts gmdd on alpha and its device alone, as primary, with beta recorded
# down; further arguments go to `gmdctl primary` (e.g. --force).
start_alpha_alone() {
    start_gmdd alpha
    ctl alpha configure data10gmd >/dev/null
    ctl alpha down data10gmd beta >/dev/null
    ctl alpha start data10gmd >/dev/null
    ctl alpha primary data10gmd "$@" >/dev/null
}
status_field() {
    ctl "$1" status data10gmd --json | python3 -c "import json,sys; d=json.load(sys.stdin)[0]; print($2)"
}
