"""Node-local staging (``data.stage``): copy a pack from the parallel file system to a node's own disk once,
then read it from there.

Without it every node reads the whole pack from the parallel file system once per epoch (its ranks and
DataLoader workers share the page cache, but a pack larger than the cache is read again each epoch). With
it one process per node (local rank 0) copies every shard the manifest lists, then ``manifest.json``, into
``DIR/PACK_NAME``: a run reads every split (the training folds and the validation fold each epoch, the test
split at the end; the shortcut audit reads every sample's record at start), so the whole pack is what the
run reads. Each copy is written under a temporary name, checked against the manifest's size and sha256 and
renamed, so a staged file is either whole and verified or absent. A copy already there that matches the
manifest (a requeued job on the same node) is kept; one that does not (truncated, corrupted) is copied
again.

The other ranks wait for every node's copy in a collective of their own, on a gloo group whose timeout is
``train.dist_timeout_s`` plus the time to copy the whole pack at ``SLOWEST_BYTES_PER_S``: the process
group's own timeout bounds training's collectives and would end a long copy. An error on any node (no
room, a damaged shard in the pack) is raised on every rank as the same one-line ``UserError``.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import torch.distributed as dist

from aidetect.data.integrity import file_problem
from aidetect.data.manifest import read_manifest
from aidetect.data.packformat import MANIFEST
from aidetect.errors import UserError
from aidetect.fileio import atomic_write_bytes, replaced_atomically

LOCAL_SCRATCH_ENV = "AIDETECT_LOCAL_SCRATCH"  # a cluster's node-local folder, exported by submit from the profile
SLOWEST_BYTES_PER_S = 10e6  # the slowest copy rate the wait for staging allows for
COPY_THREADS = 4  # shards copied (and verified) at once: parallel file systems serve parallel streams faster


@dataclass(frozen=True)
class StageReport:
    """What staging did on one node; ``str()`` is its log line."""

    pack: Path
    folder: Path
    copied: int
    copied_bytes: int
    reused: int
    seconds: float

    def __str__(self) -> str:
        rate = self.copied_bytes / 1e6 / max(self.seconds, 1e-9)
        return (
            f"staged {self.pack} to {self.folder} on {socket.gethostname()}: {self.copied} shard(s) copied "
            f"({self.copied_bytes / 1e6:.1f} MB), {self.reused} already there and verified, "
            f"{self.seconds:.1f} s, {rate:.1f} MB/s"
        )


def stage_pack(shards: str, stage: str, local_rank: int, timeout_s: int) -> str:
    """The folder the loader should read pack ``shards`` from under ``data.stage`` = ``stage``.

    ``none``: ``shards`` itself. Otherwise the pack is copied into ``stage_folder(shards, stage)`` by the
    process of ``local_rank`` 0 of each node (see the module docstring), which prints one line; every
    process returns once every node's copy is done (``timeout_s``: ``train.dist_timeout_s``). Raises
    ``UserError``, on every rank, when ``stage`` names no usable folder or a node's staging failed.
    """
    if stage == "none":
        return shards
    wait = timedelta(seconds=timeout_s + pack_bytes(shards) / SLOWEST_BYTES_PER_S)
    group = dist.new_group(backend="gloo", timeout=wait) if dist.is_initialized() else None
    error = None
    try:
        folder = stage_folder(shards, stage)
        if local_rank == 0:
            print(f"[aidetect] {copy_pack(Path(shards), folder)}", flush=True)
    except UserError as exc:
        error = str(exc)
    raise_first(error, group)
    return str(folder)


def stage_folder(shards: str, stage: str) -> Path:
    """``DIR/PACK_NAME``, DIR being ``stage`` (``auto``: ``$SLURM_TMPDIR``, else ``$AIDETECT_LOCAL_SCRATCH``)
    with environment variables expanded. ``UserError`` when a variable is unset, DIR is not absolute or
    DIR/PACK_NAME is the pack itself."""
    named = stage
    if stage == "auto":
        named = os.environ.get("SLURM_TMPDIR") or os.environ.get(LOCAL_SCRATCH_ENV) or ""
        if not named:
            raise UserError(
                f"data.stage auto: neither SLURM_TMPDIR nor {LOCAL_SCRATCH_ENV} is set on this node "
                "(a profile's local_scratch sets it); set data.stage to a node-local folder or none"
            )
    expanded = os.path.expandvars(named)
    if "$" in expanded:
        raise UserError(f"data.stage {named!r}: {expanded!r} still names an unset environment variable on this node")
    if not os.path.isabs(expanded):
        raise UserError(f"data.stage {named!r} is {expanded!r}: not an absolute folder")
    folder = Path(expanded) / Path(shards).resolve().name
    if folder.resolve() == Path(shards).resolve():
        raise UserError(f"data.stage {named!r} would stage {shards} onto itself; name a node-local folder")
    return folder


def pack_bytes(shards: str | Path) -> int:
    return sum(entry["bytes"] for entry in read_manifest(shards)["shards"])


def copy_pack(pack: Path, folder: Path) -> StageReport:
    """Copy every shard of ``pack`` that ``folder`` does not already hold verified, then its manifest.
    ``UserError`` when ``folder`` cannot be made, lacks room or a copy fails or differs from the manifest."""
    started = time.monotonic()
    entries = read_manifest(pack)["shards"]
    make_folder(folder)
    kept = in_threads(partial(keep_verified, folder), entries)
    missing = [entry for entry, verified in zip(entries, kept, strict=True) if not verified]
    check_sources(pack, missing)
    copied_bytes = sum(entry["bytes"] for entry in missing)
    check_space(folder, copied_bytes)
    in_threads(partial(copy_verified, pack, folder), missing)
    atomic_write_bytes(folder / MANIFEST, (pack / MANIFEST).read_bytes())
    return StageReport(
        pack, folder, len(missing), copied_bytes, len(entries) - len(missing), time.monotonic() - started
    )


def in_threads(work: Callable[[dict], Any], entries: list[dict]) -> list[Any]:
    """``work(entry)`` for every manifest entry, ``COPY_THREADS`` at a time (hashing and copying release
    the GIL), in entry order."""
    with ThreadPoolExecutor(COPY_THREADS) as pool:
        return list(pool.map(work, entries))


def make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"data.stage: cannot create {folder} ({exc.strerror or exc}); set data.stage to another folder"
        ) from None


def keep_verified(folder: Path, entry: dict) -> bool:
    """True when ``folder`` holds shard ``entry`` with the manifest's size and sha256; a staged copy that
    differs is removed (it will be copied again, and frees its room first)."""
    staged = folder / entry["name"]
    if not staged.exists():
        return False
    if file_problem(staged, entry["bytes"], entry["sha256"]) is None:
        return True
    staged.unlink()
    return False


def check_sources(pack: Path, entries: list[dict]) -> None:
    """A stat of each shard of ``pack`` to copy: a missing or truncated one fails before any copying."""
    for entry in entries:
        problem = file_problem(pack / entry["name"], entry["bytes"])
        if problem:
            raise problem.error()


def check_space(folder: Path, needed: int) -> None:
    """``UserError`` when the file system of ``folder`` has less than ``needed`` bytes free."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise UserError(
            f"data.stage: {folder} has {free / 1e9:.2f} GB free, staging the pack needs {needed / 1e9:.2f} GB "
            "more; set data.stage to a larger node-local folder, or none"
        )


def copy_verified(pack: Path, folder: Path, entry: dict) -> None:
    """Copy shard ``entry`` of ``pack`` into ``folder``: to a temporary name there, checked against the
    manifest's size and sha256, then renamed. A copy that differs means the pack's own file is damaged:
    the ``UserError`` names it (and how to restore it)."""
    source = pack / entry["name"]
    try:
        with replaced_atomically(folder / entry["name"]) as temporary:
            shutil.copyfile(source, temporary)
            problem = file_problem(temporary, entry["bytes"], entry["sha256"])
            if problem:
                raise replace(problem, path=str(source)).error()
    except OSError as exc:
        raise UserError(f"data.stage: copying {source} to {folder} failed ({exc.strerror or exc})") from None


def raise_first(error: str | None, group: Any) -> None:
    """Once every rank of ``group`` got here (all nodes staged; no group: this process alone), raise the
    first rank's error, if any rank had one, as a ``UserError`` on every rank."""
    errors = [error]
    if group is not None:
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error, group=group)
        dist.destroy_process_group(group)
    first = next((e for e in errors if e), None)
    if first:
        raise UserError(first)
