"""Process-group setup for one process, ``torchrun`` and SLURM ``srun``: the same code path for all.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. Under ``srun`` (one task per
GPU) the rank and world come from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, and the rendezvous
from MASTER_ADDR / MASTER_PORT when set (submitit sets them), else from the job: the first host of
SLURM_JOB_NODELIST and a port derived from the job id, the same on every node of the job.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from aidetect.cuda_builds import check_visible_gpus
from aidetect.errors import UserError
from aidetect.hardware import choose_device, cuda_facts


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def environment_ranks() -> tuple[int, int, int]:
    """(rank, world, local rank) from torchrun's variables, else SLURM's, else a single process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def slurm_rendezvous() -> None:
    """MASTER_ADDR / MASTER_PORT for a job step started by srun, when nobody exported them."""
    env = os.environ
    if "MASTER_ADDR" in env or "SLURM_JOB_NODELIST" not in env:
        return
    try:
        hosts = subprocess.run(
            ["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]], capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError) as exc:
        raise UserError(f"cannot expand SLURM_JOB_NODELIST with scontrol ({exc}); export MASTER_ADDR") from None
    env["MASTER_ADDR"] = hosts[0]
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))


def setup_distributed(timeout_s: int, device: str = "auto") -> DistInfo:
    """Join the process group (when there is more than one process); ``timeout_s`` bounds every collective.
    ``device``: ``train.device`` (``aidetect.hardware.choose_device``: a GPU job whose CUDA cannot run stops
    here with one line naming the cause)."""
    rank, world, local_rank = environment_ranks()
    problems = check_visible_gpus()
    if problems:  # now, as one line, rather than a CUDA error at the first kernel
        raise UserError(problems[0])
    if choose_device(device, cuda_facts()) == "cuda":
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        slurm_rendezvous()
        if "MASTER_ADDR" not in os.environ:
            raise UserError("MASTER_ADDR is not set: launch multi-process runs with torchrun or the slurm/ scripts")
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    return DistInfo(rank, world, local_rank, device)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_gather_objects(obj: object) -> list:
    """Every rank's ``obj`` (a list with one entry in a single process)."""
    if not dist.is_initialized():
        return [obj]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
