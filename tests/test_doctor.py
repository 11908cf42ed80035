"""``aidetect doctor``: one line per check, non-zero exit when any fails; across hosts under srun."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

CHECKS = ("versions", "gpus", "gpu build", "precision", "all-reduce", "disk", "wandb")


def doctor(*args: str, **env: str) -> subprocess.CompletedProcess:
    return run_cli("doctor", *args, env=os.environ | env)


def checks(output: str) -> dict[str, str]:
    """{check name: status} from doctor's lines ``STATUS NAME: detail``."""
    return {line[5:].split(":")[0]: line[:4].strip() for line in output.splitlines() if line[:4].strip()}


def test_a_healthy_cpu_node_passes_every_check(tiny_pack: Path, tmp_path: Path) -> None:
    result = doctor("--data", str(tiny_pack), "--out", str(tmp_path / "run"), WANDB_MODE="offline")
    assert result.returncode == 0, result.stdout + result.stderr
    found = checks(result.stdout)
    assert set(found) == {*CHECKS, "data"} and set(found.values()) == {"ok"}, result.stdout
    assert "auto -> fp32" in result.stdout and "sizes and sha256 match" in result.stdout


def test_failures_are_named_and_make_the_exit_code_non_zero(tiny_pack: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "shards"
    shutil.copytree(tiny_pack, damaged)
    shard = sorted(damaged.glob("*.tar"))[1]
    shard.write_bytes(shard.read_bytes()[:5000])  # a copy cut short
    result = doctor(
        "--profile", "expanse", "--data", str(damaged), WANDB_MODE="online", HOME=str(tmp_path), WANDB_API_KEY=""
    )
    assert result.returncode == 1
    found = checks(result.stdout)
    assert found["gpus"] == found["data"] == found["wandb"] == "FAIL", result.stdout
    assert "expects 4 per node" in result.stdout and shard.name in result.stdout and "wandb login" in result.stdout


def test_every_rank_of_a_two_host_job_takes_part(tiny_pack: Path) -> None:
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True).stdout.split()
    if len(set(nodes)) < 2:
        pytest.skip("needs the multi-host test cluster: bash hpc/local_cluster/start.sh --nodes 3")
    command = ["srun", "--nodes=2", "--ntasks-per-node=2", sys.executable, "-m", "aidetect.cli", "doctor"]
    result = subprocess.run(
        [*command, "--data", str(tiny_pack)],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 ranks on 2 host(s), gloo" in result.stdout and result.stdout.count("ok   versions") == 1
