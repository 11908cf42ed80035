"""The preemption contract: the requeue rule (as the sbatch scripts ask for it) and signal handler scope."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from aidetect.errors import USER_ERROR_EXIT_CODE
from aidetect.preemption import RESUME_EXIT_CODE, StopRequest, requeue_decision


@pytest.mark.parametrize(
    ("status", "restarts", "requeue"),
    [
        (0, 0, False),  # finished
        (USER_ERROR_EXIT_CODE, 0, False),  # bad input fails again: never worth a requeue
        (RESUME_EXIT_CODE, 0, True),  # stopped with a checkpoint
        (RESUME_EXIT_CODE, 2, True),
        (RESUME_EXIT_CODE, 3, False),  # the cap counts every restart
        (137, 0, True),  # a task killed (out of memory, SIGKILL)
        (1, 1, True),  # a task failed, e.g. its peer or node was lost
        (1, 3, False),
    ],
)
def test_requeue_rule(status: int, restarts: int, requeue: bool) -> None:
    decision = requeue_decision(status, restarts, max_requeues=3)
    assert decision.requeue is requeue
    assert f"exit {status}" in decision.reason or status == 0


def test_the_sbatch_scripts_ask_the_package(tmp_path) -> None:
    def ask(status: int, restarts: int) -> subprocess.CompletedProcess:
        env = os.environ | {"SLURM_RESTART_COUNT": str(restarts), "AIDETECT_MAX_REQUEUES": "2"}
        command = [sys.executable, "-m", "aidetect.preemption", "--exit-status", str(status)]
        return subprocess.run(command, capture_output=True, text=True, env=env)

    again = ask(RESUME_EXIT_CODE, 1)
    assert again.returncode == 0 and "requeue 2 of at most 2" in again.stdout
    capped = ask(RESUME_EXIT_CODE, 2)
    assert capped.returncode == 1 and "already restarted 2 times" in capped.stdout
    assert ask(USER_ERROR_EXIT_CODE, 0).returncode == 1


def test_stop_request_catches_stop_signals_and_restores_the_handlers() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and stop.signal_name == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C asks for a stop ...
        with pytest.raises(KeyboardInterrupt):  # ... a second one interrupts at once
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before
