"""``aidetect doctor``: one line per check, non-zero exit when any fails; across hosts under srun."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from helpers.commands import run_cli

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
