"""``aidetect submit`` (submitit) and slurm/cv.sbatch against the real local SLURM cluster."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import datetime
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from test_slurm import (
    ARGS,
    REPO,
    cluster_nodes,
    direct_run,
    options,
    release,
    sacct_field,
    state,
    submit,
    wait_for,
    wait_for_line,
    weights,
)

FAST = options(1, 8)


def submit_cli(*args: str) -> subprocess.CompletedProcess:
    return run_cli("submit", *args, env=os.environ | {"WANDB_MODE": "offline"})


def test_submit_train_on_the_cluster_matches_a_direct_run(tiny_pack: Path, tmp_path: Path) -> None:
    direct_run(tiny_pack, tmp_path / "direct")
    run = tmp_path / "submitted"
    result = submit_cli("train", "--profile", "local", "--wait", "--data", str(tiny_pack), "--out", str(run), *ARGS)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    jobs = json.loads((run / "jobs.json").read_text())
    assert jobs["kind"] == "train" and jobs["sbatch"].startswith("sbatch ") and Path(jobs["jobs"][0]["stdout"]).exists()
    assert state(jobs["jobs"][0]["job_id"]) == "COMPLETED"
    a, b = weights(tmp_path / "direct"), weights(run)
    assert all(torch.equal(a[key], b[key]) for key in a)
    shown = run_cli("status", str(run))
    assert shown.returncode == 0 and "COMPLETED" in shown.stdout and "done: test accuracy" in shown.stdout


def test_submitted_job_checkpoints_on_the_timeout_signal_requeues_and_resumes(tiny_pack: Path, tmp_path: Path) -> None:
    direct_run(tiny_pack, tmp_path / "direct")
    run = tmp_path / "submitted"
    assert submit_cli("train", "--profile", "local", "--data", str(tiny_pack), "--out", str(run), *ARGS).returncode == 0
    job = json.loads((run / "jobs.json").read_text())["jobs"][0]
    wait_for_line(Path(job["stdout"]), r"epoch 2 batch 3/")
    subprocess.run(["scancel", "--signal=USR2", job["job_id"]], check=True)  # submitit's timeout warning
    wait_for(job["job_id"], {"PENDING", "REQUEUED"})
    assert load_state(run)["epoch"] == 1
    release(job["job_id"])
    assert wait_for(job["job_id"], {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}) == "COMPLETED"
    assert "resumed from" in Path(job["stdout"]).read_text()
    a, b = weights(tmp_path / "direct"), weights(run)
    assert all(torch.equal(a[key], b[key]) for key in a)


def load_state(run: Path) -> dict:
    from aidetect.checkpoint import load_checkpoint

    return load_checkpoint(run / "last.pt")["state"]


def test_submit_cv_runs_folds_in_parallel_and_summarises(tiny_pack: Path, tmp_path: Path) -> None:
    run = tmp_path / "cv"
    result = submit_cli(
        "cv", "--profile", "local", "--folds", "5", "--wait", "--data", str(tiny_pack), "--out", str(run), *FAST
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads((run / "cv_summary.json").read_text())
    assert summary["n_folds"] == 5 and not summary["missing"]
    assert set(summary["mean"]) >= {"accuracy", "auroc", "f1", "loss"} and (run / "cv_summary.png").exists()
    for fold in range(5):
        config = (run / f"fold{fold}" / "config.yaml").read_text()
        assert f"fold: {fold}" in config and f"job_type: fold-{fold}" in config and "group: cv" in config
    jobs = json.loads((run / "jobs.json").read_text())["jobs"]
    used = {sacct_field(job["job_id"], "NodeList") for job in jobs}
    assert used <= set(cluster_nodes()) and len(used) >= min(2, len(cluster_nodes())), used  # spread over nodes
    intervals = [job_interval(j["job_id"]) for j in jobs]
    overlapping = sum(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(intervals) for b in intervals[i + 1 :])
    assert overlapping >= 1  # two folds ran at the same time on the two CPUs
    assert "accuracy" in result.stdout and "±" in result.stdout


def job_interval(job_id: str) -> tuple[datetime, datetime]:
    start, end = sacct_field(job_id, "Start,End").split("|")
    return datetime.fromisoformat(start), datetime.fromisoformat(end)


def test_submit_with_the_local_executor_needs_no_slurm(tiny_pack: Path, tmp_path: Path) -> None:
    run = tmp_path / "local"
    result = submit_cli(
        "train",
        "--profile",
        "local",
        "--executor",
        "local",
        "--wait",
        "--data",
        str(tiny_pack),
        "--out",
        str(run),
        *FAST,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert (run / "test_metrics.json").is_file() and json.loads((run / "jobs.json").read_text())["sbatch"] is None


def test_cv_sbatch_array_and_cv_report(tiny_pack: Path, tmp_path: Path) -> None:
    run = tmp_path / "cvsb"
    job = submit(
        "--array=0-1", str(REPO / "slurm" / "cv.sbatch"), str(run), "--data", str(tiny_pack), *FAST, cwd=tmp_path
    )
    for task in (0, 1):
        assert wait_for(f"{job}_{task}", {"COMPLETED", "FAILED", "CANCELLED"}) == "COMPLETED"
    result = run_cli("cv-report", str(run))
    assert result.returncode == 0, result.stderr
    summary = json.loads((run / "cv_summary.json").read_text())
    assert summary["n_folds"] == 2 and set(summary["folds"]) == {"fold0", "fold1"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--profile", "expanse"], "set 'account' to your SLURM allocation"),
        (["--profile", "expanse", "--account", "abc123", "--partition", "gpux"], "partition 'gpux' is not one of"),
        (["--profile", "nowhere"], "profile 'nowhere' not found"),
        (["--profile", "local", "--data", "/nonexistent"], "no manifest.json there"),
    ],
)
def test_bad_profiles_fail_before_anything_is_submitted(tmp_path: Path, args: list[str], message: str) -> None:
    result = submit_cli("train", *args, "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "run" / "jobs.json").exists()


def test_wandb_sync_lists_offline_runs(tiny_pack: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert (
        run_cli(
            "train", "--data", str(tiny_pack), "--out", str(run), *FAST, env=os.environ | {"WANDB_MODE": "offline"}
        ).returncode
        == 0
    )
    listed = run_cli("wandb-sync", str(run), "--list")
    assert listed.returncode == 0 and "offline-run-" in listed.stdout


def test_bench_cv_times_parallel_folds_against_one(tiny_pack: Path, tmp_path: Path) -> None:
    result = run_cli(
        "bench",
        "cv",
        "--folds",
        "2",
        "--json",
        str(tmp_path / "cv.json"),
        "--data",
        str(tiny_pack),
        "--out",
        str(tmp_path / "bench"),
        *FAST,
        env=os.environ | {"WANDB_MODE": "offline"},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    figures = json.loads((tmp_path / "cv.json").read_text())
    assert figures["cv_time_ratio"] == figures["all_folds_s"] / figures["one_fold_s"] > 0
    assert "cv_time_ratio" in result.stdout and (tmp_path / "bench" / "cv" / "fold1" / "test_metrics.json").exists()
