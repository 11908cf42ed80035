#!/usr/bin/env bash
# Stop the local test cluster's daemons by PID (see start.sh), in reverse order of their start.
set -uo pipefail
state=/run/aidetect-slurm
for daemon in slurmd slurmctld slurmdbd mariadbd munged; do
    pidfile="$state/$daemon.pid"
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    if [ "$(ps -p "$pid" -o comm= 2>/dev/null)" != "$daemon" ]; then  # stale file: never kill a reused PID
        rm -f "$pidfile"
        continue
    fi
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null
    fi
    rm -f "$pidfile"
    echo "[local-cluster] stopped $daemon"
done
