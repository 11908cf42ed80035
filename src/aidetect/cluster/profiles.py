"""Cluster profiles (``hpc/*.yaml``): where and how jobs run. Checked before anything is submitted."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from aidetect.errors import UserError

PROFILE_DIR = Path(__file__).resolve().parents[3] / "hpc"  # the repository's hpc/ (editable install)


@dataclass
class Profile:
    name: str
    executor: str = "slurm"  # slurm | local (submitit's LocalExecutor, for a workstation)
    account: str | None = None
    partition: str | None = None
    partitions: list[str] = field(default_factory=list)  # the partitions that exist, to catch typos
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: int | None = None
    time_limit_min: int = 60
    signal_delay_s: int = 120
    max_requeues: int = 10
    setup: list[str] = field(default_factory=list)
    runs_dir: str = "runs"
    data_dir: str | None = None
    wandb_mode: str | None = None


def load_profile(name_or_path: str, **overrides: Any) -> Profile:
    """A profile by name (``hpc/NAME.yaml``) or path; ``overrides`` (account, partition, ...) win when not None."""
    path = Path(name_or_path)
    if not path.is_file():
        path = PROFILE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILE_DIR.glob("*.yaml")))
        raise UserError(f"profile {name_or_path!r} not found; use a YAML path or one of: {known}")
    raw = yaml.safe_load(path.read_text()) or {}
    known_keys = {f.name for f in fields(Profile)}
    unknown = sorted(set(raw) - known_keys)
    if unknown:
        raise UserError(f"{path}: unknown key {unknown[0]!r}; keys: {', '.join(sorted(known_keys))}")
    raw.setdefault("name", path.stem)
    raw |= {key: value for key, value in overrides.items() if value is not None}
    profile = Profile(**raw)
    check(profile, path)
    return profile


def check(profile: Profile, path: Path) -> None:
    if profile.executor not in ("slurm", "local"):
        raise UserError(f"{path}: executor must be slurm or local, got {profile.executor!r}")
    if profile.account is not None and (not profile.account or profile.account.startswith("SET_")):
        raise UserError(f"{path}: set 'account' to your SLURM allocation (it is {profile.account!r}) or pass --account")
    if profile.partitions and profile.partition not in profile.partitions:
        raise UserError(
            f"{path}: partition {profile.partition!r} is not one of this cluster's: {', '.join(profile.partitions)}"
        )
