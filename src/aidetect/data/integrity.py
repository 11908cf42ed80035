"""Shard integrity: the manifest records every shard's size and sha256, and copies to or from parallel
file systems do get truncated or corrupted. Pack, the loader and ``verify_shards`` all check a shard
against its manifest entry here and word a damaged one the same way: which file, what is wrong, how
to get it back.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from aidetect.errors import UserError


@dataclass(frozen=True)
class ShardProblem:
    """A shard file that does not match its manifest entry; ``str()`` is the one line the user sees."""

    path: str
    problem: str

    def __str__(self) -> str:
        # Re-running pack on a finished pack folder rewrites exactly the shards that differ from its manifest.
        return (
            f"{self.path}: {self.problem}; copy it again, or restore it by re-running "
            f"'aidetect pack SRC {Path(self.path).parent}' with the source and options it was packed with"
        )

    def error(self) -> DamagedShard:
        return DamagedShard(self)


class DamagedShard(UserError):
    """A ``ShardProblem`` met while reading a shard, raised: its line is the problem's, kept as ``problem``."""

    def __init__(self, problem: ShardProblem) -> None:
        super().__init__(str(problem))
        self.problem = problem


def damaged(path: str | os.PathLike, detail: str) -> ShardProblem:
    """A shard whose content is not what pack wrote; ``detail`` says how."""
    return ShardProblem(str(path), f"damaged shard, {detail}")


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_problem(path: str | os.PathLike, size: int, sha256: str | None = None) -> ShardProblem | None:
    """A shard file against its manifest entry: present and ``size`` bytes (a stat), and, when ``sha256``
    is given, that digest (reads the whole file). None when it matches."""
    if not os.path.isfile(path):
        return ShardProblem(str(path), "listed in the manifest but missing")
    return compare(path, os.path.getsize(path), size, sha256, lambda: sha256_file(path))


def bytes_problem(path: str | os.PathLike, data: bytes, size: int, sha256: str | None = None) -> ShardProblem | None:
    """``file_problem`` for a shard already read into memory as ``data``."""
    return compare(path, len(data), size, sha256, lambda: hashlib.sha256(data).hexdigest())


def compare(
    path: str | os.PathLike, actual_size: int, size: int, sha256: str | None, digest: Callable[[], str]
) -> ShardProblem | None:
    """The size first, for free; then, when ``sha256`` is given, ``digest()``: same-size corruption
    (flipped bytes) shows only there."""
    if actual_size != size:
        kind = "a truncated" if actual_size < size else "a bad"
        return damaged(path, f"{actual_size} bytes where the manifest records {size} ({kind} copy)")
    if sha256 is not None and digest() != sha256:
        return damaged(path, "its sha256 differs from the manifest's (corrupted bytes)")
    return None


def manifest_problems(
    shard_dir: str | os.PathLike,
    entries: list[dict],
    workers: int = 4,
    readable: Callable[[Path], ShardProblem | None] | None = None,
) -> list[ShardProblem]:
    """The shards of manifest ``entries`` under ``shard_dir`` that are missing or differ in size or sha256,
    or, with ``readable``, that match them but whose content ``readable(path)`` finds a problem in; in
    manifest order. Threads suffice to hash ``workers`` shards at once: hashlib releases the GIL."""

    def check(entry: dict) -> ShardProblem | None:
        path = Path(shard_dir) / entry["name"]
        problem = file_problem(path, entry["bytes"], entry["sha256"])
        return problem or (readable(path) if readable else None)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        return [problem for problem in pool.map(check, entries) if problem]
