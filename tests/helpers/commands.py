"""The command line as a user starts it, in fresh processes: alone, under torchrun, or signalled mid-run."""

from __future__ import annotations

import os
import subprocess
import sys

# One thread per process, as a SLURM task with cpus-per-task=1 has, and so that two ranks do not fight
# over the cores: float sums then happen in the same order in every run and weights compare bit for bit.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def run_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """Run the installed command line as a user would, in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "aidetect.cli", *args], capture_output=True, text=True, timeout=600, **kwargs
    )


def torchrun_command(*program: str) -> list[str]:
    """torchrun starting two processes on this host, each running ``program`` (``-m MODULE ARGS...`` or a
    script and its arguments)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *program]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """The command line ``aidetect ARGS...`` in two processes under torchrun, one thread each."""
    return subprocess.run(
        torchrun_command("-m", "aidetect.cli", *args),
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ | ONE_THREAD,
    )


def signal_group_at(
    command: list[str], pattern: str, signum: int, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Start ``command`` in a process group of its own and, once its output shows ``pattern``, signal the
    whole group, as SLURM (every process of the step), ``timeout`` and a terminal's Ctrl-C do."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env
    )
    for line in process.stdout:
        if pattern in line:
            os.killpg(process.pid, signum)
            break
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
