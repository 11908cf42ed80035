"""Cluster profiles: where and how jobs run. Typed and checked like run configs, before anything is submitted.

A profile is found by path, else as ``NAME.yaml`` in the folder ``$AIDETECT_PROFILES`` names, else among
the profiles bundled with the package (``expanse``, ``local``; ``hpc/`` links to them), so an installed,
non-editable package finds them too.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

from aidetect.config import Config, build, read_mapping
from aidetect.errors import UserError

PROFILES_ENV = "AIDETECT_PROFILES"
EXECUTORS = ("slurm", "local")  # local: submitit's LocalExecutor, for a workstation without SLURM


@dataclass
class Profile:
    name: str
    executor: str = "slurm"  # one of EXECUTORS
    account: str | None = None
    partition: str | None = None
    partitions: list[str] = field(default_factory=list)  # the partitions that exist, to catch typos
    gpus_per_node: int = 0
    gpu_arch: str | None = None  # e.g. sm_70: the GPUs' architecture, for hpc/setup_env.sh --profile
    cpus_per_task: int = 1  # per task; with one task per GPU, the CPUs each GPU gets
    mem_gb: int | None = None  # per node, for jobs without GPUs (or when mem_per_gpu_gb is not set)
    mem_per_gpu_gb: int | None = None  # per GPU: a job asks for this x its GPUs per node
    constraint: str | None = None  # node features the job needs (sbatch --constraint), e.g. lustre on Expanse
    local_scratch: str | None = None  # node-local folder for data.stage auto ($VARS expanded on each node)
    time_limit_min: int = 60
    signal_delay_s: int = 120
    # Restarts after preemption, time limit or a lost task, all told; the cap of every job, submitit or sbatch
    # (without $AIDETECT_PROFILE: this default, SLURM's MaxBatchRequeue; SDSC Expanse holds a job after 5).
    max_requeues: int = 5
    setup: list[str] = field(default_factory=list)
    runs_dir: str | None = None  # a relative --out resolves under it ($VARS expanded)
    data_dir: str | None = None  # a relative --data resolves under it ($VARS expanded)
    wandb_mode: str | None = None


def profile_path(name_or_path: str) -> Path:
    """The YAML file a ``--profile`` argument names: a path, ``$AIDETECT_PROFILES/NAME.yaml``, or bundled."""
    candidates = [Path(name_or_path)]
    if os.environ.get(PROFILES_ENV):
        candidates.append(Path(os.environ[PROFILES_ENV]) / f"{name_or_path}.yaml")
    candidates.append(Path(str(resources.files("aidetect.profiles") / f"{name_or_path}.yaml")))
    for path in candidates:
        if path.is_file():
            return path
    raise UserError(f"profile {name_or_path!r} not found; use a YAML path or one of: {', '.join(known_profiles())}")


def known_profiles() -> list[str]:
    folders = [Path(str(resources.files("aidetect.profiles")))]
    if os.environ.get(PROFILES_ENV):
        folders.append(Path(os.environ[PROFILES_ENV]))
    return sorted({p.stem for folder in folders for p in folder.glob("*.yaml")})


def load_profile(name_or_path: str, **overrides: Any) -> Profile:
    """A profile by name or path; ``overrides`` (account, partition, ...) win when not None."""
    path = profile_path(name_or_path)
    raw = read_mapping(path, f"a profile is a mapping of keys ({', '.join(f.name for f in fields(Profile))})")
    raw.setdefault("name", path.stem)
    raw |= {key: value for key, value in overrides.items() if value is not None}
    try:
        profile = build(Profile, raw, "")
    except UserError as exc:  # "config key K ..." from the shared type checks, said of this file
        raise UserError(f"{path}: {str(exc).removeprefix('config ')}") from None
    check(profile, path)
    return profile


def check(profile: Profile, path: Path) -> None:
    if profile.executor not in EXECUTORS:
        raise UserError(f"{path}: executor must be {' or '.join(EXECUTORS)}, got {profile.executor!r}")
    if profile.partitions and profile.partition not in profile.partitions:
        raise UserError(
            f"{path}: partition {profile.partition!r} is not one of this cluster's: {', '.join(profile.partitions)}"
        )
    for key in ("gpus_per_node", "max_requeues", "signal_delay_s"):
        if getattr(profile, key) < 0:
            raise UserError(f"{path}: {key} must not be negative, got {getattr(profile, key)}")
    for key in ("cpus_per_task", "time_limit_min", "mem_per_gpu_gb"):
        value = getattr(profile, key)
        if value is not None and value < 1:
            raise UserError(f"{path}: {key} must be at least 1, got {value}")


def node_memory_gb(profile: Profile) -> int | None:
    """Memory a job asks for per node: ``mem_per_gpu_gb`` x its GPUs per node when both are set (partitions
    that share nodes give a GPU job only a token amount unless it asks), else ``mem_gb``."""
    if profile.mem_per_gpu_gb and profile.gpus_per_node:
        return profile.mem_per_gpu_gb * profile.gpus_per_node
    return profile.mem_gb


def setup_lines(profile: Profile) -> list[str]:
    """Shell lines a job runs before its tasks: the profile's ``setup``, then its wandb mode and its
    ``local_scratch`` as ``$AIDETECT_LOCAL_SCRATCH`` (quoted: each node expands its variables when it stages)."""
    lines = list(profile.setup)
    if profile.wandb_mode:
        lines.append(f"export WANDB_MODE={profile.wandb_mode}")
    if profile.local_scratch:
        from aidetect.data.stage import LOCAL_SCRATCH_ENV  # here: the stage module loads torch

        lines.append(f"export {LOCAL_SCRATCH_ENV}={shlex.quote(profile.local_scratch)}")
    return lines


def require_account(profile: Profile) -> None:
    """Before submitting (not for ``doctor``): a placeholder account would only fail in the queue."""
    if profile.account is not None and (not profile.account or profile.account.startswith("SET_")):
        raise UserError(
            f"profile {profile.name}: set 'account' to your SLURM allocation (it is {profile.account!r}) "
            "or pass --account"
        )


def under(folder: str | None, path: str | None) -> str | None:
    """``path`` resolved under ``folder`` when it is relative (environment variables expanded in both)."""
    if path is None or folder is None or Path(os.path.expandvars(path)).is_absolute():
        return path
    expanded = os.path.expandvars(folder)
    if "$" in expanded:
        raise UserError(f"profile folder {folder!r}: {expanded!r} still names an unset environment variable")
    return str(Path(expanded) / path)


def place(config: Config, profile: Profile) -> Config:
    """The config with a relative run folder and pack folder under the profile's runs_dir and data_dir."""
    return replace(
        config,
        data=replace(config.data, shards=under(profile.data_dir, config.data.shards)),
        train=replace(config.train, out=under(profile.runs_dir, config.train.out)),
    )
