"""Faults as a multi-host SLURM cluster delivers them, on the local test cluster (start.sh --nodes N >= 2):
SIGTERM to every process of a two-node job, one rank killed, one node lost. Each job must end its step
quickly, be requeued, resume from last.pt and finish with the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers.slurm import (
    ARGS,
    REPO,
    cluster_nodes,
    hosts_of_ranks,
    release,
    state,
    submit_cli,
    submit_training,
    two_rank_run,
    wait_for,
    wait_for_line,
)
from helpers.training import weights

from aidetect.checkpoint import load_checkpoint

CLUSTER = REPO / "hpc" / "local_cluster"
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}

pytestmark = pytest.mark.multinode


@pytest.fixture(scope="module")
def reference(tiny_pack: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The same training as the jobs' two ranks, uninterrupted, under torchrun on one host."""
    out = tmp_path_factory.mktemp("reference") / "run"
    two_rank_run(tiny_pack, out)
    return weights(out)


def two_node_job(tiny_pack: Path, tmp_path: Path) -> tuple[str, Path, Path]:
    """A 2-node, 1-task-per-node training job, followed until it is in the middle of its second epoch."""
    job, out, log = submit_training(tiny_pack, tmp_path, ARGS, "--nodes=2", "--ntasks-per-node=1")
    wait_for_line(log, r"epoch 2 batch 3/")
    return job, out, log


def finish_and_compare(job: str, out: Path, log: Path, reference: dict[str, torch.Tensor]) -> None:
    release(job)
    assert wait_for(job, ENDED) == "COMPLETED", log.read_text()[-3000:]
    text = log.read_text()
    assert "resumed from" in text
    assert len(hosts_of_ranks(log)) == 2  # the resumed run crossed hosts too
    result = weights(out)
    assert all(torch.equal(reference[key], result[key]) for key in reference)


def test_sigterm_to_every_process_of_a_two_node_job_checkpoints_requeues_and_resumes(
    tiny_pack: Path, tmp_path: Path, reference: dict[str, torch.Tensor]
) -> None:
    job, out, log = two_node_job(tiny_pack, tmp_path)
    # Preemption as SLURM delivers it (GraceTime): SIGTERM to every process of the job step, DataLoader
    # workers included, on every node.
    subprocess.run(["scancel", "--signal=TERM", job], check=True)
    wait_for_line(log, r"requeueing job")
    wait_for(job, {"PENDING", "REQUEUED"})
    position = load_checkpoint(out / "last.pt").state
    assert position.epoch == 1 and position.batch >= 3  # mid-epoch, at a step both ranks agreed on
    assert "Traceback" not in log.read_text()
    finish_and_compare(job, out, log, reference)


def task_pid(job: str, rank: int) -> int:
    """The training process of ``rank`` of ``job``: a Python process that SLURM started (not a DataLoader
    worker or wandb's service, whose parent is the training process)."""
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes().split(b"\0")
            parent = (Path("/proc") / (entry / "stat").read_text().split()[3] / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        ours = f"SLURM_JOB_ID={job}".encode() in environ and f"SLURM_PROCID={rank}".encode() in environ
        if ours and b"python" in command.split(b"\0")[0] and b"python" not in parent:
            return int(entry.name)
    raise AssertionError(f"no rank {rank} process of job {job}")


def test_a_killed_rank_ends_the_step_at_once_and_the_job_resumes(
    tiny_pack: Path, tmp_path: Path, reference: dict[str, torch.Tensor]
) -> None:
    job, out, log = two_node_job(tiny_pack, tmp_path)
    killed = time.monotonic()
    os.kill(task_pid(job, rank=1), signal.SIGKILL)  # out of memory, a segfault: no chance to save
    wait_for_line(log, r"requeueing job", timeout=120)
    waited = time.monotonic() - killed
    print(f"\n[figure] surviving rank's job step ended {waited:.1f} s after rank 1 was killed")
    assert waited < 60, f"the surviving rank waited {waited:.0f} s"
    wait_for(job, {"PENDING", "REQUEUED"})
    position = load_checkpoint(out / "last.pt").state
    assert (position.epoch, position.batch) == (1, 0)  # nothing saved mid-epoch: the end of epoch 1
    finish_and_compare(job, out, log, reference)


def test_a_lost_node_ends_the_step_the_job_waits_for_nodes_and_resumes(
    tiny_pack: Path, tmp_path: Path, reference: dict[str, torch.Tensor]
) -> None:
    count = len(cluster_nodes())
    job, out, log = two_node_job(tiny_pack, tmp_path)
    # Rank 1's node, not the batch script's (rank 0's): the job must outlive the loss.
    lost = next(host for host, ranks in hosts_of_ranks(log).items() if 1 in ranks)
    started = time.monotonic()
    subprocess.run(["bash", str(CLUSTER / "stop.sh"), "--node", lost.removeprefix("aidetect-n")], check=True)
    try:
        wait_for(job, {"PENDING", "REQUEUED"}, timeout=180)
        waited = time.monotonic() - started
        print(f"\n[figure] job requeued {waited:.1f} s after node {lost} was lost")
        assert waited < 90
    finally:  # the node comes back, as a repaired node would
        subprocess.run(["bash", str(CLUSTER / "start.sh"), "--nodes", str(count)], check=True)
    assert state(job) in {"PENDING", "REQUEUED"}
    finish_and_compare(job, out, log, reference)


def test_a_hung_rank_is_named_within_the_timeout_and_the_job_requeues_and_resumes(
    tiny_pack: Path, tmp_path: Path, reference: dict[str, torch.Tensor]
) -> None:
    timeout = 30
    args = [*ARGS, "--set", f"train.dist_timeout_s={timeout}"]
    job, out, log = submit_training(tiny_pack, tmp_path, args, "--nodes=2", "--ntasks-per-node=1")
    wait_for_line(log, r"epoch 2 batch 3/")
    hung = next(host for host, ranks in hosts_of_ranks(log).items() if 1 in ranks)
    os.kill(task_pid(job, rank=1), signal.SIGSTOP)  # a hung file system, a stalled node: alive but silent
    stopped = time.monotonic()
    wait_for_line(log, r"requeueing job", timeout=timeout + 90)
    waited = time.monotonic() - stopped
    print(f"\n[figure] job requeued {waited:.1f} s after rank 1 stopped answering (train.dist_timeout_s {timeout})")
    assert waited < timeout + 30
    text = log.read_text()
    assert f"aidetect: lost a peer; rank 1 ({hung}) stopped answering; rank 0" in text, text[-3000:]
    assert "exit 4 (lost peer): requeue 1" in text
    wait_for(job, {"PENDING", "REQUEUED"})
    assert load_checkpoint(out / "last.pt").state.epoch == 1  # the end of epoch 1: nothing saved since
    finish_and_compare(job, out, log, reference)


def test_a_killed_rank_of_a_submitit_job_requeues_it_and_it_resumes(
    tiny_pack: Path, tmp_path: Path, reference: dict[str, torch.Tensor]
) -> None:
    run = tmp_path / "submitted"
    options = ["--profile", "local", "--nodes", "2", "--tasks-per-node", "1"]
    assert submit_cli("train", *options, "--data", str(tiny_pack), "--out", str(run), *ARGS).returncode == 0
    job = json.loads((run / "jobs.json").read_text())["jobs"][0]
    log = Path(job["stdout"])
    wait_for_line(log, r"epoch 2 batch 3/")
    os.kill(task_pid(job["job_id"], rank=1), signal.SIGKILL)
    wait_for(job["job_id"], {"PENDING", "REQUEUED"}, timeout=120)
    assert "(lost peer): requeue 1" in log.read_text()  # the survivor named the outcome and asked for the requeue
    finish_and_compare(job["job_id"], run, log, reference)
