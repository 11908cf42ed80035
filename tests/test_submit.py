"""``aidetect submit`` (submitit) and slurm/cv.sbatch against the real local SLURM cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers.commands import run_cli
from helpers.plots import assert_png
from helpers.slurm import (
    ARGS,
    REPO,
    cluster_nodes,
    direct_run,
    options,
    release,
    sacct_field,
    submit,
    submit_cli,
    wait_for,
    wait_for_line,
)
from helpers.training import weights

from aidetect.checkpoint import RunState, load_checkpoint
from aidetect.cluster.report import HOLDOUT_COLUMNS, status
from aidetect.cluster.submit import holdout_folder
from aidetect.data.pack import PackSettings, pack
from aidetect.data.synth import synth
from aidetect.inference import evaluate

FAST = options(1, 8)
GENERATORS = ["gen1", "gen2", "gen3"]


@pytest.fixture(scope="module")
def sources_pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fakes from three generators (gen1..gen3) and reals from two sources, as small native crops."""
    root = tmp_path_factory.mktemp("sources")
    synth(root / "raw", n=150, seed=7, workers=2, min_side=64, max_side=128, sources=3)
    pack(root / "raw", root / "shards", PackSettings(mode="crop", size=32, shard_size=16), workers=2, progress=False)
    return root / "shards"


@pytest.mark.slurm
def test_submit_train_on_the_cluster_matches_a_direct_run(tiny_pack: Path, tmp_path: Path) -> None:
    direct_run(tiny_pack, tmp_path / "direct")
    run = tmp_path / "submitted"
    result = submit_cli("train", "--profile", "local", "--wait", "--data", str(tiny_pack), "--out", str(run), *ARGS)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    jobs = json.loads((run / "jobs.json").read_text())
    assert jobs["kind"] == "train" and jobs["sbatch"].startswith("sbatch ") and Path(jobs["jobs"][0]["stdout"]).exists()
    # --wait returns once submitit has the job's result, which can be before SLURM records the job's end.
    assert wait_for(jobs["jobs"][0]["job_id"], {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}) == "COMPLETED"
    a, b = weights(tmp_path / "direct"), weights(run)
    assert all(torch.equal(a[key], b[key]) for key in a)
    shown = run_cli("status", str(run))
    assert shown.returncode == 0 and "COMPLETED" in shown.stdout and "done: test accuracy" in shown.stdout


@pytest.mark.slurm
def test_submitted_job_checkpoints_on_the_timeout_signal_requeues_and_resumes(tiny_pack: Path, tmp_path: Path) -> None:
    direct_run(tiny_pack, tmp_path / "direct")
    run = tmp_path / "submitted"
    assert submit_cli("train", "--profile", "local", "--data", str(tiny_pack), "--out", str(run), *ARGS).returncode == 0
    job = json.loads((run / "jobs.json").read_text())["jobs"][0]
    wait_for_line(Path(job["stdout"]), r"epoch 2 batch 3/")
    subprocess.run(["scancel", "--signal=USR2", job["job_id"]], check=True)  # submitit's timeout warning
    wait_for(job["job_id"], {"PENDING", "REQUEUED"})
    assert load_state(run).epoch == 1
    release(job["job_id"])
    assert wait_for(job["job_id"], {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}) == "COMPLETED"
    assert "resumed from" in Path(job["stdout"]).read_text()
    a, b = weights(tmp_path / "direct"), weights(run)
    assert all(torch.equal(a[key], b[key]) for key in a)


def load_state(run: Path) -> RunState:
    return load_checkpoint(run / "last.pt").state


@pytest.mark.slurm
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


@pytest.mark.slurm
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


@pytest.mark.slurm
def test_submit_cv_by_source_trains_without_each_generator_and_tests_on_it(sources_pack: Path, tmp_path: Path) -> None:
    run = tmp_path / "loso"
    result = submit_cli(
        "cv", "--by", "source", "--profile", "local", "--wait", "--data", str(sources_pack), "--out", str(run), *FAST
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "held-out fake_accuracy mean" in result.stdout  # --wait ran cv-report
    jobs = json.loads((run / "jobs.json").read_text())
    assert jobs["by"] == "source" and jobs["sources"] == {name: f"holdout-{name}" for name in GENERATORS}
    summary = json.loads((run / "cv_summary.json").read_text())
    matrix = summary["holdout"]
    assert summary["n_sources"] == 3 and not summary["missing"] and list(matrix["sources"]) == GENERATORS
    manifest = json.loads((sources_pack / "manifest.json").read_text())
    for name, row in matrix["sources"].items():
        folder = run / row["folder"]
        config = yaml.safe_load((folder / "config.yaml").read_text())
        assert config["data"]["holdout_source"] == name and config["wandb"]["job_type"] == f"holdout-{name}"
        assert config["data"]["fold"] == 0 and config["wandb"]["group"] == "loso"
        assert_never_trained_on(folder, name, manifest)
        # the test: the real test samples and every sample of the held-out generator, none of the others
        assert row["fake"] == manifest["sources"]["fake"][name]["total"]
        assert row["real"] == manifest["splits"]["test"]["real"]
        evaluate(str(folder / "best.pt"), str(sources_pack), "test", str(tmp_path / name))  # aidetect evaluate's
        metrics = json.loads((tmp_path / name / "eval_test.json").read_text())
        assert set(metrics["per_source"]["sources"]) == {"art", "photo", name}
        assert {key: row[key] for key in (*HOLDOUT_COLUMNS, "real", "fake")} == pytest.approx(
            {key: metrics[key] for key in (*HOLDOUT_COLUMNS, "real", "fake")}
        )
    for key in HOLDOUT_COLUMNS:
        column = np.array([row[key] for row in matrix["sources"].values()])
        assert matrix["mean"][key] == pytest.approx(column.mean()) and matrix["min"][key] == column.min()
        assert matrix["sources"][matrix["argmin"][key]][key] == column.min()
    assert_png(run / "cv_holdout.png")
    assert any((run / "wandb").glob("offline-run-*"))  # the summary's wandb run
    shown = status(run)
    assert shown.count("COMPLETED") == 3 and "holdout-gen2" in shown and shown.count("done: test accuracy") == 3


def assert_never_trained_on(folder: Path, source: str, manifest: dict) -> None:
    """The run's validation (fold 0, built with the same selection as its training set) had no sample of
    ``source``, and every other fake of fold 0."""
    validation = json.loads((folder / "metrics.jsonl").read_text().splitlines()[0])["val"]
    assert source not in validation["per_source"]["sources"]
    fakes = manifest["sources"]["fake"]
    assert validation["fake"] == sum(counts["fold0"] for name, counts in fakes.items() if name != source)


@pytest.mark.slurm
def test_cv_sbatch_by_source_holds_out_the_task_s_generator(sources_pack: Path, tmp_path: Path) -> None:
    run = tmp_path / "losb"
    sbatch = str(REPO / "slurm" / "cv.sbatch")
    args = ["--data", str(sources_pack), *FAST]
    job = submit("--array=2", "--export=ALL,AIDETECT_CV_BY=source", sbatch, str(run), *args, cwd=tmp_path)
    assert wait_for(f"{job}_2", {"COMPLETED", "FAILED", "CANCELLED"}) == "COMPLETED"
    config = yaml.safe_load((run / "holdout-gen3" / "config.yaml").read_text())
    assert config["data"]["holdout_source"] == "gen3" and config["wandb"]["job_type"] == "holdout-gen3"
    result = run_cli("cv-report", str(run))
    assert result.returncode == 0, result.stderr
    summary = json.loads((run / "cv_summary.json").read_text())
    assert list(summary["holdout"]["sources"]) == ["gen3"] and summary["missing"] == ["gen1", "gen2"]
    past = [sys.executable, "-m", "aidetect.cli", "holdout-task", "3", *args]  # 3 sources: tasks 0-2
    beyond = subprocess.run(past, capture_output=True, text=True)
    assert beyond.returncode != 0 and "has fake sources 0..2" in beyond.stderr and not beyond.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "leave-one-source-out needs at least 2 fake sources, the pack has 1 (fake)"),
        (["--folds", "3"], "--folds applies to --by fold"),
    ],
)
def test_cv_by_source_refuses_before_submitting(tiny_pack: Path, tmp_path: Path, args: list[str], message: str) -> None:
    run = tmp_path / "run"
    result = submit_cli(
        "cv", "--by", "source", "--profile", "local", "--data", str(tiny_pack), "--out", str(run), *args
    )
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (run / "jobs.json").exists()


def test_holdout_folders_are_plain_names_or_safe_distinct_slugs() -> None:
    plain = ["gen1", "sd_xl.v2", "-x", "Stable_Diffusion_1.5", "a_b"]
    odd = ["Stable Diffusion 1.5", "..", ".hidden", "a/b", "a b", "é" * 60]
    folders = [holdout_folder(name) for name in plain + odd]
    assert folders[: len(plain)] == [f"holdout-{name}" for name in plain] and len(set(folders)) == len(folders)
    for folder in folders:
        assert folder.startswith("holdout-") and len(folder) <= 64  # a wandb job_type's limit
        assert all(c.isascii() and (c.isalnum() or c in "._-") for c in folder)


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


@pytest.mark.slurm  # the local profile submits to the test cluster
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
