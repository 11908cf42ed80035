"""How much memory this job may still give to new processes: what SLURM allocated on this node, else
the memory limit of this process's cgroup; and never more than the machine has available.

SLURM and cgroup figures are limits on everything the job runs, this process included, so what this
process already holds (its resident set) is taken off them; the machine's ``MemAvailable`` already
leaves it out.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from aidetect.errors import UserError

MB = 1 << 20
UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a number near 2**63


@dataclass(frozen=True)
class Memory:
    """``bytes`` of memory for new processes; ``source`` says where the figure comes from, for messages."""

    bytes: int
    source: str


def job_memory(environ: Mapping[str, str] = os.environ, cgroup_root: Path = Path("/sys/fs/cgroup")) -> Memory | None:
    """The memory this job may still give to new processes on this node: the smaller of what its SLURM
    allocation or else its cgroup limit leaves and of what the machine has available (see the module's
    doc); None when nothing tells. ``UserError`` when a SLURM variable is no number."""
    found = [machine_memory()]
    limit = slurm_memory(environ) or cgroup_memory(cgroup_root)
    if limit is not None:
        held = own_resident_bytes()
        found.append(Memory(max(0, limit.bytes - held), f"{limit.source}, less this process's {held / 2**30:.1f} GB"))
    return min((m for m in found if m is not None), key=lambda m: m.bytes, default=None)


def slurm_memory(environ: Mapping[str, str]) -> Memory | None:
    """SLURM's allocation on this node: SLURM_MEM_PER_NODE MB, or SLURM_MEM_PER_CPU MB x SLURM_CPUS_ON_NODE;
    None outside SLURM, or for 0 (a node's whole memory, which the cgroup then tells)."""
    per_node = slurm_number(environ, "SLURM_MEM_PER_NODE")
    if per_node:
        return Memory(per_node * MB, f"SLURM_MEM_PER_NODE={per_node} MB")
    per_cpu, cpus = slurm_number(environ, "SLURM_MEM_PER_CPU"), slurm_number(environ, "SLURM_CPUS_ON_NODE")
    if per_cpu and cpus:
        return Memory(per_cpu * cpus * MB, f"SLURM_MEM_PER_CPU={per_cpu} MB x SLURM_CPUS_ON_NODE={cpus}")
    return None


def slurm_number(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name)
    if value is None:
        return None
    if not value.strip().isdigit():
        raise UserError(f"{name}={value!r}: not a whole number; unset it or set it as SLURM does (MB, or CPUs)")
    return int(value)


def cgroup_memory(root: Path) -> Memory | None:
    """The tightest memory limit on this process's cgroup and its ancestors under ``root``: cgroup v2's
    ``memory.max``, v1's ``memory/.../memory.limit_in_bytes``; None when there is none."""
    limits = [(value, path) for path in cgroup_limit_files(root) if (value := limit_in(path)) is not None]
    if not limits:
        return None
    value, path = min(limits)
    return Memory(value, f"the cgroup limit in {path}")


def cgroup_limit_files(root: Path) -> list[Path]:
    """The memory limit files that exist of this process's cgroups (as /proc/self/cgroup names them) and
    of their ancestors up to the hierarchy's root: v2's at ``root``, v1's at ``root``/memory."""
    hierarchies = [(root, "/", "memory.max"), (root / "memory", "/", "memory.limit_in_bytes")]  # also a container's
    for line in proc_self_cgroup():
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            hierarchies.append((root, path, "memory.max"))
        elif "memory" in controllers.split(","):
            hierarchies.append((root / "memory", path, "memory.limit_in_bytes"))
    files = set()
    for mount, path, name in hierarchies:
        folder = mount / path.lstrip("/")
        for ancestor in (folder, *folder.parents):
            files.add(ancestor / name)
            if ancestor == mount:
                break
    return sorted(f for f in files if f.is_file())


def proc_self_cgroup() -> list[str]:
    try:
        return Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:  # not Linux
        return []


def limit_in(path: Path) -> int | None:
    """A cgroup memory limit file's value in bytes; None for no limit ("max", or v1's huge number)."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text.isdigit() or int(text) >= UNLIMITED:
        return None
    return int(text)


def machine_memory() -> Memory | None:
    """``MemAvailable`` of /proc/meminfo, else the free physical pages ``os.sysconf`` reports."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return Memory(int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo")
    except OSError:
        pass
    try:
        return Memory(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"), "the machine's free memory")
    except (ValueError, OSError):
        return None


def own_resident_bytes() -> int:
    """This process's resident set (VmRSS); 0 where /proc does not tell."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
