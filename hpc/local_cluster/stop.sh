#!/usr/bin/env bash
# Stop the local test cluster (see start.sh) and remove what it made: daemons by PID, in reverse order
# of their start; with several nodes also every process left in the node namespaces, the namespaces,
# veths, bridge and the tagged /etc/hosts lines. Safe to run twice, and when nothing runs.
#
#   sudo bash hpc/local_cluster/stop.sh            # the whole cluster
#   sudo bash hpc/local_cluster/stop.sh --node K   # only node K, as a crash would: its slurmd and
#                                                  # every process in it; start.sh --nodes N restarts it
set -uo pipefail  # no -e: one thing that is already gone must not keep the rest from being removed
state=/run/aidetect-slurm
bridge=aidetect-br0
hosts_tag="# aidetect-local-cluster"
mkdir -p "$state"
if [ "${AIDETECT_CLUSTER_LOCKED:-}" != 1 ]; then  # one start or stop at a time, see start.sh
    AIDETECT_CLUSTER_LOCKED=1 exec flock -o "$state/lock" bash "${BASH_SOURCE[0]}" "$@"
fi

log() { echo "[local-cluster] $*"; }

# stop_daemon PIDFILE NAME: TERM, then KILL after 10 s; a stale file is only removed (never kill a
# reused PID).
stop_daemon() {
    local pidfile=$1 daemon=$2 pid
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if [ "$(ps -p "$pid" -o comm= 2>/dev/null)" = "$daemon" ] && kill "$pid" 2>/dev/null; then
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null
        log "stopped $(basename "$pidfile" .pid)"
    fi
    rm -f "$pidfile"
}

# kill_namespace NAME: every process in the node's network namespace (they are all the cluster's:
# its slurmd, job steps and tasks), until none is left: a dying slurmd may still fork.
kill_namespace() {
    local pids
    for _ in $(seq 100); do
        pids=$(ip netns pids "$1" 2>/dev/null)
        [ -n "$pids" ] || return 0
        # shellcheck disable=SC2086  # one PID per word
        kill -9 $pids 2>/dev/null
        sleep 0.1
    done
    echo "[local-cluster] error: processes left in $1: $(ip netns pids "$1" | tr '\n' ' ')" >&2
    return 1
}

veths() { ip -o link show type veth 2>/dev/null | awk -F': ' '{sub(/@.*/, "", $2)} $2 ~ /^aidetect-v[0-9]+$/ {print $2}'; }

node_namespaces() { ip netns list 2>/dev/null | awk '$1 ~ /^aidetect-n[0-9]+$/ {print $1}'; }

stop_node() {  # stop_node K
    local name=aidetect-n$1
    [ -e "/run/netns/$name" ] || { echo "[local-cluster] error: no node $name" >&2; return 1; }
    kill_namespace "$name" && rm -f "$state/slurmd-$name.pid" && log "node $name is down"
}

remove_network() {
    local name veth
    for name in $(node_namespaces); do
        kill_namespace "$name"
        ip netns delete "$name" && log "removed $name"
    done
    # Deleting a namespace deletes its veth pair, but only a moment later: wait, deleting what is left.
    for _ in $(seq 50); do
        [ -z "$(veths)" ] && break
        for veth in $(veths); do ip link delete "$veth" 2>/dev/null; done
        sleep 0.1
    done
    ip link show "$bridge" >/dev/null 2>&1 && ip link delete "$bridge" && log "removed $bridge"
    if grep -qF "$hosts_tag" /etc/hosts; then
        grep -vF "$hosts_tag" /etc/hosts >"$state/hosts"
        cat "$state/hosts" >/etc/hosts  # in place: /etc/hosts may be a bind mount
        rm -f "$state/hosts"
    fi
}

if [ $# -gt 0 ]; then
    [ $# = 2 ] && [ "$1" = --node ] && [[ $2 =~ ^[0-9]+$ ]] || { echo "usage: $0 [--node K]" >&2; exit 2; }
    stop_node "$2"
    exit
fi
for pidfile in "$state"/slurmd.pid "$state"/slurmd-*.pid; do stop_daemon "$pidfile" slurmd; done
remove_network
for daemon in slurmctld slurmdbd mariadbd munged; do stop_daemon "$state/$daemon.pid" "$daemon"; done
rm -f "$state/nodes"
