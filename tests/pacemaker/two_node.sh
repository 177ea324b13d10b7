#!/bin/bash
# The conditions passed to `wait_until ... eval '...'` expand when evaluated.
# shellcheck disable=SC2016

# A real two-node Pacemaker 2.1 / Corosync 3 cluster on this one host runs
# gmd's OCF agent as a promotable clone, and fails over:
#
#   two_node.sh BINDIR AGENT
#
# BINDIR holds gmdd and gmdctl, AGENT is dist/ocf/gmd. Each node (alpha,
# beta) is node.sh as the first process of its own PID, mount, UTS and
# network namespaces; a veth pair joins the two network namespaces
# (10.78.13.1 and 10.78.13.2). Corosync (knet, two_node) and Pacemaker run
# there as on a machine, with their own /etc/corosync, /var/lib/pacemaker,
# /run and /dev/shm; gmdd listens on the node's address.
#
# The scenario: Pacemaker promotes one side; data is written through its
# NBD export; every process of that node is killed (SIGKILL to its PID
# namespace's first process); Pacemaker on the other node promotes its copy
# and all the data is there; more is written; the node returns with the
# same files; Pacemaker finds (or starts) its instance unpromoted, gmd
# secondary, and gmd resyncs only what changed; a planned switch back
# (crm_resource --move --promoted) promotes it again and every byte
# written reads back there. Prints `RESULT key=value` lines for the Rust
# test (tests/tests/pacemaker.rs); exits non-zero on any failure. Every node
# (and so every process and namespace) is killed on exit; the work
# directory is removed unless GMD_KEEP_FAILED is set and the run failed.
set -euo pipefail

bindir=$(realpath "$1")
agent=$(realpath "$2")
here=$(dirname "$(realpath "$0")")
DEV=data10gmd
RSC=gmd_data10
# Region size of the state map (one cell).
REGION=$((32 << 10))

for tool in corosync pacemakerd crm crm_mon crm_resource unshare nsenter ip qemu-io python3; do
    command -v "$tool" >/dev/null || {
        echo "two_node.sh: $tool is missing: apt-get install pacemaker corosync crmsh qemu-utils util-linux iproute2 python3 (.ci/run does)" >&2
        exit 1
    }
done
[ "$(id -u)" -eq 0 ] || { echo "two_node.sh: needs root (namespaces, mounts, veth)" >&2; exit 1; }

work=$(mktemp -d /tmp/gmd-pcmk.XXXXXX)
declare -A UNSHARE=() ADDR=([alpha]=10.78.13.1 [beta]=10.78.13.2)
status=1

log() { echo "[$(date -u +%T)] $*" >&2; }

cleanup() {
    for n in "${!UNSHARE[@]}"; do
        kill -9 "${UNSHARE[$n]}" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    if [ $status -ne 0 ]; then
        for n in alpha beta; do
            log "---- $n: pacemaker.log (last lines)"
            tail -n 40 "$work/$n/log-pacemaker/pacemaker.log" 2>/dev/null | cut -c1-300 >&2 || true
            log "---- $n: gmdd.log (last lines)"
            tail -n 20 "$work/$n/gmdd.log" 2>/dev/null >&2 || true
        done
    fi
    if [ $status -ne 0 ] && [ -n "${GMD_KEEP_FAILED:-}" ]; then
        log "work directory kept: $work"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT
trap 'exit 1' INT TERM
trap 'log "FAILED: line $LINENO: $BASH_COMMAND (exit $?)"' ERR

fail() {
    log "FAILED: $*"
    exit 1
}

# The node's first process (PID 1 in its PID namespace), as the host sees it.
init_of() {
    local children pid
    children=$(cat /proc/"${UNSHARE[$1]}"/task/*/children 2>/dev/null) || return 1
    read -r pid _ <<<"$children"
    [ -n "${pid:-}" ] && echo "$pid"
}

# Runs a command on a node: inside all of its namespaces.
on() {
    local node=$1 pid
    shift
    pid=$(init_of "$node") || fail "node $node is not running"
    nsenter --all -t "$pid" "$@"
}

gmdctl_on() {
    local node=$1
    shift
    on "$node" "$bindir/gmdctl" --socket /run/gmd/gmdd.sock "$@"
}

# A field of `gmdctl status DEV --json` on a node (a.b.c path), or "".
status_field() {
    gmdctl_on "$1" status "$DEV" --json 2>/dev/null | python3 -c '
import json, sys
v = json.load(sys.stdin)[0]
for k in sys.argv[1].split("."):
    v = v[int(k)] if isinstance(v, list) else v.get(k)
    if v is None:
        break
print(json.dumps(v) if isinstance(v, (dict, list, bool)) or v is None else v)
' "$2" 2>/dev/null || true
}

# Polls a shell condition every 0.5 s for at most $1 seconds. The limits
# below add up to 230 s, within the Rust test's 240 s bound.
wait_until() {
    local secs=$1 what=$2
    local deadline=$((SECONDS + secs))
    shift 2
    while :; do
        if "$@"; then
            return 0
        fi
        [ $SECONDS -lt $deadline ] || fail "$what: not within ${secs}s"
        sleep 0.5
    done
}

start_node() {
    local n=$1
    setsid unshare --net --mount --uts --pid --fork --kill-child --mount-proc \
        --propagation private "$here/node.sh" "$n" "${ADDR[$n]}" "$work/$n" \
        "$work/cluster" "$bindir" "$agent" </dev/null >>"$work/$n.out" 2>&1 &
    UNSHARE[$n]=$!
    local i
    for ((i = 0; i < 50; i++)); do
        init_of "$n" >/dev/null && return 0
        sleep 0.1
    done
    fail "node $n did not start: $(cat "$work/$n.out")"
}

# A veth pair between the two nodes' network namespaces, addressed.
link_nodes() {
    ip link add gmd0 netns "${UNSHARE[alpha]}" type veth peer name gmd0 netns "${UNSHARE[beta]}"
    for n in alpha beta; do
        on "$n" ip addr add "${ADDR[$n]}/24" dev gmd0
        on "$n" ip link set gmd0 up
    done
}

# Prints the node where the clone is promoted (per crm_mon), or nothing.
promoted_node() {
    on "$1" crm_mon -1 --output-as=xml 2>/dev/null | python3 -c '
import sys, xml.etree.ElementTree as ET
root = ET.fromstring(sys.stdin.read())
for r in root.iter("resource"):
    if r.get("id") == sys.argv[1] and r.get("role") in ("Promoted", "Master"):
        for n in r.iter("node"):
            print(n.get("name"))
' "$RSC" 2>/dev/null || true
}

# Role (Promoted/Unpromoted/Stopped...) of the instance on node $2, per $1's view.
role_on() {
    on "$1" crm_mon -1 --output-as=xml 2>/dev/null | python3 -c '
import sys, xml.etree.ElementTree as ET
root = ET.fromstring(sys.stdin.read())
for r in root.iter("resource"):
    if r.get("id") == sys.argv[1]:
        for n in r.iter("node"):
            if n.get("name") == sys.argv[2]:
                print(r.get("role"))
' "$RSC" "$2" 2>/dev/null || true
}

online_nodes() {
    on "$1" crm_mon -1 --output-as=xml 2>/dev/null | python3 -c '
import sys, xml.etree.ElementTree as ET
root = ET.fromstring(sys.stdin.read())
print(" ".join(sorted(n.get("name") for n in root.iter("node")
                      if n.get("online") == "true" and n.get("name"))))
' 2>/dev/null || true
}

has_dc() { on "$1" crm_mon -1 --output-as=xml 2>/dev/null | grep -q '<current_dc present="true"'; }

qemu_io_on() {
    local node=$1 out
    shift
    local args=()
    for c in "$@"; do args+=(-c "$c"); done
    out=$(on "$node" qemu-io -f raw "nbd://127.0.0.1:10809/$DEV" "${args[@]}" 2>&1) ||
        fail "qemu-io on $node: $out"
    if grep -qiE "Pattern verification failed|error" <<<"$out"; then
        fail "qemu-io on $node: $out"
    fi
    log "qemu-io on $node: $(tr '\n' ' ' <<<"$out" | cut -c1-200)"
}

# ---- set-up: the same gmd configuration and corosync.conf on both nodes.
mkdir -p "$work/cluster/alpha" "$work/cluster/beta" "$work/alpha/etc-corosync" "$work/beta/etc-corosync"
cat >"$work/cluster/cluster.toml" <<EOF
[cluster]
name = "pcmk"
key_file = "cluster.key"

[sites.austin]
dominant = true

[sites.dallas]

[networks.geonet1]
datagram_size = 8192

[machines.alpha]
site = "austin"
promote_failure_timeout = 3
interfaces = { geonet1 = "${ADDR[alpha]}:6755" }
nbd_listen = "127.0.0.1:10809"

[machines.beta]
site = "dallas"
promote_failure_timeout = 3
interfaces = { geonet1 = "${ADDR[beta]}:6755" }
nbd_listen = "127.0.0.1:10809"

[devices.$DEV]
minor = 10
mode = "mwc"
role = "none"
size = "256MiB"
hwm_kib = 128
sync_rate_kib = 256
export = ["nbd"]

[devices.$DEV.machines.alpha]
data = "alpha/data10.img"
state_map = "alpha/data10.sm"

[devices.$DEV.machines.beta]
data = "beta/data10.img"
state_map = "beta/data10.sm"
EOF
"$bindir/gmdctl" genkey "$work/cluster/cluster.key" >/dev/null
for n in alpha beta; do
    truncate -s 256M "$work/cluster/$n/data10.img"
    "$bindir/gmdctl" --config "$work/cluster/cluster.toml" --machine "$n" \
        init-state "$DEV" --zeroed >/dev/null
    cat >"$work/$n/etc-corosync/corosync.conf" <<EOF
totem {
	version: 2
	cluster_name: gmdpair
	transport: knet
	crypto_cipher: none
	crypto_hash: none
}
logging {
	to_stderr: no
	to_syslog: no
	to_logfile: yes
	logfile: /var/log/corosync/corosync.log
	timestamp: on
}
quorum {
	provider: corosync_votequorum
	two_node: 1
}
nodelist {
	node {
		name: alpha
		nodeid: 1
		ring0_addr: ${ADDR[alpha]}
	}
	node {
		name: beta
		nodeid: 2
		ring0_addr: ${ADDR[beta]}
	}
}
EOF
done

# ---- the cluster starts.
t0=$SECONDS
start_node alpha
start_node beta
link_nodes
log "nodes started: alpha init ${UNSHARE[alpha]}, beta init ${UNSHARE[beta]}"
wait_until 50 "a DC elected, both nodes online" \
    eval 'has_dc alpha && [ "$(online_nodes alpha)" = "alpha beta" ]'
log "cluster up after $((SECONDS - t0))s: $(on alpha crm_mon -1 | grep -E 'Current DC|Online')"

cat >"$work/cluster/crm.txt" <<EOF
property stonith-enabled=false no-quorum-policy=ignore cluster-recheck-interval=30s
rsc_defaults resource-stickiness=100
primitive $RSC ocf:gmd:gmd \\
    params device=$DEV config=$work/cluster/cluster.toml gmdctl=$bindir/gmdctl peer_wait=10 \\
    op monitor interval=5s role=Unpromoted timeout=20s \\
    op monitor interval=3s role=Promoted timeout=20s \\
    op start timeout=90s interval=0 op stop timeout=90s interval=0 \\
    op promote timeout=90s interval=0 op demote timeout=90s interval=0
clone $RSC-clone $RSC \\
    meta promotable=true promoted-max=1 promoted-node-max=1 clone-max=2 clone-node-max=1 notify=true
EOF
on alpha crm configure load update "$work/cluster/crm.txt" 2>&1 | grep -v "Blind faith" >&2 || true

# ---- Pacemaker starts both instances and promotes one.
wait_until 30 "the clone promoted on one node" eval '[ -n "$(promoted_node alpha)" ]'
first=$(promoted_node alpha)
other=alpha
[ "$first" = alpha ] && other=beta
wait_until 20 "$other's instance unpromoted" eval '[ "$(role_on alpha "$other")" = Unpromoted ]'
[ "$(status_field "$first" role)" = primary ] || fail "$first is promoted but gmd says $(status_field "$first" role)"
[ "$(status_field "$other" role)" = secondary ] || fail "$other: gmd says $(status_field "$other" role)"
wait_until 15 "the pair connected" eval '[ "$(status_field "$first" link.connected)" = true ]'
log "promoted: $first, unpromoted: $other (after $((SECONDS - t0))s)"
echo "RESULT first_primary=$first"

# ---- the application writes on the primary.
qemu_io_on "$first" "write -P 0xa1 0 1M" "write -P 0xa2 64M 512k" "flush"

# ---- the primary node dies: every process in its PID namespace.
victim=$(init_of "$first")
pidns=$(readlink "/proc/$victim/ns/pid")
kill -9 "$victim"
wait "${UNSHARE[$first]}" 2>/dev/null || true
unset "UNSHARE[$first]"
# Nothing of that node runs any more: no process in its PID namespace.
left=0
for ns in /proc/[0-9]*/ns/pid; do
    [ "$(readlink "$ns" 2>/dev/null)" = "$pidns" ] && left=$((left + 1))
done
echo "RESULT dead_node_processes_left=$left"
t1=$SECONDS
log "killed every process of $first (its PID namespace's init $victim)"
# What the dead node's own map holds marked (its writes in flight, hot
# regions): the resync when it returns may cover these too.
# (show-state exits 2 for a dirty map.)
map_json=$("$bindir/gmdctl" --config "$work/cluster/cluster.toml" --machine "$first" \
    --socket "$work/no-gmdd.sock" show-state "$DEV" --json) || [ $? -eq 2 ] ||
    fail "show-state of $first's map: $map_json"
dead_marks=$(python3 -c 'import json,sys; print(sum(r["count"] for r in json.load(sys.stdin)["runs"]))' <<<"$map_json")
echo "RESULT dead_node_marks=$dead_marks"

wait_until 30 "Pacemaker promotes $other" eval '[ "$(promoted_node "$other")" = "$other" ]'
[ "$(status_field "$other" role)" = primary ] || fail "$other promoted but gmd says $(status_field "$other" role)"
log "failover: $other promoted $((SECONDS - t1))s after $first died"
echo "RESULT failover_promoted=$other"
echo "RESULT failover_seconds=$((SECONDS - t1))"
echo "RESULT peer_recorded_down=$(status_field "$other" peers.0.down)"

# All the data is there; the application writes on.
qemu_io_on "$other" "read -P 0xa1 0 1M" "read -P 0xa2 64M 512k" "write -P 0xb1 128M 256k" "flush"
echo "RESULT data_after_failover=ok"
stale=$(status_field "$other" map.stale)
echo "RESULT stale_regions_after_failover=$stale"

# ---- the node returns with the same files: it rejoins as secondary.
t2=$SECONDS
start_node "$first"
link_nodes
log "$first restarted"
wait_until 30 "$first online, its instance unpromoted" \
    eval '[ "$(online_nodes "$other")" = "alpha beta" ] && [ "$(role_on "$other" "$first")" = Unpromoted ]'
[ "$(promoted_node "$other")" = "$other" ] || fail "promotion moved: $(promoted_node "$other")"
wait_until 25 "$first in sync" eval '
    [ "$(status_field "$first" link.connected)" = true ] &&
    [ "$(status_field "$first" link.resync_remaining)" = 0 ] &&
    [ "$(status_field "$first" map.stale)" = 0 ] &&
    [ "$(status_field "$first" map.inconsistent)" = 0 ]'
log "$first rejoined and resynced $((SECONDS - t2))s after it restarted"
echo "RESULT rejoined_role=$(status_field "$first" role)"
echo "RESULT resync_role=$(status_field "$first" link.resync_role)"
echo "RESULT resync_full=$(status_field "$first" link.resync_full)"
echo "RESULT resync_regions=$(status_field "$first" link.resync_total)"
echo "RESULT region_bytes=$REGION"

# Both copies the same: gmd's online compare, from the primary.
cmp_out=$(gmdctl_on "$other" compare "$DEV" --rate 1000 --json 2>&1) || fail "compare: $cmp_out"
differing=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["differing"])' <<<"$cmp_out")
echo "RESULT compare_differing=$differing"
# The roles came from Pacemaker's operations through the agent: each
# node's controller logs the result of the operations it ran.
ops() { grep -c "Result of $2 operation for $RSC on $1: ok" "$work/$1/log-pacemaker/pacemaker.log" || true; }
echo "RESULT survivor_promote_ops=$(ops "$other" promote)"
echo "RESULT returned_start_ops=$(ops "$first" start)"
echo "RESULT returned_probe_running=$(ops "$first" probe)"
# Who recorded the dead node down: the agent's promote (after peer_wait),
# or gmd itself (its promote-failure timeout) — informational.
echo "RESULT agent_recorded_down=$(grep -c "recording $first down" "$work/$other/log-pacemaker/pacemaker.log" || true)"

# ---- switch back, planned: Pacemaker demotes the survivor and promotes
# the returned node, where every byte written on either side reads back.
t3=$SECONDS
on "$other" crm_resource --move --promoted -r "$RSC-clone" -N "$first" >&2
wait_until 20 "Pacemaker promotes $first back" eval '[ "$(promoted_node "$other")" = "$first" ]'
wait_until 10 "$other's instance unpromoted" eval '[ "$(role_on "$other" "$other")" = Unpromoted ]'
on "$other" crm_resource --clear -r "$RSC-clone" >&2
[ "$(status_field "$first" role)" = primary ] || fail "$first promoted but gmd says $(status_field "$first" role)"
[ "$(status_field "$other" role)" = secondary ] || fail "$other demoted but gmd says $(status_field "$other" role)"
log "switched back to $first in $((SECONDS - t3))s"
echo "RESULT switched_back_to=$first"
echo "RESULT survivor_demote_ops=$(ops "$other" demote)"
qemu_io_on "$first" "read -P 0xa1 0 1M" "read -P 0xa2 64M 512k" "read -P 0xb1 128M 256k"
echo "RESULT data_after_switch_back=ok"
log "$(on "$other" crm_mon -1 | sed -n '/Node List/,$p' | tr '\n' ' ')"
status=0
log "passed in $((SECONDS - t0))s"
