"""Cluster profiles: typed like configs, found bundled / by path / in $AIDETECT_PROFILES, runs_dir and data_dir."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.commands import run_cli

from aidetect.cluster.profiles import Profile, load_profile, place
from aidetect.cluster.submit import make_executor
from aidetect.config import load_config
from aidetect.errors import UserError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("gpus_per_node: four\n", "key gpus_per_node must be int, got 'four'"),
        ("max_requeues: [1]\n", "key max_requeues must be int"),
        ("setup: module load x\n", "key setup must be list"),
        ("gpu: 4\n", "key gpu is unknown"),
        ("cpus_per_task: 0\n", "cpus_per_task must be at least 1"),
        ("mem_per_gpu_gb: 0\n", "mem_per_gpu_gb must be at least 1"),
        ("constraint: [lustre]\n", "key constraint must be str"),
        ("- a list\n", "a profile is a mapping"),
    ],
)
def test_a_wrong_profile_is_one_line_naming_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "mycluster.yaml"
    path.write_text("partition: debug\n" + text if not text.startswith("-") else text)
    with pytest.raises(UserError, match=message) as caught:
        load_profile(str(path))
    assert str(caught.value).startswith(str(path)) and "\n" not in str(caught.value)


def test_profiles_come_from_a_path_the_profiles_folder_or_the_package(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "mine.yaml").write_text("partition: short\npartitions: [short, long]\nmax_requeues: 2\n")
    monkeypatch.setenv("AIDETECT_PROFILES", str(tmp_path))
    mine = load_profile("mine")
    assert (mine.name, mine.partition, mine.max_requeues) == ("mine", "short", 2)
    assert load_profile("expanse", account="abc123").gpu_arch == "sm_70"
    with pytest.raises(UserError, match="one of: expanse, local, mine"):
        load_profile("elsewhere")


def test_relative_out_and_data_resolve_under_the_profile_folders(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "site.yaml").write_text("runs_dir: $SCRATCH/runs\ndata_dir: /projects/abc/shards\n")
    monkeypatch.setenv("SCRATCH", "/scratch/me")
    profile = load_profile(str(tmp_path / "site.yaml"))
    placed = place(load_config(None, {"train.out": "r50", "data.shards": "kaggle"}), profile)
    assert (placed.train.out, placed.data.shards) == ("/scratch/me/runs/r50", "/projects/abc/shards/kaggle")
    kept = place(load_config(None, {"train.out": "/abs/run", "data.shards": "/abs/data"}), profile)
    assert (kept.train.out, kept.data.shards) == ("/abs/run", "/abs/data")
    monkeypatch.delenv("SCRATCH")
    with pytest.raises(UserError, match="unset environment variable"):
        place(load_config(None, {"train.out": "r50"}), profile)


def test_submit_uses_the_profile_data_dir(tiny_pack: Path, tmp_path: Path) -> None:
    (tmp_path / "site.yaml").write_text(f"executor: local\ndata_dir: {tiny_pack.parent}\nruns_dir: {tmp_path}/runs\n")
    result = run_cli("submit", "train", "--profile", str(tmp_path / "site.yaml"), "--data", "nowhere", "--out", "r")
    assert result.returncode == 2 and f"{tiny_pack.parent}/nowhere: no manifest.json" in result.stderr


def test_an_installed_package_finds_its_bundled_profiles(tmp_path: Path) -> None:
    """Not an editable checkout: the profiles travel inside the package."""
    target = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target"]
    subprocess.run([*install, str(target), str(REPO)], check=True, capture_output=True)
    code = (
        "import aidetect; from aidetect.cluster.profiles import load_profile; print(aidetect.__file__, "
        "load_profile('expanse', account='abc').partition)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=os.environ | {"PYTHONPATH": str(target)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(str(target)) and result.stdout.split()[-1] == "gpu"


def sbatch_text(profile: Profile, folder: Path) -> str:
    """The sbatch script a one-node job of ``profile`` would be submitted with: submitit's own rendering of
    the executor's parameters (it has no public way to show it without submitting)."""
    executor = make_executor(profile, folder, 1, max(profile.gpus_per_node, 1), "aidetect-test")
    return executor._executor._make_submission_file_text("python -m aidetect.cli train", "uid")


@pytest.mark.parametrize(("partition", "gpus", "memory"), [("gpu-shared", 1, "90GB"), ("gpu", 4, "360GB")])
def test_expanse_jobs_ask_for_lustre_and_a_node_share_per_gpu(
    tmp_path: Path, partition: str, gpus: int, memory: str
) -> None:
    profile = load_profile("expanse", account="abc123", partition=partition, gpus_per_node=gpus)
    text = sbatch_text(profile, tmp_path)
    for line in ("--constraint=lustre", "--cpus-per-task=10", f"--mem={memory}", f"--partition={partition}"):
        assert f"#SBATCH {line}\n" in text, line
    # Exported unexpanded: each node expands $USER and $SLURM_JOB_ID itself when it stages (data.stage auto).
    assert "export AIDETECT_LOCAL_SCRATCH='/scratch/$USER/job_$SLURM_JOB_ID'\n" in text


def test_the_local_profile_asks_for_no_constraint_and_its_memory_per_node(tmp_path: Path) -> None:
    text = sbatch_text(load_profile("local"), tmp_path)
    assert "#SBATCH --mem=4GB\n" in text and "--constraint" not in text and "AIDETECT_LOCAL_SCRATCH" not in text
