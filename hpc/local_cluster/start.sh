#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for the cluster tests (and for trying the sbatch and
# submitit launchers on a laptop): Debian's slurmctld, slurmd, slurmdbd (accounting, so that sacct and
# submitit see timed-out and cancelled jobs), MariaDB and munge, started by hand (no systemd needed).
#
#   sudo bash hpc/local_cluster/start.sh     # installs what is missing, writes configs, starts daemons
#   sudo bash hpc/local_cluster/stop.sh      # stops them by PID
#
# Idempotent: daemons already running are left alone. Needs root and Debian/Ubuntu's apt.
set -euo pipefail

state=/run/aidetect-slurm
cluster=aidetect-local
mkdir -p "$state"

log() { echo "[local-cluster] $*"; }

# A daemon counts as running when its PID file names a live process of that name (not a reused PID).
running() { [ -f "$state/$1.pid" ] && [ "$(ps -p "$(cat "$state/$1.pid")" -o comm= 2>/dev/null)" = "$1" ]; }

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

write_configs() {
    local node cpus memory
    node=$(slurmd -C | head -1)
    cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$node")
    memory=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
    mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
    cat >/etc/slurm/slurm.conf <<EOF
# Written by hpc/local_cluster/start.sh: one node, no cgroups, accounting through slurmdbd.
ClusterName=$cluster
SlurmctldHost=$(hostname)(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$((memory / cpus / 2))
ReturnToService=2
KillWait=5
MinJobAge=30
MailProg=/bin/true
SchedulerParameters=bf_interval=1,sched_interval=1
$(sed 's/UpTime=.*//' <<<"$node") NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    cat >/etc/slurm/slurmdbd.conf <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
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
    (cd / && setsid mariadbd --user=mysql --datadir=/var/lib/mysql --socket=/run/mysqld/mysqld.sock \
        --pid-file=/run/mysqld/mariadbd.pid --skip-networking=0 --bind-address=127.0.0.1 >"$state/mariadbd.log" 2>&1 &)
    wait_for 60 mariadb mariadb -e "select 1"
    cp /run/mysqld/mariadbd.pid "$state/mariadbd.pid"
    mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'aidetect-local';
                GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
}

start_slurm() {
    if ! running slurmdbd; then
        slurmdbd
        wait_for 60 slurmdbd sacctmgr -n list cluster
    fi
    sacctmgr -i -Q add cluster "$cluster" >/dev/null 2>&1 || true
    running slurmctld || slurmctld
    wait_for 60 slurmctld scontrol ping
    running slurmd || slurmd
    wait_for 60 "an idle node" bash -c "sinfo -h -o '%t' | grep -qE '^(idle|mix|alloc)'"
}

install_packages
write_configs
start_munge
start_mariadb
start_slurm
log "up: $(sinfo -h -o '%P %D nodes, %c CPUs, %t')"
