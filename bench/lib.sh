# shellcheck shell=bash
# Helpers shared by the bench scripts that run two gmdd (alpha, beta) from
# a cluster.toml in the work directory $W (the current directory). Source it
# after setting W and `declare -A PID=()`.
#   GMDD_TIMEOUT  seconds a gmdd may run at most (default 900)
#   gmdd_prefix   a function printing the command a machine's gmdd runs
#                 under (default none; wan-gmd.sh: `ip netns exec NS`)

gmdd_prefix() { :; }

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
status_field() {
    ctl "$1" status data10gmd --json | python3 -c "import json,sys; d=json.load(sys.stdin)[0]; print($2)"
}
