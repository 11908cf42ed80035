"""The training/evaluation loader over packed WebDataset shards.

Each epoch the chosen shards are put in an order seeded by (seed, epoch), the samples within each
shard are permuted (training only), and the result is read as one virtual sequence of N positions
whose length the manifest gives exactly. Then:

- training: global batch t is positions [t x G, (t + 1) x G) with G = world x batch, and rank r takes
  its r-th slice. Every rank gets N // G full batches (fewer than G samples are dropped, a different
  remainder each epoch), so no rank waits at an all-reduce that another never reaches; and a global
  batch holds the same samples however many ranks share it, so 2 ranks x batch 4 train like 1 x 8;
- evaluation: rank r takes the r-th contiguous 1/world of the sequence, so every sample is seen
  exactly once across all ranks.

A rank's batches go round-robin to its DataLoader workers, the order in which the DataLoader
returns them, and augmentation is seeded per sample: what a rank yields depends on nothing but
(seed, epoch, rank, world, batch size), not on the number of workers. Each worker holds one whole
shard in memory at a time; workers and ranks on one node that read the same shard share the page
cache, so a node reads each shard from a parallel file system about once per epoch.

Shards are checked against the manifest, since copies between file systems get truncated or
corrupted: every selected shard's size when the loader is built, and a shard's sha256 the first time
a process reads it. A damaged shard or sample ends the run with one ``UserError`` line naming the
file and how to restore it, also when a DataLoader worker process found it.
"""

from __future__ import annotations

import atexit
import bisect
import hashlib
import itertools
import json
import random
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from aidetect.data.decode import decode_stored
from aidetect.data.integrity import ShardProblem, bytes_problem, damaged, file_problem, manifest_problems
from aidetect.data.packformat import CLASSES, FORMAT, MANIFEST
from aidetect.data.transforms import augment, center_crop_tensor, normalize_batch
from aidetect.errors import UserError
from aidetect.preemption import ignore_stop_signals


@dataclass(frozen=True)
class Shard:
    path: str
    stored: int  # samples in the file, as the manifest records
    bytes: int  # size and sha256 as the manifest records them
    sha256: str
    keep: tuple[int, ...] | None = None  # the samples selected (indices in file order); None: all

    @property
    def count(self) -> int:
        """Samples this shard contributes."""
        return self.stored if self.keep is None else len(self.keep)


class Batch(NamedTuple):
    images: torch.Tensor  # N x 3 x H x W, float32, normalised, channels_last memory format
    labels: torch.Tensor  # N, float32, 1 = fake
    keys: list[str]
    sources: list[str]  # each sample's source (pack's first sub-folder under the class folder)


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


def holdout_keep(source: str, test: bool) -> Callable[[dict[str, Any]], bool]:
    """Leave-one-source-out selection (a ``keep`` predicate): training and validation keep every sample but
    fake source ``source``'s; the test keeps the real samples of the test split and every fake sample of
    ``source``, from all splits (none of it was trained on)."""
    if test:
        return lambda r: r["source"] == source if r["class"] == "fake" else r["split"] == "test"
    return lambda r: r["class"] != "fake" or r["source"] != source


def check_holdout(shard_dir: str | Path, source: str) -> None:
    """``UserError`` unless ``source`` is a fake source of the pack."""
    fakes = read_manifest(shard_dir).get("sources", {}).get("fake", {})  # packs made before sources: none
    if source not in fakes:
        listed = ", ".join(fakes) or "none recorded (pack again to record sources)"
        raise UserError(f"holdout source {source!r} is no fake source of {shard_dir}; its fake sources: {listed}")


def select_shards(
    shard_dir: str | Path, splits: list[str], keep: Callable[[dict[str, Any]], bool] | None = None
) -> list[Shard]:
    """The shards of ``splits`` (each checked by size against the manifest); with ``keep``, a predicate on
    a sample's ``.json`` record, only the samples it accepts (shards left empty are dropped)."""
    manifest = read_manifest(shard_dir)
    unknown = sorted(set(splits) - set(manifest["splits"]))
    if unknown:
        raise UserError(f"{shard_dir}: no split {', '.join(unknown)}; it has {', '.join(manifest['splits'])}")
    shards = []
    for entry in manifest["shards"]:
        path = Path(shard_dir) / entry["name"]
        if entry["split"] in splits and entry["count"] > 0:
            problem = file_problem(path, entry["bytes"])  # a stat: a truncated copy fails here, before any work
            if problem:
                raise problem.error()
            shards.append(Shard(str(path), entry["count"], entry["bytes"], entry["sha256"]))
    if keep is not None:
        shards = [replace(s, keep=tuple(i for i, r in enumerate(shard_records(s.path)) if keep(r))) for s in shards]
    return [s for s in shards if s.count]


def verify_shards(shard_dir: str | Path, workers: int = 4) -> list[ShardProblem]:
    """Every shard the manifest of ``shard_dir`` lists, checked against it: present, its size, its sha256.

    Returns the damaged shards, in manifest order (empty when the pack is intact); ``str()`` of each is a
    line naming the file and how to restore it. Reads every shard once, ``workers`` at a time. Raises
    ``UserError`` when the folder holds no readable manifest.
    """
    return manifest_problems(shard_dir, read_manifest(shard_dir)["shards"], workers)


# ----------------------------------------------------------------------------------------------------
# The per-epoch plan: pure functions of (shards, seed, epoch, rank, world, worker, workers)


def seeded(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def epoch_order(shards: list[Shard], seed: int, epoch: int, shuffle: bool) -> list[Shard]:
    order = list(shards)
    if shuffle:
        random.Random(seeded("shards", seed, epoch)).shuffle(order)
    return order


def sample_permutation(shard: Shard, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """Order in which a shard's samples enter the epoch's sequence (shards are read whole: any order is cheap)."""
    indices = list(range(shard.count))
    if shuffle:
        random.Random(seeded("samples", seed, epoch, Path(shard.path).name)).shuffle(indices)
    return indices


def rank_batches(total: int, rank: int, world: int, batch_size: int, train: bool, group: int = 1) -> list[range]:
    """The positions of each of a rank's batches in the epoch's sequence, in the order it yields them.
    Training yields a multiple of ``group`` batches (gradient accumulation steps: no partial step)."""
    if train:
        stride, first = world * batch_size, rank * batch_size
        count = total // (stride * group) * group
        return [range(t * stride + first, t * stride + first + batch_size) for t in range(count)]
    start, stop = total * rank // world, total * (rank + 1) // world
    return [range(lo, min(lo + batch_size, stop)) for lo in range(start, stop, batch_size)]


def worker_batches(batches: list[range], worker: int, workers: int) -> list[range]:
    """Round-robin, the order in which the DataLoader collects them: worker w makes batches w, w + workers, ..."""
    return batches[worker::workers]


# ----------------------------------------------------------------------------------------------------
# Dataset (runs in DataLoader workers) and loader (runs in the training process)


class ShardDataset(IterableDataset):
    """Yields (uint8 HWC image, label, key, source) for this rank and worker; batching is the DataLoader's."""

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
        accumulate: int = 1,
        degrade: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
    ) -> None:
        self.shards, self.batch_size, self.train, self.crop = shards, batch_size, train, crop
        self.degrade = degrade
        self.seed, self.rank, self.world, self.accumulate = seed, rank, world, accumulate
        self.total = sum(s.count for s in shards)
        # (epoch, first batch) in shared memory: persistent DataLoader workers hold copies of this object.
        self.position = torch.zeros(2, dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self.position[0])

    @property
    def start_batch(self) -> int:
        return int(self.position[1])

    def batches(self) -> list[range]:
        """This rank's batches still to come in the epoch (all of them unless resumed mid-epoch)."""
        batches = rank_batches(self.total, self.rank, self.world, self.batch_size, self.train, self.accumulate)
        return batches[self.start_batch :]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, str, str]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        epoch = self.epoch
        order = epoch_order(self.shards, self.seed, epoch, shuffle=self.train)
        starts = list(itertools.accumulate((s.count for s in order), initial=0))
        loaded: dict[int, list[dict[str, Any]]] = {}
        for batch in worker_batches(self.batches(), worker, workers):
            for position in batch:
                index = bisect.bisect_right(starts, position) - 1
                if index not in loaded:
                    loaded.clear()  # positions only grow: one shard in memory at a time
                    samples = shard_samples(order[index])
                    loaded[index] = [samples[i] for i in sample_permutation(order[index], self.seed, epoch, self.train)]
                sample = loaded[index][position - starts[index]]
                image = self.image(sample, epoch, order[index].path)
                yield image, int(sample["cls"]), sample["__key__"], sample_source(sample)

    def image(self, sample: dict[str, Any], epoch: int, path: str) -> torch.Tensor:
        stored = sample.get("jpg", sample.get("png"))
        pixels = decode_stored(stored) if stored else None
        if pixels is None:
            raise damaged(path, f"sample {sample['__key__']} holds no decodable image").error()
        if self.degrade is not None:  # on the stored image, before the crop; seeded per sample like augment
            pixels = self.degrade(pixels, np.random.default_rng(seeded("degrade", self.seed, epoch, sample["__key__"])))
        image = torch.from_numpy(np.ascontiguousarray(pixels))
        if self.train:
            generator = torch.Generator().manual_seed(seeded("augment", self.seed, epoch, sample["__key__"]))
            return augment(image, self.crop or image.shape[0], generator)
        return center_crop_tensor(image, self.crop) if self.crop else image


def sample_source(sample: dict[str, Any]) -> str:
    """The source pack recorded in the sample's ``.json`` (older packs: its class name)."""
    meta = json.loads(sample["json"]) if "json" in sample else {}
    return meta.get("source") or next(name for name, label in CLASSES.items() if label == int(sample["cls"]))


_verified: set[str] = set()  # shards whose sha256 this process has checked (persistent workers: once per run)


def read_shard(shard: Shard) -> bytes:
    """The bytes of ``shard``, checked against its manifest entry: the size at every read (free) and the
    sha256 the first time this process reads it, so each worker hashes a shard once per run, not per
    epoch. Raises ``UserError`` naming the shard when either differs."""
    with open(shard.path, "rb") as f:
        data = f.read()
    problem = bytes_problem(shard.path, data, shard.bytes, None if shard.path in _verified else shard.sha256)
    if problem:
        raise problem.error()
    _verified.add(shard.path)
    return data


def shard_samples(shard: Shard) -> list[dict[str, Any]]:
    """The selected samples of a checked shard, which holds as many as the manifest records."""
    samples = list(tar_samples(shard.path, read_shard(shard)))
    if len(samples) != shard.stored:
        raise damaged(shard.path, f"{len(samples)} samples where the manifest records {shard.stored}").error()
    return samples if shard.keep is None else [samples[i] for i in shard.keep]


def tar_samples(path: str, data: bytes | None = None) -> Iterator[dict[str, Any]]:
    """Samples of one of our shards (``data``: its bytes, when already read): members grouped by key,
    WebDataset's convention. Raises ``UserError`` naming the shard when it is not such an archive, whole.

    Our shards are plain USTAR archives that we wrote, so their 512-byte headers can be read at fixed
    offsets. Python's tarfile module spends ~0.2 ms per sample parsing the same headers, a third of
    a loader worker's time (measured); plain ``webdataset`` still reads these files as they are.
    """
    if data is None:
        with open(path, "rb") as f:
            data = f.read()
    view = memoryview(data)
    sample: dict[str, Any] = {}
    offset = 0
    while offset + 512 <= len(view) and any(view[offset : offset + 512]):
        key, extension, size = member_header(path, view[offset : offset + 512], offset)
        if offset + 512 + size > len(view):
            raise unreadable_tar(path, offset, f"member {key}.{extension} runs past the end of the file")
        if sample and key != sample["__key__"]:
            yield sample
            sample = {}
        sample["__key__"] = key
        sample[extension] = bytes(view[offset + 512 : offset + 512 + size])
        offset += 512 + -(-size // 512) * 512
    if offset + 512 > len(view):  # a whole archive ends with zero blocks: this one was cut short
        raise unreadable_tar(path, offset, "no end-of-archive marker")
    if sample:
        yield sample


def sample_records(shard_dir: str | Path) -> list[dict[str, Any]]:
    """Every sample's ``.json`` record (path, class, source, split, file facts) in the pack, in shard order."""
    entries = read_manifest(shard_dir)["shards"]
    return [r for entry in entries for r in shard_records(str(Path(shard_dir) / entry["name"]))]


def shard_records(path: str) -> list[dict[str, Any]]:
    """The ``.json`` records of one shard's samples, in file order, read without the image bytes: member
    headers are read and image members skipped by seeking, so a pack of any size is described in about
    a second."""
    records = []
    with open(path, "rb") as f:
        offset = 0
        while (header := f.read(512)) and any(header):
            _, extension, size = member_header(path, memoryview(header), offset)
            padded = -(-size // 512) * 512
            if extension == "json":
                records.append(json_member(path, f.read(size), offset))
                f.seek(padded - size, 1)
            else:
                f.seek(padded, 1)
            offset += 512 + padded
        if len(header) < 512:
            raise unreadable_tar(path, offset, "no end-of-archive marker")
    return records


def json_member(path: str, data: bytes, offset: int) -> dict[str, Any]:
    try:
        return json.loads(data)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError
        raise unreadable_tar(path, offset, "a sample record that is not JSON") from None


def member_header(path: str, header: memoryview, offset: int) -> tuple[str, str, int]:
    """Key, extension and size of the member whose header is ``header``; ``UserError`` when it is no
    header of a file member named KEY.EXTENSION, as our shards hold."""
    try:
        name = bytes(header[:100]).rstrip(b"\0").decode()
        size = int(bytes(header[124:136]).strip(b"\0 ") or b"0", 8)
    except ValueError:  # UnicodeDecodeError included: bytes that are no name or no octal number
        raise unreadable_tar(path, offset, "a corrupted member header") from None
    key, dot, extension = name.partition(".")
    if not (key and dot and extension):
        raise unreadable_tar(path, offset, f"member name {name!r} is no KEY.EXTENSION")
    if bytes(header[156:157]) not in (b"0", b"\0"):
        raise unreadable_tar(path, offset, f"member {name} is not a plain file")
    return key, extension, size


def unreadable_tar(path: str, offset: int, detail: str) -> UserError:
    return damaged(path, f"unreadable at byte {offset}: {detail}").error()


class ShardLoader:
    """Batches of normalised images for one rank; ``set_epoch`` before iterating, as with DistributedSampler."""

    def __init__(self, dataset: ShardDataset, *, num_workers: int, device: torch.device, noise_std: float) -> None:
        self.dataset, self.device, self.noise_std = dataset, device, noise_std
        # The workers are asked for explicitly; torch's "more workers than cores" hint is noise in job logs.
        warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
        self.loader = DataLoader(
            dataset,
            batch_size=dataset.batch_size,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
            prefetch_factor=4 if num_workers else None,
            persistent_workers=num_workers > 0,  # no fork and warm-up per epoch
            worker_init_fn=ignore_stop_signals,  # the training process decides when its workers end
        )

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Choose the epoch (its order and augmentation) and, to resume mid-epoch, the first batch."""
        self.dataset.position.copy_(torch.tensor([epoch, start_batch]))

    def __len__(self) -> int:
        return len(self.dataset.batches())

    def __iter__(self) -> Iterator[Batch]:
        """Normalised batches on the device: uint8 crosses to the GPU (4x less than float) and is
        normalised there, as timm's prefetcher does."""
        batches = iter(self.loader)
        if self.loader.num_workers:
            _worker_owners.add(batches)
        start = self.dataset.start_batch
        for step, (images, labels, keys, sources) in enumerate(one_line_errors(batches), start=start):
            images = images.to(self.device, non_blocking=True)
            noise = self.noise(step, images.shape) if self.dataset.train and self.noise_std > 0 else None
            yield Batch(normalize_batch(images, noise), labels.float().to(self.device), list(keys), list(sources))

    def noise(self, step: int, shape: torch.Size) -> torch.Tensor:
        """Noise for this rank's slice of global batch ``step``: the same however many ranks share it."""
        d = self.dataset
        generator = torch.Generator(self.device).manual_seed(seeded("noise", d.seed, d.epoch, step))
        batch, height, width, channels = shape
        noise = torch.randn((d.world * batch, channels, height, width), generator=generator, device=self.device)
        return noise[d.rank * batch : (d.rank + 1) * batch].mul_(self.noise_std)


# DataLoader iterators that own worker processes. The workers ignore stop signals, so any still alive when
# the interpreter exits (e.g. after an error in an epoch keeps an iterator referenced) would block
# multiprocessing's exit hook, which joins them after a SIGTERM, for ever: they are ended first.
_worker_owners: weakref.WeakSet[Any] = weakref.WeakSet()


@atexit.register  # registered after torch's exit hooks, so it runs before them, while shutdown still works
def end_workers() -> None:
    for iterator in list(_worker_owners):
        iterator._shutdown_workers()  # what the iterator's __del__ does


def one_line_errors(batches: Iterable[Any]) -> Iterator[Any]:
    """``batches``, with a ``UserError`` from a DataLoader worker process as the one line it was raised with.

    torch re-raises a worker's exception in this process as the same type, with the message "Caught
    UserError in DataLoader worker process N." and the worker's traceback text, whose last line is
    "aidetect.errors.UserError: <message>".
    """
    try:
        yield from batches
    except UserError as exc:
        lines = str(exc).rstrip().splitlines()
        if len(lines) < 2:  # raised in this process (no workers): already one line
            raise
        raise UserError(lines[-1].partition(": ")[2]) from None


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
    accumulate: int = 1,
    keep: Callable[[dict[str, Any]], bool] | None = None,
    degrade: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
) -> ShardLoader:
    """A loader over ``splits`` of a pack; rank and world default to torch.distributed's when initialised.

    ``keep``: a predicate on each sample's ``.json`` record selecting the samples used (e.g. all but one
    source). ``degrade(pixels, rng)``: applied in the workers to each decoded stored image before the crop,
    with a generator seeded by (seed, epoch, sample key), so its draws depend on nothing else
    (``aidetect.data.degrade``: training augmentation, evaluation perturbations)."""
    if rank is None or world is None:
        distributed = dist.is_available() and dist.is_initialized()
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    shards = select_shards(shard_dir, splits, keep)
    total = sum(s.count for s in shards)
    if train and total < world * batch_size * accumulate:
        raise UserError(
            f"{shard_dir}: splits {', '.join(splits)} hold {total} samples, fewer than one global batch "
            f"({world} ranks x batch {batch_size} x accumulate {accumulate}); lower the batch size"
        )
    dataset = ShardDataset(
        shards,
        batch_size=batch_size,
        train=train,
        crop=crop,
        seed=seed,
        rank=rank,
        world=world,
        accumulate=accumulate,
        degrade=degrade,
    )
    return ShardLoader(dataset, num_workers=num_workers, device=torch.device(device), noise_std=noise_std)
