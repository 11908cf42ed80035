"""Requeueing a SLURM job by the rule of ``aidetect.preemption``: what SLURM recorded of the job's
attempts, the request itself, and the command the sbatch scripts run after their job step.

The status of an attempt is SLURM's record of its job step (``sacct``), not srun's exit status: when one
task exits 4 and srun then terminates the others, srun returns 143 (SIGTERM) while the step's record
says 4. Earlier attempts (``sacct --duplicates``) tell whether a crash was already forgiven once.

``python -m aidetect.cluster.requeue --exit-status N --job ID`` is what ``slurm/common.sh`` runs after its
job step (see ``main``); the cap is the ``max_requeues`` of the profile ``$AIDETECT_PROFILE`` names (the
same key submitit jobs read), else the default of ``Profile.max_requeues``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence

from aidetect.cluster.profiles import Profile, load_profile
from aidetect.errors import UserError
from aidetect.preemption import RequeueDecision, requeue_decision

SACCT_WAIT_S = 10.0  # how long the step's end may take to reach the accounting records
PROFILE_ENV = "AIDETECT_PROFILE"


def slurm_status(exit_code: str) -> int:
    """sacct's ``CODE:SIGNAL`` as an exit status: the code, else 128 + the signal, else 0."""
    code, _, signum = exit_code.partition(":")
    return int(code) or (128 + int(signum) if signum and int(signum) else 0)


def attempt_statuses(sacct: str) -> list[int | None]:
    """One status per attempt of a job, oldest first, from ``sacct -D -n -P -o JobID,State,ExitCode``: the
    status of the attempt's last job step that ended (None when none ended: killed before or still running)."""
    attempts: list[int | None] = []
    for line in sacct.splitlines():
        job_id, state, exit_code = [*line.split("|"), "", ""][:3]
        step = job_id.partition(".")[2]
        if not step:  # the job's own row starts an attempt
            attempts.append(None)
        elif step.isdigit() and attempts and state not in ("RUNNING", "PENDING", ""):
            attempts[-1] = slurm_status(exit_code)
    return attempts


def job_attempts(job_id: str) -> list[int | None] | None:
    """``attempt_statuses`` of a job as SLURM's accounting has them now; None without accounting."""
    command = ["sacct", "-j", job_id, "-D", "-n", "-P", "-o", "JobID,State,ExitCode"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return attempt_statuses(result.stdout)


def this_attempt(job_id: str, fallback: int) -> tuple[int, list[int]]:
    """(the status of this attempt's last job step, the statuses of the earlier attempts), waiting up to
    ``SACCT_WAIT_S`` for the step's record; ``fallback`` (srun's status) when there is none."""
    deadline = time.monotonic() + SACCT_WAIT_S
    while True:
        attempts = job_attempts(job_id)
        if attempts is None:
            return fallback, []
        current = attempts[-1] if attempts else None
        if current is not None or time.monotonic() > deadline:
            return (fallback if current is None else current), before_last(attempts)
        time.sleep(0.5)


def earlier_attempts(job_id: str) -> list[int]:
    """The statuses of the job's attempts before this (running) one."""
    return before_last(job_attempts(job_id) or [])


def before_last(attempts: list[int | None]) -> list[int]:
    """The known statuses of every attempt but the last (this one)."""
    return [status for status in attempts[:-1] if status is not None]


def request_requeue(job_id: str) -> str | None:
    """Ask SLURM to requeue ``job_id``; None when it did, else its reason for refusing (one line)."""
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, check=False)
    except OSError as exc:
        return f"scontrol: {exc.strerror}"
    said = (result.stderr or result.stdout).strip().splitlines()
    return None if result.returncode == 0 else said[-1] if said else f"scontrol exited {result.returncode}"


def requeue_allowed(job_id: str) -> bool:
    """Whether the job may be requeued at all (``Requeue=1``); a refusal of a job that may was another
    task's request arriving first."""
    result = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=False)
    return "Requeue=1" in result.stdout.split()


def refused(job_id: str, reason: str) -> str:
    """The one line a job whose requeue SLURM refused ends with."""
    return (
        f"job {job_id}: SLURM refused to requeue it ({reason}); the run is unfinished: submit the same "
        "command again to resume it from last.pt"
    )


def profile_max_requeues() -> int:
    """``max_requeues`` of the profile ``$AIDETECT_PROFILE`` names, else the default of ``Profile``."""
    name = os.environ.get(PROFILE_ENV)
    return load_profile(name).max_requeues if name else Profile.max_requeues


def decide(status: int, job_id: str) -> tuple[int, RequeueDecision]:
    """(the attempt's status, the rule's decision) for the job step of ``job_id`` that just ended, srun
    having returned ``status``."""
    status, history = this_attempt(job_id, status)
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    return status, requeue_decision(status, restarts, profile_max_requeues(), history)


def main(argv: Sequence[str] | None = None) -> int:
    """What an sbatch script does after its job step: decide by the rule, requeue the job when it says so.
    Exits 0 when the job was requeued or finished, else with the step's status (the job fails), also
    when SLURM refused the requeue."""
    parser = argparse.ArgumentParser(prog="python -m aidetect.cluster.requeue", description=main.__doc__)
    parser.add_argument("--exit-status", type=int, required=True, help="srun's exit status (used without sacct)")
    parser.add_argument("--job", required=True, help="the job (JOBID or ARRAYID_TASK) whose job step just ended")
    args = parser.parse_args(argv)
    try:
        status, decision = decide(args.exit_status, args.job)
    except UserError as exc:
        print(f"[aidetect-sbatch] error: {PROFILE_ENV}: {exc}", flush=True)
        return args.exit_status or 1
    if not decision.requeue:
        print(f"[aidetect-sbatch] not requeued: {decision.reason}", flush=True)
        return status
    print(f"[aidetect-sbatch] {decision.reason}: requeueing job {args.job}", flush=True)
    reason = request_requeue(args.job)
    if reason is None:
        return 0
    print(f"[aidetect-sbatch] error: {refused(args.job, reason)}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
