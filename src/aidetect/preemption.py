"""The preemption contract, in one place: which signals stop a run and when, the exit codes that tell
how a task ended, and whether a SLURM job that ended that way goes back in the queue.

Who sends what: SLURM sends SIGTERM to every process of a job step (DataLoader workers included) at a
time limit, on preemption and on ``scancel``, then SIGKILL after ``KillWait``; our sbatch scripts ask
for SIGUSR1 and submitit for SIGUSR2 ahead of the time limit; ``timeout``, container runtimes and the
end of a terminal session send SIGTERM, and Ctrl-C sends SIGINT to the whole foreground process group.
In the main process (``StopRequest``) a stop signal is deferred only while a loop that checks it runs
(``stop.deferred()``: training and evaluation steps, their checkpoint saves, pack's images): the loop
acts on it at a step every rank agrees on, saves and exits 3. In any other phase (start-up, shard
checks, the audit, plotting, a stuck parser) it ends the process at once with ``Stopped``. Helper
processes (DataLoader workers, pack's pool) ignore stop signals and are shut down by their parent, so
a signal to the whole process group cannot kill them under a parent that is still saving its work.

Exit codes (``Outcome`` subclasses carry theirs): 0 finished; 2 a user error (``aidetect.errors``); 3
stopped on a signal, work saved; 4 a peer rank was lost or stopped answering (a collective failed or
timed out); 5 CUDA out of memory; 134 (SIGABRT) is how the NCCL watchdog ends a process whose peer is
gone, so it counts as a lost peer too; anything else is a crash.

The requeue rule (``requeue_decision``; used by ``slurm/common.sh`` and by the submitit job through
``aidetect.cluster.requeue``): never after 0, 2 or 5 (the same error would recur on every attempt);
after 3 or a lost peer while the job has been restarted fewer than ``max_requeues`` times; after a
crash only if no earlier attempt of the job crashed (one flaky node is forgiven, a bug is not).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import FrameType, TracebackType

from aidetect.errors import USER_ERROR_EXIT_CODE

RESUME_EXIT_CODE = 3  # "stopped on a signal, work saved: run the same command again to continue"
LOST_PEER_EXIT_CODE = 4  # another rank died or stopped answering: requeue and resume from last.pt
OUT_OF_MEMORY_EXIT_CODE = 5  # CUDA out of memory: the same batch size fails again, never requeued
WATCHDOG_ABORT_STATUS = 128 + signal.SIGABRT  # NCCL's watchdog aborting a process whose peer is gone
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


class Outcome(Exception):
    """How a run ended, other than finished or a user error: the command line prints ``headline``
    and the message as one line and exits with ``exit_code``."""

    exit_code = 1
    headline = "failed"


class Stopped(Outcome):
    """Raised once the work done so far is saved (or when there was nothing to save yet)."""

    exit_code = RESUME_EXIT_CODE
    headline = "stopped by a signal"


class LostPeer(Outcome):
    """A collective failed or timed out: another rank died, hung or lost its link."""

    exit_code = LOST_PEER_EXIT_CODE
    headline = "lost a peer"


class OutOfMemory(Outcome):
    """CUDA ran out of memory; the message names the per-GPU batch size."""

    exit_code = OUT_OF_MEMORY_EXIT_CODE
    headline = "out of GPU memory"


class StopRequest:
    """While active (``with StopRequest() as stop``), a stop signal raises ``Stopped`` at once, unless a
    deferring section runs (``with stop.deferred():``): there it sets ``stop.requested`` for the section's
    loop to act on, and a request no loop acted on raises ``Stopped`` when the outermost section ends.
    The previous handlers come back on exit. A second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self.previous: dict[int, object] = {}
        self.depth = 0  # deferring sections entered and not left

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

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A section whose loop checks ``requested`` (and saves before it stops)."""
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if self.requested and not self.depth:
            raise Stopped(f"{self.signal_name} arrived after the last step that could act on it: run it again")

    def request(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        if not self.depth:
            raise Stopped(f"{self.signal_name} arrived before any work to save: run the same command again")


def ignore_stop_signals(*_: object) -> None:
    """For helper processes (a DataLoader ``worker_init_fn``, a pool ``initializer``): their parent
    decides when they end, so a signal sent to the whole process group must not kill them first."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


@dataclass(frozen=True)
class RequeueDecision:
    requeue: bool
    reason: str


def outcome_of(status: int) -> str:
    """What an exit status (a task's, or 128 + N for signal N) says about how the task ended."""
    known = {
        0: "finished",
        USER_ERROR_EXIT_CODE: "user error",
        RESUME_EXIT_CODE: "stopped",
        LOST_PEER_EXIT_CODE: "lost peer",
        WATCHDOG_ABORT_STATUS: "lost peer",
        OUT_OF_MEMORY_EXIT_CODE: "out of memory",
    }
    return known.get(status, "crash")


def requeue_decision(status: int, restarts: int, max_requeues: int, history: Sequence[int] = ()) -> RequeueDecision:
    """Whether a job whose tasks ended with ``status`` goes back in the queue, having been restarted
    ``restarts`` times (``SLURM_RESTART_COUNT``), its earlier attempts having ended with ``history``."""
    outcome = outcome_of(status)
    said = f"exit {status} ({outcome})"
    if outcome == "finished":
        return RequeueDecision(False, "finished")
    if outcome == "user error":
        return RequeueDecision(False, f"{said}: an error in the input or configuration, see the log")
    if outcome == "out of memory":
        return RequeueDecision(False, f"{said}: it would run out again; lower data.batch_size, see the log")
    if restarts >= max_requeues:
        return RequeueDecision(False, f"{said}, but already restarted {restarts} times (max_requeues)")
    if outcome == "crash" and any(outcome_of(earlier) == "crash" for earlier in history):
        return RequeueDecision(False, f"{said} again after a crash was requeued once: not a flaky node, see the log")
    return RequeueDecision(True, f"{said}: requeue {restarts + 1} of at most {max_requeues}")
