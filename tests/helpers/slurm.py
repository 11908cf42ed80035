"""Jobs on the local SLURM test cluster (hpc/local_cluster/start.sh): submitting them, following them
through SLURM's accounting and their logs, and the runs without SLURM they are compared with."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from helpers.commands import ONE_THREAD, run_cli, torchrun

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "slurm" / "train.sbatch"
START = "start one with 'sudo bash hpc/local_cluster/start.sh --nodes 3'"
SINFO_TIMEOUT_S = 15


def options(epochs: int, batch_size: int, *extra: str) -> list[str]:
    """`aidetect train` options for a small, fast CPU run."""
    return [
        "--model",
        "seed_cnn1",
        "--epochs",
        str(epochs),
        "--batch-size",
        str(batch_size),
        "--precision",
        "fp32",
        "--set",
        "data.workers=1",
        "--set",
        "train.log_every=1",
        *extra,
    ]


ARGS = options(2, 4, "--set", "train.deterministic=true")


def unanswered() -> str | None:
    """Why no SLURM cluster answers on this machine, in one line; None when ``sinfo`` answers."""
    if shutil.which("sinfo") is None:
        return f"no SLURM cluster answers: sinfo is not installed; {START}"
    try:
        result = subprocess.run(["sinfo"], capture_output=True, text=True, timeout=SINFO_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"no SLURM cluster answers: sinfo said nothing for {SINFO_TIMEOUT_S} s; {START}"
    if result.returncode:
        said = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]
        return f"no SLURM cluster answers: sinfo failed ({said}); {START}"
    return None


def cluster_nodes() -> list[str]:
    """The cluster's node names, sorted."""
    return sorted(set(subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True).stdout.split()))


def submit(*args: str, cwd: Path) -> str:
    """``sbatch ARGS...`` from ``cwd``, its jobs running this checkout in this environment; the job id."""
    env = os.environ | {"AIDETECT_VENV": sys.prefix, "AIDETECT_REPO": str(REPO), "WANDB_MODE": "offline"}
    result = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, cwd=cwd, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def submit_cli(*args: str) -> subprocess.CompletedProcess:
    """``aidetect submit ARGS...`` in a fresh process, wandb offline."""
    return run_cli("submit", *args, env=os.environ | {"WANDB_MODE": "offline"})


def submit_training(pack: Path, tmp_path: Path, args: list[str], *sbatch_options: str) -> tuple[str, Path, Path]:
    """slurm/train.sbatch on ``pack`` with ``args``: (job id, run folder, log file)."""
    out = tmp_path / "job"
    job = submit(*sbatch_options, str(SBATCH), "--data", str(pack), "--out", str(out), *args, cwd=tmp_path)
    return job, out, tmp_path / f"aidetect-train-{job}.out"


def state(job: str) -> str:
    """The job's state as SLURM's accounting has it; UNKNOWN before it has any."""
    result = subprocess.run(["sacct", "-j", job, "-X", "-n", "-o", "State"], capture_output=True, text=True)
    return result.stdout.strip().split()[0] if result.stdout.strip() else "UNKNOWN"


def sacct_field(job_id: str, field: str) -> str:
    """One field of a job as SLURM's accounting recorded it (for an array task: that task)."""
    result = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", field], capture_output=True, text=True)
    return result.stdout.strip()


def wait_for(job: str, states: set[str], timeout: float = 300) -> str:
    """The job's state once it is one of ``states``; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = state(job)
        if current in states:
            return current
        time.sleep(0.5)
    raise AssertionError(f"job {job} still {state(job)} after {timeout}s")


def wait_for_line(path: Path, pattern: str, timeout: float = 300) -> None:
    """Returns once the file ``path`` holds a match of ``pattern``; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and re.search(pattern, path.read_text()):
            return
        time.sleep(0.1)
    raise AssertionError(f"{pattern!r} never appeared in {path}")


def release(job: str) -> None:
    """Start a requeued job now instead of after SLURM's ~2 minute hold. Not within the same second as
    the requeue: slurmd refuses a relaunch whose credential is no newer than the revoked one."""
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)


def hosts_of_ranks(log: Path) -> dict[str, list[int]]:
    """Rank 0's "ranks by host: HOST: 0,1; HOST2: 2,3" line, as {HOST: [0, 1], HOST2: [2, 3]}."""
    match = re.search(r"ranks by host: (.*)", log.read_text())
    assert match, f"no 'ranks by host' line in {log}"
    hosts = (entry.split(": ") for entry in match.group(1).strip().split("; "))
    return {host: [int(rank) for rank in ranks.split(",")] for host, ranks in hosts}


def direct_run(pack: Path, out: Path, args: Sequence[str] = ARGS) -> None:
    """The jobs' training (``args``) without SLURM, one thread per process as the jobs' tasks
    (cpus-per-task=1), so that float sums happen in the same order and weights can be compared bit for bit."""
    result = run_cli("train", "--data", str(pack), "--out", str(out), *args, env=os.environ | ONE_THREAD)
    assert result.returncode == 0, result.stderr[-2000:]


def two_rank_run(pack: Path, out: Path) -> None:
    """The jobs' two-task training (ARGS) under torchrun on this host, one thread per process as theirs."""
    result = torchrun("train", "--data", str(pack), "--out", str(out), *ARGS)
    assert result.returncode == 0, result.stderr[-2000:]
