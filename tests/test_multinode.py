"""Jobs across hosts on the multi-host local cluster (hpc/local_cluster/start.sh --nodes 3): every node is
a host of its own (hostname aidetect-nK, its own address), so DDP rendezvous and gloo really cross hosts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.slurm import direct_run, hosts_of_ranks, options, submit_cli, submit_training, wait_for
from helpers.training import weights

# One process at batch 8 is the reference for every run below at the same global batch of 8.
GLOBAL_BATCH = 8
DETERMINISTIC = ("--set", "train.deterministic=true")

pytestmark = pytest.mark.multinode


@pytest.fixture(scope="module")
def reference(tiny_pack: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """Weights of one process trained at the global batch, one thread as the jobs' tasks."""
    out = tmp_path_factory.mktemp("reference") / "run"
    direct_run(tiny_pack, out, options(2, GLOBAL_BATCH, *DETERMINISTIC))
    return weights(out)


def assert_spread(hosts: dict[str, list[int]], nodes: list[str], ranks_per_host: int) -> None:
    assert len(hosts) == 2 and set(hosts) <= set(nodes), hosts
    assert sorted(rank for ranks in hosts.values() for rank in ranks) == list(range(2 * ranks_per_host))
    assert all(len(ranks) == ranks_per_host for ranks in hosts.values()), hosts


def assert_trained_alike(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)


def test_sbatch_on_two_hosts_trains_like_one_process(
    tiny_pack: Path, tmp_path: Path, nodes: list[str], reference: dict[str, torch.Tensor]
) -> None:
    args = options(2, GLOBAL_BATCH // 4, *DETERMINISTIC)
    job, out, log = submit_training(tiny_pack, tmp_path, args, "--nodes=2", "--ntasks-per-node=2")
    assert wait_for(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}) == "COMPLETED"
    assert "on 4 process(es), cpu" in log.read_text()
    assert_spread(hosts_of_ranks(log), nodes, ranks_per_host=2)
    assert_trained_alike(reference, weights(out))


def test_submit_train_on_two_hosts_trains_like_one_process(
    tiny_pack: Path, tmp_path: Path, nodes: list[str], reference: dict[str, torch.Tensor]
) -> None:
    run = tmp_path / "submitted"
    args = options(2, GLOBAL_BATCH // 2, *DETERMINISTIC)
    result = submit_cli(
        "train",
        "--profile",
        "local",
        "--nodes",
        "2",
        "--tasks-per-node",
        "1",
        "--wait",
        "--data",
        str(tiny_pack),
        "--out",
        str(run),
        *args,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    job = json.loads((run / "jobs.json").read_text())["jobs"][0]
    assert_spread(hosts_of_ranks(Path(job["stdout"])), nodes, ranks_per_host=1)
    assert_trained_alike(reference, weights(run))


def test_doctor_checks_every_rank_of_a_two_host_job(tiny_pack: Path) -> None:
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
