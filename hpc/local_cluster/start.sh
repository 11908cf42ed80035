#!/usr/bin/env bash
# A real SLURM cluster on this machine, for the cluster tests (and for trying the sbatch and submitit
# launchers on a laptop): Debian's slurmctld, slurmd, slurmdbd (accounting, so that sacct and submitit
# see timed-out and cancelled jobs), MariaDB and munge, started by hand (no systemd needed).
#
#   sudo bash hpc/local_cluster/start.sh             # one node: this machine, at 127.0.0.1
#   sudo bash hpc/local_cluster/start.sh --nodes 3   # three hosts aidetect-n1..n3 (what CI runs)
#   sudo bash hpc/local_cluster/stop.sh              # stops and removes everything this made
#
# With --nodes N > 1 every slurmd is a host of its own, so that multi-node jobs really cross hosts (DDP
# rendezvous by hostname, gloo over TCP between addresses): a network namespace aidetect-nK with the
# address 10.213.7.(10+K) and the hostname aidetect-nK (its own UTS namespace), joined by a veth pair
# to the bridge aidetect-br0 at 10.213.7.1, where this machine (which keeps its hostname) runs
# slurmctld, slurmdbd, MariaDB and munge for all nodes. The bridge has no other port: no traffic leaves
# this machine. Files and mounts are shared, so every node sees the same repository, runs and sockets
# (munge's included), and resolves every name through the tagged lines this adds to /etc/hosts.
#
# Idempotent: daemons already running are left alone and missing ones are started, so re-running with
# the same N brings back a node that was taken down. A different N than the running one stops the
# cluster (stop.sh) and starts it afresh. Needs root, iproute2 and Debian/Ubuntu's apt.
#
# Losing a node, for tests (N > 1): `bash hpc/local_cluster/stop.sh --node K` kills node K's slurmd
# and every process of that node at once (what `ip netns pids aidetect-nK` lists: its job steps and
# tasks too), as a crash would; SLURM marks it DOWN after SlurmdTimeout. `bash
# hpc/local_cluster/start.sh --nodes N` starts its slurmd again; it returns to service on registering.
set -euo pipefail

state=/run/aidetect-slurm
cluster=aidetect-local
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
subnet=10.213.7                # a private /24 that only this script's bridge and namespaces use
bridge=aidetect-br0
controller=$subnet.1
hosts_tag="# aidetect-local-cluster"
nodes=1
mkdir -p "$state"
# One start or stop at a time (others may run tests and start the cluster meanwhile). flock -o: the
# daemons started here must not inherit, and so hold, the lock. stop.sh, called from here, knows.
if [ "${AIDETECT_CLUSTER_LOCKED:-}" != 1 ]; then
    AIDETECT_CLUSTER_LOCKED=1 exec flock -o "$state/lock" bash "${BASH_SOURCE[0]}" "$@"
fi

log() { echo "[local-cluster] $*"; }

usage() { echo "usage: $0 [--nodes N]" >&2; exit 2; }

while [ $# -gt 0 ]; do
    case $1 in
        --nodes) [ $# -ge 2 ] && [[ $2 =~ ^[1-9][0-9]?$ ]] || usage; nodes=$2; shift 2 ;;
        *) usage ;;
    esac
done

node_name() { echo "aidetect-n$1"; }
node_addr() { echo "$subnet.$((10 + $1))"; }

# A daemon counts as running when its PID file names a live process of that name (not a reused PID).
running() { [ -f "$state/$1.pid" ] && [ "$(ps -p "$(cat "$state/$1.pid")" -o comm= 2>/dev/null)" = "$1" ]; }

# Node K's slurmd runs when its PID file names a live slurmd inside node K's network namespace.
node_running() {
    local name pid
    name=$(node_name "$1")
    [ -f "$state/slurmd-$name.pid" ] || return 1
    pid=$(cat "$state/slurmd-$name.pid")
    [ "$(ps -p "$pid" -o comm= 2>/dev/null)" = slurmd ] && [ "$(ip netns identify "$pid" 2>/dev/null)" = "$name" ]
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2
    shift 2
    for _ in $(seq $((seconds * 10))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    echo "[local-cluster] error: $what did not come up within ${seconds}s; see $state/*.log" >&2
    return 1
}

install_packages() {
    local packages=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)
    local missing=()
    for package in "${packages[@]}"; do
        dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]}"
        apt-get update -qq
        # policy-rc.d keeps apt from trying to start services (there may be no init system to do it).
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >"$state/apt.log" 2>&1
    fi
}

# A cluster of another size is running (no record means one node: the layout before --nodes existed).
restart_if_resized() {
    local recorded=1
    [ -f "$state/nodes" ] && recorded=$(cat "$state/nodes")
    if [ "$recorded" != "$nodes" ] && { running slurmctld || running slurmd || ls "$state"/slurmd-*.pid >/dev/null 2>&1; }; then
        log "resizing from $recorded to $nodes node(s): stopping the running cluster"
        bash "$here/stop.sh"
    fi
    echo "$nodes" >"$state/nodes"
}

# The bridge, and per node a namespace with loopback and one veth end (eth0) on the bridge.
setup_network() {
    if ! ip link show "$bridge" >/dev/null 2>&1; then
        if ip route show to match "$controller" | grep -qv '^default'; then
            echo "[local-cluster] error: $subnet.0/24 is already routed here; not adding a bridge" >&2
            return 1
        fi
        ip link add "$bridge" type bridge forward_delay 0
        ip addr add "$controller/24" dev "$bridge"
    fi
    ip link set "$bridge" up
    local k name veth
    for k in $(seq "$nodes"); do
        name=$(node_name "$k")
        veth=aidetect-v$k
        [ -e "/run/netns/$name" ] || ip netns add "$name"
        if ! ip -n "$name" link show eth0 >/dev/null 2>&1; then
            ip link delete "$veth" 2>/dev/null || true  # the unpaired half of a namespace deleted before
            ip link add "$veth" type veth peer name eth0 netns "$name"
        fi
        ip link set "$veth" master "$bridge" up
        ip -n "$name" addr replace "$(node_addr "$k")/24" dev eth0
        ip -n "$name" link set eth0 up
        ip -n "$name" link set lo up
    done
}

# Names first in /etc/hosts, so that this machine's hostname resolves to the bridge address (which
# the nodes can reach) before its loopback line. Rewritten in place: /etc/hosts may be a bind mount.
write_hosts() {
    local lines k
    lines="$controller $(hostname) $hosts_tag"
    for k in $(seq "$nodes"); do lines+=$'\n'"$(node_addr "$k") $(node_name "$k") $hosts_tag"; done
    { echo "$lines"; grep -vF "$hosts_tag" /etc/hosts || true; } >"$state/hosts"
    cat "$state/hosts" >/etc/hosts
    rm -f "$state/hosts"
}

# NodeName lines: this machine's CPUs and memory (from slurmd -C) for each node; nodes oversubscribe
# the machine, which the tests' tiny jobs do not mind.
node_lines() {
    local node=$1 k
    if [ "$nodes" = 1 ]; then
        echo "$(sed 's/UpTime=.*//' <<<"$node") NodeAddr=127.0.0.1 State=UNKNOWN"
        return
    fi
    for k in $(seq "$nodes"); do
        echo "$(sed "s/UpTime=.*//; s/^NodeName=[^ ]*/NodeName=$(node_name "$k")/" <<<"$node")" \
            "NodeAddr=$(node_addr "$k") NodeHostname=$(node_name "$k") State=UNKNOWN"
    done
}

write_configs() {
    local node cpus memory address=127.0.0.1 per_node="" timeouts=""
    node=$(slurmd -C | head -1)
    cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$node")
    memory=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
    if [ "$nodes" -gt 1 ]; then
        address=$controller
        per_node=-%n  # every slurmd shares this filesystem: PID, log and spool per node name
        # A lost node is noticed within seconds (pinged every SlurmdTimeout/3), not after 5 minutes.
        timeouts=$'SlurmdTimeout=15\nMessageTimeout=10'
    fi
    mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
    cat >/etc/slurm/slurm.conf <<EOF
# Written by hpc/local_cluster/start.sh: $nodes node(s), no cgroups, accounting through slurmdbd.
ClusterName=$cluster
SlurmctldHost=$(hostname)($address)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd${per_node:+/%n}
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd$per_node.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd$per_node.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$address
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$((memory / cpus / 2))
ReturnToService=2
KillWait=5
MinJobAge=30
MailProg=/bin/true
SchedulerParameters=bf_interval=1,sched_interval=1
${timeouts}
$(node_lines "$node")
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    cat >/etc/slurm/slurmdbd.conf <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=$address
SlurmUser=root
PidFile=$state/slurmdbd.pid
LogFile=$state/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=aidetect-local
StorageLoc=slurm_acct_db
EOF
    chmod 600 /etc/slurm/slurmdbd.conf
}

start_munge() {
    running munged && return
    mkdir -p /run/munge && chown munge:munge /run/munge
    [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    runuser -u munge -- /usr/sbin/munged 2>>"$state/munged.log"
    wait_for 10 munged munge -n
    cp /run/munge/munged.pid "$state/munged.pid"
}

start_mariadb() {
    running mariadbd && return
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
    [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >"$state/mariadb-install.log" 2>&1
    # exec: no shell stays behind holding this script's stdout (a caller reading it would never see EOF).
    (cd / && exec setsid mariadbd --user=mysql --datadir=/var/lib/mysql --socket=/run/mysqld/mysqld.sock \
        --pid-file=/run/mysqld/mariadbd.pid --skip-networking=0 --bind-address=127.0.0.1) \
        </dev/null >"$state/mariadbd.log" 2>&1 &
    wait_for 60 mariadb mariadb -e "select 1"
    cp /run/mysqld/mariadbd.pid "$state/mariadbd.pid"
    mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'aidetect-local';
                GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
}

# Node K's slurmd in its namespaces: nsenter joins only the network namespace (`ip netns exec` would
# also remount /sys, hiding the cgroup mount slurmd needs), unshare gives it its own hostname.
start_node() {
    local name
    name=$(node_name "$1")
    mkdir -p "/var/spool/slurmd/$name"
    nsenter --net="/run/netns/$name" unshare --uts sh -c "hostname $name && exec slurmd -N $name"
}

# Every node registered and answering (no '*' after its state, not down or unknown).
nodes_up() {
    local states
    states=$(sinfo -h -N -o '%t') || return 1
    [ "$(grep -cE '^(idle|mix|alloc|comp)$' <<<"$states")" = "$nodes" ]
}

start_slurm() {
    if ! running slurmdbd; then
        slurmdbd
        wait_for 60 slurmdbd sacctmgr -n list cluster
    fi
    sacctmgr -i -Q add cluster "$cluster" >/dev/null 2>&1 || true
    running slurmctld || slurmctld
    wait_for 60 slurmctld scontrol ping
    if [ "$nodes" = 1 ]; then
        running slurmd || slurmd
        wait_for 60 "an idle node" bash -c "sinfo -h -o '%t' | grep -qE '^(idle|mix|alloc)'"
        return
    fi
    local k
    for k in $(seq "$nodes"); do node_running "$k" || start_node "$k"; done
    wait_for 60 "all $nodes nodes" nodes_up
}

install_packages
restart_if_resized
if [ "$nodes" -gt 1 ]; then
    setup_network
    write_hosts
fi
write_configs
start_munge
start_mariadb
start_slurm
log "up: $(sinfo -h -o '%P %D nodes (%N), %c CPUs each, %t' | paste -sd ';')"
