"""The preemption contract: the requeue rule, SLURM's record of a job's attempts, the command the sbatch
scripts run after their job step, and when a stop signal is deferred or ends the process at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from aidetect.cluster.requeue import attempt_statuses
from aidetect.errors import USER_ERROR_EXIT_CODE
from aidetect.preemption import (
    LOST_PEER_EXIT_CODE,
    OUT_OF_MEMORY_EXIT_CODE,
    RESUME_EXIT_CODE,
    WATCHDOG_ABORT_STATUS,
    Stopped,
    StopRequest,
    requeue_decision,
)

CRASH = 1


@pytest.mark.parametrize(
    ("status", "restarts", "history", "requeue"),
    [
        (0, 0, [], False),  # finished
        (USER_ERROR_EXIT_CODE, 0, [], False),  # bad input fails again: never worth a requeue
        (OUT_OF_MEMORY_EXIT_CODE, 0, [], False),  # so does the same batch size
        (RESUME_EXIT_CODE, 0, [], True),  # stopped with a checkpoint
        (RESUME_EXIT_CODE, 2, [3, 3], True),
        (RESUME_EXIT_CODE, 3, [3, 3, 3], False),  # the cap counts every restart
        (LOST_PEER_EXIT_CODE, 1, [4], True),  # a rank lost or hung: as often as the cap allows
        (WATCHDOG_ABORT_STATUS, 2, [134, 4], True),  # NCCL's watchdog abort is a lost peer too
        (CRASH, 0, [], True),  # a crash once: perhaps a flaky node
        (137, 2, [3, 4], True),  # earlier stops and lost peers are no crashes
        (CRASH, 1, [137], False),  # a second crash: a bug, not the node
        (139, 2, [1, 3], False),
    ],
)
def test_requeue_rule(status: int, restarts: int, history: list[int], requeue: bool) -> None:
    decision = requeue_decision(status, restarts, 3, history)
    assert decision.requeue is requeue
    assert f"exit {status}" in decision.reason or status == 0


def test_the_status_of_each_attempt_is_slurms_record_of_its_last_step() -> None:
    # sacct -D -n -P -o JobID,State,ExitCode of a job requeued twice, read on the test cluster: the first
    # attempt's step exited 4 while srun itself returned 143 (it terminated the other task).
    sacct = textwrap.dedent(
        """\
        7|REQUEUED|0:0
        7.batch|COMPLETED|0:0
        7.0|FAILED|4:0
        7|REQUEUED|0:0
        7.batch|COMPLETED|0:0
        7.extern|COMPLETED|0:0
        7.0|CANCELLED|0:9
        7|RUNNING|0:0
        7.batch|RUNNING|0:0
        7.0|RUNNING|0:0
        """
    )
    assert attempt_statuses(sacct) == [4, 137, None]
    assert attempt_statuses("12_3|RUNNING|0:0\n12_3.0|FAILED|3:0\n") == [3]


def after_step(status: int, restarts: int, tmp_path: Path) -> subprocess.CompletedProcess:
    """What slurm/common.sh runs after its job step, on a machine without SLURM's commands."""
    profile = tmp_path / "cluster.yaml"
    profile.write_text("executor: slurm\nmax_requeues: 2\n")
    env = os.environ | {"SLURM_RESTART_COUNT": str(restarts), "AIDETECT_PROFILE": str(profile)}
    env["PATH"] = str(Path(sys.executable).parent)  # no sacct, no scontrol
    command = [sys.executable, "-m", "aidetect.cluster.requeue", "--exit-status", str(status), "--job", "41"]
    return subprocess.run(command, capture_output=True, text=True, env=env)


def test_the_sbatch_scripts_requeue_by_the_profiles_cap_and_fail_when_slurm_refuses(tmp_path: Path) -> None:
    refused = after_step(RESUME_EXIT_CODE, 1, tmp_path)
    assert "requeue 2 of at most 2: requeueing job 41" in refused.stdout
    assert "SLURM refused to requeue it" in refused.stdout and "the run is unfinished" in refused.stdout
    assert refused.returncode == RESUME_EXIT_CODE  # the job fails: never COMPLETED with the run unfinished
    capped = after_step(RESUME_EXIT_CODE, 2, tmp_path)
    assert capped.returncode == RESUME_EXIT_CODE and "already restarted 2 times" in capped.stdout
    assert after_step(OUT_OF_MEMORY_EXIT_CODE, 0, tmp_path).returncode == OUT_OF_MEMORY_EXIT_CODE
    assert after_step(0, 0, tmp_path).returncode == 0


def test_stop_request_catches_stop_signals_and_restores_the_handlers() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop, pytest.raises(Stopped), stop.deferred():
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and stop.signal_name == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C asks for a stop ...
        with pytest.raises(KeyboardInterrupt):  # ... a second one interrupts at once
            os.kill(os.getpid(), signal.SIGINT)
    # ... and a request that no loop acted on ends the section with Stopped (above)
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_stop_outside_a_deferring_section_ends_at_once() -> None:
    with StopRequest() as stop:
        with stop.deferred():
            pass  # nothing requested: leaves quietly
        with pytest.raises(Stopped, match="SIGTERM arrived before any work to save"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # never reached: the handler raises at once


def test_a_process_stuck_in_pure_python_ends_on_sigterm_with_one_line() -> None:
    """As under `timeout`, with a loop that never checks the request (a parser gone wrong)."""
    script = textwrap.dedent(
        """\
        import sys
        from aidetect.preemption import Stopped, StopRequest
        try:
            with StopRequest():
                print("looping", flush=True)
                while True:
                    pass
        except Stopped as exc:
            sys.exit(f"stopped: {exc}")
        """
    )
    started = time.monotonic()
    # -k 10: a process that swallows the SIGTERM is killed 10 s later (exit 137), failing the test, not hanging it
    command = ["timeout", "-k", "10", "2", sys.executable, "-c", script]
    result = subprocess.run(command, capture_output=True, text=True)
    assert time.monotonic() - started < 10
    assert result.stdout == "looping\n" and result.returncode == 124  # timeout says it sent its signal
    assert result.stderr.strip() == "stopped: SIGTERM arrived before any work to save: run the same command again"
