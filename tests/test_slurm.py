"""slurm/train.sbatch on a real SLURM cluster (hpc/local_cluster/start.sh), in CPU mode."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from aidetect.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "slurm" / "train.sbatch"


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


@pytest.fixture(scope="module", autouse=True)
def cluster() -> None:
    if shutil.which("sinfo") is None or subprocess.run(["sinfo"], capture_output=True).returncode:
        pytest.fail("no SLURM cluster answers: start one with 'sudo bash hpc/local_cluster/start.sh'")


def submit(*args: str, cwd: Path) -> str:
    env = os.environ | {"AIDETECT_VENV": sys.prefix, "AIDETECT_REPO": str(REPO), "WANDB_MODE": "offline"}
    result = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, cwd=cwd, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def state(job: str) -> str:
    result = subprocess.run(["sacct", "-j", job, "-X", "-n", "-o", "State"], capture_output=True, text=True)
    return result.stdout.strip().split()[0] if result.stdout.strip() else "UNKNOWN"


def wait_for(job: str, states: set[str], timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = state(job)
        if current in states:
            return current
        time.sleep(0.5)
    raise AssertionError(f"job {job} still {state(job)} after {timeout}s")


def wait_for_line(path: Path, pattern: str, timeout: float = 300) -> None:
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


def cluster_nodes() -> list[str]:
    return sorted(set(subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True).stdout.split()))


def sacct_field(job_id: str, field: str) -> str:
    """One field of a job as SLURM's accounting recorded it (for an array task: that task)."""
    result = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", field], capture_output=True, text=True)
    return result.stdout.strip()


def submit_training(pack: Path, tmp_path: Path, args: list[str], *sbatch_options: str) -> tuple[str, Path, Path]:
    """slurm/train.sbatch on ``pack`` with ``args``: (job id, run folder, log file)."""
    out = tmp_path / "job"
    job = submit(*sbatch_options, str(SBATCH), "--data", str(pack), "--out", str(out), *args, cwd=tmp_path)
    return job, out, tmp_path / f"aidetect-train-{job}.out"


def direct_run(pack: Path, out: Path) -> None:
    """The same training without SLURM, one thread per process as the jobs' tasks (cpus-per-task=1), so
    that float sums happen in the same order and weights can be compared bit for bit."""
    result = run_cli("train", "--data", str(pack), "--out", str(out), *ARGS, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]


def two_rank_run(pack: Path, out: Path) -> None:
    """The jobs' two-task training under torchrun on this host, one thread per process as theirs."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "aidetect.cli",
    ]
    result = subprocess.run(
        [*command, "train", "--data", str(pack), "--out", str(out), *ARGS],
        capture_output=True,
        text=True,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "last.pt")["model"]


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
    checkpoint = load_checkpoint(out / "last.pt")["state"]
    assert checkpoint["epoch"] == 1 and checkpoint["batch"] >= 3  # saved mid-epoch, at a step all ranks agreed on
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
    assert load_checkpoint(out / "last.pt")["state"]["epoch"] == 1  # the position is saved for a new submission


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
