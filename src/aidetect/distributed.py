"""Process-group setup for one process, ``torchrun`` and SLURM ``srun``: the same code path for all.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. Under ``srun`` (one task per
GPU) the rank and world come from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, and the rendezvous
from MASTER_ADDR / MASTER_PORT when set (submitit sets them), else from the job: the first host of
SLURM_JOB_NODELIST and a port derived from the job id, the same on every node of the job.

A rank that dies or stops answering (SIGSTOP, a hung file system, a cut link) makes the others' next
collective fail: at once when its connections close, else after ``train.dist_timeout_s``. Inside
``peers_watched`` such a failure becomes ``LostPeer`` (exit 4, requeued), naming the ranks and hosts
whose heartbeat (a counter each rank bumps in the rendezvous store every second, from a thread that
runs while the rank waits in a collective) stopped. With NCCL the watchdog tears the process down
after the same timeout (SIGABRT, status 134, also a lost peer by the requeue rule).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from aidetect.cuda_builds import check_visible_gpus
from aidetect.errors import UserError, first_line
from aidetect.hardware import choose_device, cuda_facts
from aidetect.preemption import LostPeer


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    hosts: tuple[str, ...] = ()  # every rank's host name, in rank order
    heartbeat: Heartbeat | None = field(default=None, compare=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def environment_ranks() -> tuple[int, int, int]:
    """(rank, world, local rank) from torchrun's variables, else SLURM's, else a single process.
    ``UserError`` in the batch step of a job of several tasks: they are started by srun, not by the script."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    tasks = int(env.get("SLURM_NTASKS", "1"))
    if tasks > 1 and "SLURM_JOB_ID" in env and "SLURM_STEP_ID" not in env:
        raise UserError(
            f"job {env.get('SLURM_JOB_ID', '?')} has {tasks} tasks, but this process was started by its batch "
            "script, not by srun: run 'srun aidetect ...' or submit slurm/train.sbatch (or aidetect submit)"
        )
    if "SLURM_PROCID" in env and tasks > 1:
        return int(env["SLURM_PROCID"]), tasks, int(env.get("SLURM_LOCALID", 0))
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
    if world == 1 or dist.is_initialized():
        return DistInfo(rank, world, local_rank, device, (socket.gethostname(),))
    slurm_rendezvous()
    if "MASTER_ADDR" not in os.environ:
        raise UserError("MASTER_ADDR is not set: launch multi-process runs with torchrun or the slurm/ scripts")
    if device.type == "cuda":  # a failed or timed-out NCCL collective tears the process down (SIGABRT)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    hosts = tuple(all_gather_objects(socket.gethostname()))
    return DistInfo(rank, world, local_rank, device, hosts, Heartbeat(rank, world))


class Heartbeat:
    """A thread that adds 1 to this rank's counter in the rendezvous store every ``BEAT_S`` seconds, through a
    connection of its own; ``silent()`` tells which ranks' counters stopped."""

    BEAT_S = 1.0

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world, self.stopped = rank, world, threading.Event()
        self.store = dist.PrefixStore(
            "aidetect-heartbeat/",
            dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), timeout=timedelta(seconds=10)),
        )
        threading.Thread(target=self.beat, name="aidetect-heartbeat", daemon=True).start()

    def beat(self) -> None:
        while not self.stopped.wait(self.BEAT_S):
            try:
                self.store.add(str(self.rank), 1)
            except Exception:  # the store is gone (its host ended): nothing left to tell
                return

    def counts(self) -> list[int]:
        return [self.store.add(str(rank), 0) for rank in range(self.world)]  # add 0: read without blocking

    def silent(self) -> list[int] | None:
        """The other ranks whose counter did not move in 3 beats; None when the store does not answer."""
        try:
            before = self.counts()
            time.sleep(3 * self.BEAT_S)
            after = self.counts()
        except Exception:  # the store's host (rank 0's process under srun) does not answer
            return None
        return [rank for rank in range(self.world) if rank != self.rank and after[rank] == before[rank]]

    def stop(self) -> None:
        self.stopped.set()


# What torch's RuntimeErrors say when a collective failed for want of a peer. gloo's timeouts read "Timed
# out waiting 30000ms for recv operation" from the main thread, "Application timeout caused pair closure"
# from DDP's all-reduce in autograd's thread; a peer that exited, "Connection reset/closed by peer".
PEER_FAILURE_MARKS = ("gloo", "NCCL", "Connection reset", "Connection closed", "pair closure", "Timed out waiting")


def is_peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because a peer closed its connection or timed out."""
    if isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and any(mark in str(exc) for mark in PEER_FAILURE_MARKS)


def lost_peer_message(info: DistInfo, exc: BaseException) -> str:
    """One line naming the ranks (and hosts) that stopped answering, as far as the heartbeats tell."""
    cause = first_line(exc)[:200]
    silent = info.heartbeat.silent() if info.heartbeat else None
    host = dict(enumerate(info.hosts))
    if silent is None:
        who = f"rank 0 ({host.get(0, '?')}), which holds the rendezvous store, stopped answering"
    elif silent:
        who = ", ".join(f"rank {rank} ({host.get(rank, '?')})" for rank in silent) + " stopped answering"
    else:
        who = "every rank still answers, but a collective failed"
    return f"{who}; rank {info.rank} ({host.get(info.rank, '?')}) gives up: {cause}"


@contextlib.contextmanager
def peers_watched(info: DistInfo) -> Iterator[None]:
    """Runs the block; a collective that fails because a peer is gone becomes ``LostPeer`` (one line)."""
    try:
        yield
    except Exception as exc:
        if info.world > 1 and is_peer_failure(exc):
            raise LostPeer(lost_peer_message(info, exc)) from None
        raise


def cleanup_distributed(info: DistInfo | None = None) -> None:
    if info is not None and info.heartbeat is not None:
        info.heartbeat.stop()
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
