"""slurm/train.sbatch on a real SLURM cluster (hpc/local_cluster/start.sh), in CPU mode."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.slurm import (
    ARGS,
    direct_run,
    release,
    sacct_field,
    submit,
    submit_training,
    two_rank_run,
    wait_for,
    wait_for_line,
)
from helpers.training import weights

from aidetect.checkpoint import load_checkpoint

pytestmark = pytest.mark.slurm


def test_sbatch_train_matches_a_direct_run(tiny_pack: Path, tmp_path: Path) -> None:
    direct_run(tiny_pack, tmp_path / "direct")
    job, _, _ = submit_training(tiny_pack, tmp_path, ARGS)
    assert wait_for(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}) == "COMPLETED"
    a, b = weights(tmp_path / "direct"), weights(tmp_path / "job")
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert (tmp_path / "job" / "test_metrics.json").is_file()


def test_preempted_two_task_job_checkpoints_requeues_and_resumes_exactly(tiny_pack: Path, tmp_path: Path) -> None:
    two_rank_run(tiny_pack, tmp_path / "ref")
    job, out, log = submit_training(tiny_pack, tmp_path, ARGS, "--ntasks-per-node=2")
    wait_for_line(log, r"epoch 2 batch 3/")
    # What SLURM does 120 s before the time limit (--signal=B:USR1@120), without waiting for it:
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    wait_for_line(log, r"requeueing job")
    wait_for(job, {"PENDING", "REQUEUED"})
    position = load_checkpoint(out / "last.pt").state
    assert position.epoch == 1 and position.batch >= 3  # saved mid-epoch, at a step all ranks agreed on
    release(job)
    assert wait_for(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}) == "COMPLETED"
    text = log.read_text()
    assert "on 2 process(es), cpu" in text and "(restart 1)" in text and "resumed from" in text
    a, b = weights(tmp_path / "ref"), weights(out)
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_a_stopped_job_whose_requeue_slurm_refuses_fails_with_the_reason(tiny_pack: Path, tmp_path: Path) -> None:
    job, out, log = submit_training(tiny_pack, tmp_path, ARGS, "--no-requeue")  # the user's flag wins
    wait_for_line(log, r"epoch 2 batch 3/")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    assert wait_for(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}) == "FAILED"  # never COMPLETED unfinished
    text = log.read_text()
    assert "exit 3 (stopped): requeue 1 of at most" in text
    assert re.search(r"SLURM refused to requeue it \(.*disabled.*\); the run is unfinished", text), text[-2000:]
    assert load_checkpoint(out / "last.pt").state.epoch == 1  # the position is saved for a new submission


def test_a_multi_task_job_that_runs_train_in_its_batch_step_is_one_line(tiny_pack: Path, tmp_path: Path) -> None:
    command = f"{sys.executable} -m aidetect.cli train --data {tiny_pack} --out {tmp_path / 'run'} {' '.join(ARGS)}"
    job = submit("--ntasks=2", f"--output={tmp_path / 'wrap.out'}", "--wrap", command, cwd=tmp_path)
    assert wait_for(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=120) == "FAILED"
    text = (tmp_path / "wrap.out").read_text()
    assert text.strip().splitlines()[-1].startswith(f"aidetect: error: job {job} has 2 tasks"), text[-2000:]
    assert "not by srun" in text and "Traceback" not in text
    elapsed = sacct_field(job, "ElapsedRaw")
    print(f"\n[figure] a 2-task job running train in its batch step failed after {elapsed} s")
    assert int(elapsed) < 60
