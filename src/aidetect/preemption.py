"""The preemption contract, in one place: which signals stop a run, the exit code that means "stopped
with a checkpoint, run me again", and whether a SLURM job that ended should be requeued.

Who sends what: SLURM sends SIGTERM to every process of a job step (DataLoader workers included) at a
time limit, on preemption and on ``scancel``, then SIGKILL after ``KillWait``; our sbatch scripts ask
for SIGUSR1 and submitit for SIGUSR2 ahead of the time limit; ``timeout``, container runtimes and the
end of a terminal session send SIGTERM, and Ctrl-C sends SIGINT to the whole foreground process group.
The main process turns any of them into a stop request (acted on at a step every rank agrees on);
helper processes (DataLoader workers, pack's pool) ignore them and are shut down by their parent, so
a signal to the whole process group cannot kill them under a parent that is still saving its work.

The requeue rule (used by ``slurm/common.sh`` through ``python -m aidetect.preemption`` and by the
submitit job): a job that ended in success (0) or with a user error (2: bad input, it would fail again)
is not requeued; anything else (stopped with a checkpoint, a rank killed, a node lost, out of memory)
is, while ``SLURM_RESTART_COUNT`` is below ``max_requeues``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType, TracebackType

from aidetect.errors import USER_ERROR_EXIT_CODE

RESUME_EXIT_CODE = 3  # "stopped on a signal, work saved: run the same command again to continue"
DEFAULT_MAX_REQUEUES = 10
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


class Stopped(Exception):
    """Raised once the work done so far is saved; the command line turns it into RESUME_EXIT_CODE."""


class StopRequest:
    """While active (``with StopRequest() as stop``), the stop signals set ``stop.requested`` instead of
    ending the process; the previous handlers come back on exit. A second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        for signum in STOP_SIGNALS:
            self.previous[signum] = signal.signal(signum, self.request)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self.previous.clear()

    def request(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name


def ignore_stop_signals(*_: object) -> None:
    """For helper processes (a DataLoader ``worker_init_fn``, a pool ``initializer``): their parent
    decides when they end, so a signal sent to the whole process group must not kill them first."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


@dataclass(frozen=True)
class RequeueDecision:
    requeue: bool
    reason: str


def requeue_decision(exit_status: int, restarts: int, max_requeues: int) -> RequeueDecision:
    """Whether a job whose tasks ended with ``exit_status`` (srun's: the highest of its tasks, 128 + N for
    a signal) should go back in the queue, having been restarted ``restarts`` times already."""
    if exit_status == 0:
        return RequeueDecision(False, "finished")
    if exit_status == USER_ERROR_EXIT_CODE:
        return RequeueDecision(False, f"exit {exit_status}: an error in the input or configuration, see the log")
    if restarts >= max_requeues:
        return RequeueDecision(False, f"exit {exit_status}, but already restarted {restarts} times (max_requeues)")
    why = "stopped with a checkpoint" if exit_status == RESUME_EXIT_CODE else "a task failed or was lost"
    return RequeueDecision(True, f"exit {exit_status} ({why}): requeue {restarts + 1} of at most {max_requeues}")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m aidetect.preemption --exit-status N``: prints the decision; exit 0 means requeue."""
    parser = argparse.ArgumentParser(prog="python -m aidetect.preemption", description=main.__doc__)
    parser.add_argument("--exit-status", type=int, required=True, help="the exit status of the job's tasks")
    parser.add_argument(
        "--max-requeues",
        type=int,
        default=int(os.environ.get("AIDETECT_MAX_REQUEUES", DEFAULT_MAX_REQUEUES)),
        help=f"default: $AIDETECT_MAX_REQUEUES or {DEFAULT_MAX_REQUEUES}",
    )
    args = parser.parse_args(argv)
    decision = requeue_decision(args.exit_status, int(os.environ.get("SLURM_RESTART_COUNT", "0")), args.max_requeues)
    print(decision.reason)
    return 0 if decision.requeue else 1


if __name__ == "__main__":
    sys.exit(main())
