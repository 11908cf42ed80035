"""The training/evaluation loader over packed WebDataset shards.

Each epoch the chosen shards are put in an order seeded by (seed, epoch) and read as one virtual
sequence of N samples whose length the manifest gives exactly. That sequence is cut into contiguous
ranges, one per (rank, worker); a worker reads only the shards its range covers, skipping into the
first one. Because ranges are cut by sample count rather than by shard, any number of ranks and
workers works with any number of shards, and:

- training: every rank gets the same number of full batches, N // (world x batch) (the remainder,
  fewer than one global batch, is dropped and differs from epoch to epoch), so no rank waits at an
  all-reduce that another never reaches;
- evaluation: the ranges tile the sequence, so every sample is seen exactly once across all ranks.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from aidetect.data.decode import decode_stored
from aidetect.data.pack import FORMAT, MANIFEST
from aidetect.data.transforms import augment, center_crop_tensor, normalize_batch
from aidetect.errors import UserError


@dataclass(frozen=True)
class Shard:
    path: str
    count: int


class ReadRange(NamedTuple):
    shard: Shard
    skip: int  # samples to pass over at the start of the shard
    take: int


class Batch(NamedTuple):
    images: torch.Tensor  # N x 3 x H x W, float32, normalised, channels_last memory format
    labels: torch.Tensor  # N, float32, 1 = fake
    keys: list[str]


# ----------------------------------------------------------------------------------------------------
# Manifest and split selection


def read_manifest(shard_dir: str | Path) -> dict[str, Any]:
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise UserError(f"{path}: not found; run 'aidetect pack SRC {shard_dir}' first")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc}); re-run pack") from None
    if manifest.get("format") != FORMAT:
        raise UserError(f"{path}: not an aidetect shard manifest (format {manifest.get('format')!r})")
    return manifest


def fold_splits(folds: int, val_fold: int) -> dict[str, list[str]]:
    """Cross-validation splits: train on every fold but ``val_fold``, validate on it, test on ``test``."""
    if not 0 <= val_fold < folds:
        raise UserError(f"fold {val_fold} does not exist: the pack has folds 0..{folds - 1}")
    return {
        "train": [f"fold{k}" for k in range(folds) if k != val_fold],
        "val": [f"fold{val_fold}"],
        "test": ["test"],
    }


def select_shards(shard_dir: str | Path, splits: list[str]) -> list[Shard]:
    manifest = read_manifest(shard_dir)
    unknown = sorted(set(splits) - set(manifest["splits"]))
    if unknown:
        raise UserError(f"{shard_dir}: no split {', '.join(unknown)}; it has {', '.join(manifest['splits'])}")
    shards = []
    for entry in manifest["shards"]:
        path = Path(shard_dir) / entry["name"]
        if entry["split"] in splits and entry["count"] > 0:
            if not path.is_file():
                raise UserError(f"{path}: listed in the manifest but missing; re-run 'aidetect pack' to restore it")
            shards.append(Shard(str(path), entry["count"]))
    return shards


# ----------------------------------------------------------------------------------------------------
# The per-epoch plan: pure functions of (shards, seed, epoch, rank, world, worker, workers)


def seeded(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def epoch_order(shards: list[Shard], seed: int, epoch: int, shuffle: bool) -> list[Shard]:
    order = list(shards)
    if shuffle:
        random.Random(seeded("shards", seed, epoch)).shuffle(order)
    return order


def rank_range(total: int, rank: int, world: int, batch_size: int, train: bool) -> tuple[int, int]:
    """(start, count) of a rank's samples in the epoch's sequence."""
    if train:
        count = (total // (world * batch_size)) * batch_size
        return rank * count, count
    start, stop = total * rank // world, total * (rank + 1) // world
    return start, stop - start


def worker_counts(count: int, workers: int, batch_size: int) -> list[int]:
    """Split a rank's samples over its workers in whole batches; a final partial batch goes to the
    worker whose turn it is in the DataLoader's round-robin, so no worker yields two partial batches."""
    full, remainder = divmod(count, batch_size)
    counts = [(full // workers + (w < full % workers)) * batch_size for w in range(workers)]
    counts[full % workers] += remainder
    return counts


def batches_per_rank(count: int, workers: int, batch_size: int) -> int:
    return sum(-(-c // batch_size) for c in worker_counts(count, workers, batch_size))


def read_ranges(order: list[Shard], start: int, count: int) -> list[ReadRange]:
    """Which shards, and which samples in them, cover positions [start, start + count) of the sequence."""
    ranges, offset, stop = [], 0, start + count
    for shard in order:
        lo, hi = max(start, offset), min(stop, offset + shard.count)
        if lo < hi:
            ranges.append(ReadRange(shard, lo - offset, hi - lo))
        offset += shard.count
    return ranges


def worker_plan(
    shards: list[Shard],
    *,
    seed: int,
    epoch: int,
    train: bool,
    rank: int,
    world: int,
    worker: int,
    workers: int,
    batch_size: int,
) -> list[ReadRange]:
    order = epoch_order(shards, seed, epoch, shuffle=train)
    total = sum(s.count for s in order)
    rank_start, rank_count = rank_range(total, rank, world, batch_size, train)
    counts = worker_counts(rank_count, workers, batch_size)
    return read_ranges(order, rank_start + sum(counts[:worker]), counts[worker])


# ----------------------------------------------------------------------------------------------------
# Dataset (runs in DataLoader workers) and loader (runs in the training process)


class ShardDataset(IterableDataset):
    """Yields (uint8 HWC image, label, key) for this rank and worker; batching is the DataLoader's."""

    def __init__(
        self,
        shards: list[Shard],
        *,
        batch_size: int,
        train: bool,
        crop: int | None,
        seed: int,
        rank: int,
        world: int,
        shuffle_buffer: int,
    ) -> None:
        self.shards, self.batch_size, self.train, self.crop = shards, batch_size, train, crop
        self.seed, self.rank, self.world, self.shuffle_buffer = seed, rank, world, shuffle_buffer
        # In shared memory so that persistent DataLoader workers see set_epoch (they hold copies).
        self.shared_epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self.shared_epoch.item())

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.shared_epoch.fill_(value)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, str]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        plan = worker_plan(
            self.shards,
            seed=self.seed,
            epoch=self.epoch,
            train=self.train,
            rank=self.rank,
            world=self.world,
            worker=worker,
            workers=workers,
            batch_size=self.batch_size,
        )
        samples = itertools.chain.from_iterable(read_samples(r) for r in plan)
        generator = torch.Generator().manual_seed(seeded("augment", self.seed, self.epoch, self.rank, worker))
        if self.train:
            samples = shuffle_buffer(samples, self.shuffle_buffer, random.Random(generator.initial_seed()))
        for sample in samples:
            yield self.image(sample, generator), int(sample["cls"]), sample["__key__"]

    def image(self, sample: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        data = sample.get("jpg", sample.get("png"))
        image = torch.from_numpy(decode_stored(data))
        if self.train:
            return augment(image, self.crop or image.shape[0], generator)
        return center_crop_tensor(image, self.crop) if self.crop else image


def read_samples(read: ReadRange) -> Iterator[dict[str, Any]]:
    return itertools.islice(tar_samples(read.shard.path), read.skip, read.skip + read.take)


def tar_samples(path: str) -> Iterator[dict[str, Any]]:
    """Samples of one of our shards: members grouped by key, WebDataset's convention.

    Our shards are plain USTAR archives that we wrote, so their 512-byte headers can be read at fixed
    offsets. Python's tarfile module spends ~0.2 ms per sample parsing the same headers, a third of
    a loader worker's time (measured); plain ``webdataset`` still reads these files as they are.
    """
    with open(path, "rb") as f:
        data = memoryview(f.read())
    sample: dict[str, Any] = {}
    offset = 0
    while offset + 512 <= len(data) and any(data[offset : offset + 512]):
        header = data[offset : offset + 512]
        name = bytes(header[:100]).rstrip(b"\0").decode()
        size = int(bytes(header[124:136]).strip(b"\0 ") or b"0", 8)
        if bytes(header[156:157]) not in (b"0", b"\0"):
            raise UserError(f"{path}: holds a tar member of an unexpected type ({name}); re-pack it with aidetect pack")
        key, _, extension = name.partition(".")
        if sample and key != sample["__key__"]:
            yield sample
            sample = {}
        sample["__key__"] = key
        sample[extension] = bytes(data[offset + 512 : offset + 512 + size])
        offset += 512 + -(-size // 512) * 512
    if sample:
        yield sample


def shuffle_buffer(samples: Iterator, size: int, rng: random.Random) -> Iterator:
    """Reservoir-style shuffle of a stream through a buffer of ``size`` samples."""
    buffer: list = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        index = rng.randrange(size)
        buffer[index], sample = sample, buffer[index]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


class ShardLoader:
    """Batches of normalised images for one rank; ``set_epoch`` before iterating, as with DistributedSampler."""

    def __init__(self, dataset: ShardDataset, *, num_workers: int, device: torch.device, noise_std: float) -> None:
        self.dataset, self.device, self.noise_std = dataset, device, noise_std
        self.num_workers = num_workers
        self.loader = DataLoader(
            dataset,
            batch_size=dataset.batch_size,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
            prefetch_factor=4 if num_workers else None,
            persistent_workers=num_workers > 0,  # no fork and warm-up per epoch
        )

    def set_epoch(self, epoch: int) -> None:
        self.dataset.epoch = epoch

    def __len__(self) -> int:
        d = self.dataset
        total = sum(s.count for s in d.shards)
        _, count = rank_range(total, d.rank, d.world, d.batch_size, d.train)
        return batches_per_rank(count, max(1, self.num_workers), d.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        """Normalised batches on the device: uint8 crosses to the GPU (4x less than float) and is
        normalised there, as timm's prefetcher does."""
        d = self.dataset
        generator = torch.Generator(self.device).manual_seed(seeded("noise", d.seed, d.epoch, d.rank))
        noise = self.noise_std if d.train else 0.0  # never noise evaluation images
        for images, labels, keys in self.loader:
            images = images.to(self.device, non_blocking=True)
            yield Batch(normalize_batch(images, noise, generator), labels.float().to(self.device), list(keys))


def build_loader(
    shard_dir: str | Path,
    splits: list[str],
    *,
    batch_size: int,
    train: bool,
    crop: int | None = None,
    num_workers: int = 4,
    seed: int = 0,
    rank: int | None = None,
    world: int | None = None,
    device: str | torch.device = "cpu",
    noise_std: float = 0.0,
    shuffle_buffer: int = 1000,
) -> ShardLoader:
    """A loader over ``splits`` of a pack; rank and world default to torch.distributed's when initialised."""
    if rank is None or world is None:
        distributed = dist.is_available() and dist.is_initialized()
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    shards = select_shards(shard_dir, splits)
    total = sum(s.count for s in shards)
    if train and total < world * batch_size:
        raise UserError(
            f"{shard_dir}: splits {', '.join(splits)} hold {total} samples, fewer than one global batch "
            f"({world} ranks x batch {batch_size}); lower the batch size"
        )
    dataset = ShardDataset(
        shards,
        batch_size=batch_size,
        train=train,
        crop=crop,
        seed=seed,
        rank=rank,
        world=world,
        shuffle_buffer=shuffle_buffer,
    )
    return ShardLoader(dataset, num_workers=num_workers, device=torch.device(device), noise_std=noise_std)
