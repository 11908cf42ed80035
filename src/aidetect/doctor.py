"""``aidetect doctor``: what an HPC user checks on a fresh node, or inside a job, before spending an allocation.

One line per check (``ok``, ``warn`` or ``FAIL``); the command exits non-zero when any check failed on
any rank. Under ``srun`` or ``torchrun`` every rank runs the checks of its own node (GPUs, the build's
kernels) and takes part in a timed all-reduce; rank 0 prints its lines and every other rank's failures.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import aidetect
from aidetect.cluster.profiles import Profile
from aidetect.cuda_builds import check_visible_gpus
from aidetect.distributed import all_gather_objects, cleanup_distributed, environment_ranks, setup_distributed
from aidetect.errors import first_line
from aidetect.hardware import cuda_facts, cuda_problem, resolve_precision

ALLREDUCE_BYTES = 32 * 2**20
ALLREDUCE_TIMEOUT_S = 60
DISK_WARN_GB, DISK_FAIL_GB = 20.0, 1.0


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok | warn | FAIL
    detail: str

    def line(self) -> str:
        return f"{self.status:<4} {self.name}: {self.detail}"


def doctor(profile: Profile | None = None, data: str | None = None, out: str | None = None) -> tuple[list[str], bool]:
    """Run every check; returns (the lines this rank prints, whether every check passed on every rank).
    Rank 0 prints all its lines and the other ranks' failures; when the ranks cannot reach each other,
    every rank prints its own."""
    node = [versions(), gpus(profile), gpu_build(), precision(), distributed()]
    shared = [*([shards(data)] if data else []), disk(out or (profile.runs_dir if profile else None)), wandb(profile)]
    rank = environment_ranks()[0]
    own = [c for c in node if c.status == "FAIL"]
    if dist.is_initialized():
        failures = dict(enumerate(all_gather_objects(own)))
        cleanup_distributed()
    else:
        failures = {rank: own}
    passed = all(c.status != "FAIL" for c in shared) and not any(failures.values())
    if rank != 0 and len(failures) > 1:
        return [], passed  # rank 0 speaks for everyone
    lines = [c.line() for c in node + shared]
    for other, checks in failures.items():
        if other != rank:
            lines += [f"FAIL rank {other}: {c.name}: {c.detail}" for c in checks]
    return lines, passed


def node_versions() -> dict[str, str | None]:
    """This node's name and the versions that matter on it: aidetect, Python, torch, the CUDA torch was
    built for (None: a CPU build) and NCCL (None without a usable GPU)."""
    return {
        "host": socket.gethostname(),
        "aidetect": aidetect.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None,
    }


def versions() -> Check:
    found = node_versions()
    return Check(
        "versions",
        "ok",
        f"aidetect {found['aidetect']}, python {found['python']}, torch {found['torch']} "
        f"(CUDA {found['cuda'] or 'none'}, NCCL {found['nccl'] or 'n/a'}) on {found['host']}",
    )


def slurm_gpus() -> int | None:
    """GPUs SLURM allocated to this node's share of the job, if it says."""
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return None


def gpus(profile: Profile | None) -> Check:
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    names = sorted({torch.cuda.get_device_name(i) for i in range(visible)})
    allocated, expected = slurm_gpus(), profile.gpus_per_node if profile else 0
    detail = f"{visible} visible" + (f" ({', '.join(names)})" if names else "")
    facts = cuda_facts()
    if facts.given_gpus and not visible:  # train and evaluate would stop here too (aidetect.hardware)
        return Check("gpus", "FAIL", f"this job was given GPUs ({facts.given_gpus}) but {cuda_problem(facts)}")
    if allocated is not None and allocated != visible:
        return Check("gpus", "FAIL", f"{detail}, but SLURM allocated {allocated}: check CUDA_VISIBLE_DEVICES")
    if expected and not visible:
        return Check("gpus", "FAIL", f"{detail}; profile {profile.name} expects {expected} per node: a GPU node?")
    return Check("gpus", "ok", detail + (f", SLURM allocated {allocated}" if allocated is not None else ""))


def gpu_build() -> Check:
    if not torch.cuda.is_available():
        return Check("gpu build", "ok", "no GPU visible: nothing to check")
    problems = check_visible_gpus()
    if problems:
        return Check("gpu build", "FAIL", problems[0])
    return Check("gpu build", "ok", f"kernels for these GPUs in {' '.join(torch.cuda.get_arch_list())}")


def precision() -> Check:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = resolve_precision("auto", device)
    why = {"fp32": "CPU", "bf16": "the GPU supports bf16", "fp16": "no bf16 on this GPU: fp16 with a GradScaler"}
    return Check("precision", "ok", f"auto -> {chosen} ({why[chosen]})")


def distributed() -> Check:
    """Under srun/torchrun: a timed all-reduce across all ranks, checked for the right sum."""
    rank, world, _ = environment_ranks()
    if world == 1:
        return Check("all-reduce", "ok", "one process: nothing to check (run under srun or torchrun)")
    try:
        info = setup_distributed(ALLREDUCE_TIMEOUT_S)
        backend = dist.get_backend()
        hosts = len(set(info.hosts))
        tensor = torch.ones(ALLREDUCE_BYTES // 4, device=info.device)
        dist.all_reduce(tensor)  # warm-up: connections and buffers
        tensor.fill_(rank + 1)
        started = time.perf_counter()
        dist.all_reduce(tensor)
        correct = float(tensor[0]) == world * (world + 1) / 2
        seconds = time.perf_counter() - started
    except Exception as exc:  # a rank that cannot reach the others: the check's answer, not a crash
        cleanup_distributed()  # the ranks cannot talk: each reports for itself
        return Check("all-reduce", "FAIL", f"{world} ranks could not all-reduce: {first_line(exc)}")
    bus_gb_s = ALLREDUCE_BYTES * 2 * (world - 1) / world / seconds / 1e9
    status, verdict = ("ok", "") if correct else ("FAIL", "; WRONG RESULT")
    return Check(
        "all-reduce",
        status,
        f"{world} ranks on {hosts} host(s), {backend}: {ALLREDUCE_BYTES >> 20} MiB in {seconds * 1e3:.1f} ms, "
        f"bus bandwidth {bus_gb_s:.2f} GB/s{verdict}",
    )


def shards(data: str) -> Check:
    from aidetect.data.manifest import read_manifest, verify_shards
    from aidetect.errors import UserError

    try:
        manifest = read_manifest(data)
        problems = verify_shards(data)
    except UserError as exc:
        return Check("data", "FAIL", str(exc))
    count = len(manifest["shards"])
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        return Check("data", "FAIL", f"{len(problems)} of {count} shards damaged: {problems[0]}{more}")
    return Check("data", "ok", f"{count} shards, {manifest['samples']} samples in {data}: sizes and sha256 match")


def disk(folder: str | None) -> Check:
    path = Path(os.path.expandvars(folder or ".")).absolute()
    while not path.exists():  # the run folder may not exist yet: its file system does
        path = path.parent
    free_gb = shutil.disk_usage(path).free / 1e9
    status = "FAIL" if free_gb < DISK_FAIL_GB else "warn" if free_gb < DISK_WARN_GB else "ok"
    return Check("disk", status, f"{free_gb:.1f} GB free at {path}")


def wandb(profile: Profile | None) -> Check:
    from aidetect.tracking import has_api_key

    mode = os.environ.get("WANDB_MODE") or (profile.wandb_mode if profile else None)
    key = has_api_key()
    mode = mode or ("online" if key else "offline")
    detail = f"mode {mode}, API key {'configured' if key else 'not configured'}"
    if mode == "online" and not key:
        return Check("wandb", "FAIL", f"{detail}: run 'wandb login' or set WANDB_MODE=offline")
    return Check("wandb", "ok", detail + (" (sync later: aidetect wandb-sync RUN)" if mode == "offline" else ""))
