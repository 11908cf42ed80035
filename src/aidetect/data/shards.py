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
(seed, epoch, rank, world, batch size), not on the number of workers. A worker writes each batch
straight into a reused shared-memory buffer (``aidetect.data.batchslots``). It reads a shard whole
once per run, to check and index it, and after that only the images of its own batches; workers and
ranks on one node share the page cache, so a node reads each shard from a parallel file system about
once per epoch.

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
import os
import random
import re
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from aidetect.data.batchslots import AHEAD, BatchSlots
from aidetect.data.decode import decode_stored, decode_stored_batch
from aidetect.data.integrity import (
    DamagedShard,
    ShardProblem,
    bytes_problem,
    damaged,
    file_problem,
    manifest_problems,
)
from aidetect.data.packformat import CLASSES, FORMAT, MANIFEST
from aidetect.data.transforms import crop_flip_batch, crop_flip_draws, crop_flip_into, normalize_batch
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
    """Every shard the manifest of ``shard_dir`` lists, checked against it: present, its size, its sha256;
    and, when they match, readable as a shard of ours: every member header intact, every record JSON.

    Returns the damaged shards, in manifest order (empty when the pack is intact); ``str()`` of each is a
    line naming the file and how to restore it. Reads every shard once, ``workers`` at a time. Raises
    ``UserError`` when the folder holds no readable manifest.
    """
    return manifest_problems(shard_dir, read_manifest(shard_dir)["shards"], workers, readable=tar_problem)


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


class Filled(NamedTuple):
    """What a worker sends per batch: the images are in its ``made``-th batch buffer (``BatchSlots``)."""

    worker: int
    made: int
    count: int
    labels: torch.Tensor
    keys: list[str]
    sources: list[str]
    stored: list[bytes] | None  # the stored JPEGs, when the training process decodes them on its device


class ShardDataset(IterableDataset):
    """This rank's batches of ``side`` x ``side`` images: each is written into ``slots`` by the DataLoader
    worker that makes it, which yields a ``Filled`` for it. ``workers``: the DataLoader's worker
    processes (0: batches are made in the training process). ``decode_on_device``: the workers send
    the stored images undecoded instead, for the training process to decode (``ShardLoader``)."""

    def __init__(
        self,
        shards: list[Shard],
        *,
        batch_size: int,
        train: bool,
        side: int,
        seed: int,
        rank: int,
        world: int,
        workers: int = 0,
        accumulate: int = 1,
        degrade: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
        decode_on_device: bool = False,
    ) -> None:
        self.shards, self.batch_size, self.train, self.side = shards, batch_size, train, side
        self.degrade, self.workers, self.decode_on_device = degrade, workers, decode_on_device
        self.seed, self.rank, self.world, self.accumulate = seed, rank, world, accumulate
        self.total = sum(s.count for s in shards)
        # (epoch, first batch) in shared memory: persistent DataLoader workers hold copies of this object.
        self.position = torch.zeros(2, dtype=torch.int64).share_memory_()
        self.slots = BatchSlots(max(1, workers), 0 if decode_on_device else batch_size, side)

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

    def __iter__(self) -> Iterator[Filled]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        epoch, iteration = self.epoch, int(self.slots.iteration)
        batches = worker_batches(self.batches(), worker, workers)
        samples = self.samples(batches, epoch)
        for made, batch in enumerate(batches):
            rows = [next(samples) for _ in batch]
            stored = [data for _, data, _ in rows] if self.decode_on_device else None
            if stored is None:
                images = self.slots.claim(worker, made, iteration)
                for row, (sample, data, path) in enumerate(rows):
                    self.write(images[row], sample.key, data, epoch, path)
            labels, keys, sources = zip(*((s.label, s.key, s.source) for s, _, _ in rows), strict=True)
            yield Filled(worker, made, len(batch), torch.tensor(labels), list(keys), list(sources), stored)

    def samples(self, batches: list[range], epoch: int) -> Iterator[tuple[StoredSample, bytes, str]]:
        """(sample, its stored image's bytes, its shard's path) at each position of ``batches``, in order."""
        order = epoch_order(self.shards, self.seed, epoch, shuffle=self.train)
        starts = list(itertools.accumulate((s.count for s in order), initial=0))
        index, samples, file = -1, [], None
        try:
            for position in itertools.chain.from_iterable(batches):
                if position >= starts[index + 1]:  # positions only grow: one shard at a time
                    index = bisect.bisect_right(starts, position) - 1
                    chosen = shard_index(order[index])
                    samples = [chosen[i] for i in sample_permutation(order[index], self.seed, epoch, self.train)]
                    if file is not None:
                        file.close()
                    file = open(order[index].path, "rb")  # noqa: SIM115 (kept open across yields)
                sample = samples[position - starts[index]]
                yield sample, read_image(file, sample), order[index].path
        finally:
            if file is not None:
                file.close()

    def write(self, out: np.ndarray, key: str, stored: bytes, epoch: int, path: str) -> None:
        """Decode sample ``key``'s ``stored`` image into ``out``: degraded (seeded per sample), then cropped to
        the side (random crop and flip, drawn from one hash of (seed, epoch, key), when training; else
        centred)."""
        pixels = decode_stored(stored)
        if pixels is None:
            raise damaged(path, f"sample {key} holds no decodable image").error()
        height, width = pixels.shape[:2]
        if min(height, width) < self.side:
            raise damaged(path, f"sample {key} is {width}x{height} px, under the {self.side} px it is read at").error()
        if self.degrade is not None:  # on the stored image, before the crop
            pixels = self.degrade(pixels, np.random.default_rng(seeded("degrade", self.seed, epoch, key)))
        crop_flip_into(out, pixels, *self.window(key, epoch, height, width))

    def window(self, key: str, epoch: int, height: int, width: int) -> tuple[int, int, bool]:
        """(top, left, flip) of sample ``key``'s side x side crop: drawn from one hash of (seed, epoch, key)
        when training, else centred and not flipped."""
        if self.train:
            return crop_flip_draws(height, width, self.side, seeded("augment", self.seed, epoch, key))
        return (height - self.side) // 2, (width - self.side) // 2, False


class StoredSample(NamedTuple):
    """A sample as a loader worker needs it: its label and source, and where its stored image lies."""

    key: str
    label: int
    source: str
    offset: int  # of the image's bytes in the shard file
    size: int


# Each shard's samples, per process: a worker reads, hashes and parses a shard the first time it needs it
# (persistent workers: once per run), and after that reads only the images of its own batches.
# Keyed by (path, sha256): a pack written anew at the same path is read anew.
_indexes: dict[tuple[str, str], list[StoredSample]] = {}


def shard_index(shard: Shard) -> list[StoredSample]:
    """The selected samples of ``shard``, checked against its manifest entry: its size at every call (a
    stat) and, the first time this process asks, its sha256 and sample count. ``UserError`` naming the
    shard when any differs or it is no shard of ours."""
    index = _indexes.get((shard.path, shard.sha256))
    if index is None:
        with open(shard.path, "rb") as f:
            data = f.read()
        problem = bytes_problem(shard.path, data, shard.bytes, shard.sha256)
        if problem:
            raise problem.error()
        index = index_samples(shard.path, data)
        if len(index) != shard.stored:
            raise damaged(shard.path, f"{len(index)} samples where the manifest records {shard.stored}").error()
        _indexes[shard.path, shard.sha256] = index
    elif problem := file_problem(Path(shard.path), shard.bytes):
        raise problem.error()
    return index if shard.keep is None else [index[i] for i in shard.keep]


def index_samples(path: str, data: bytes) -> list[StoredSample]:
    """Every sample of a shard's bytes ``data``, in file order."""
    view = memoryview(data)
    members: dict[str, dict[str, tuple[int, int]]] = {}
    for key, extension, offset, size in tar_members(path, view):
        members.setdefault(key, {})[extension] = (offset, size)
    return [stored_sample(path, view, key, found) for key, found in members.items()]


def stored_sample(path: str, view: memoryview, key: str, found: dict[str, tuple[int, int]]) -> StoredSample:
    image, label, record = found.get("jpg", found.get("png")), found.get("cls"), found.get("json")
    if image is None or label is None:
        raise damaged(path, f"sample {key} holds no {'image' if image is None else 'class label'}").error()
    try:
        cls = int(bytes(view[label[0] : label[0] + label[1]]))
        meta = json.loads(bytes(view[record[0] : record[0] + record[1]])) if record else {}
    except ValueError:  # UnicodeDecodeError and JSONDecodeError included
        cls, meta = None, None
    if cls not in CLASSES.values() or not isinstance(meta, dict):  # a label of 7 would train, silently wrong
        raise damaged(path, f"sample {key} holds an unreadable class label or record").error()
    # Packs made before sources were recorded: the class name.
    source = meta.get("source") or next(name for name, value in CLASSES.items() if value == cls)
    return StoredSample(key, cls, source, *image)


BLOCK = 512  # tar's block: every header is one, every member's bytes are padded to a multiple
ZERO_BLOCK = bytes(BLOCK)
CHECKSUM_AS_BLANKS = 8 * ord(" ")  # a header's checksum field counts as eight spaces in its own sum
OCTAL_FIELD = re.compile(rb" *([0-7]+)[ \0]*")  # a number as tar writes it: octal digits, then NULs or spaces


def tar_members(path: str, view: memoryview) -> Iterator[tuple[str, str, int, int]]:
    """(key, extension, offset of its bytes, size) of each member of one of our shards, whose bytes are
    ``view`` (see ``walk_members``).

    Our shards are plain USTAR archives that we wrote, so their 512-byte headers can be read at fixed
    offsets. Python's tarfile module spends ~0.2 ms per sample parsing the same headers, a third of
    a loader worker's time; this walk ~16 us, half of it checking each header's checksum (measured);
    plain ``webdataset`` still reads these files as they are.
    """
    return walk_members(path, len(view), lambda offset: bytes(view[offset : offset + BLOCK]))


def walk_members(path: str, length: int, block: Callable[[int], bytes]) -> Iterator[tuple[str, str, int, int]]:
    """(key, extension, offset of its bytes, size) of each member of shard ``path``, ``length`` bytes long,
    whose 512-byte block at an offset is ``block(offset)``. Raises ``DamagedShard`` (a ``UserError``)
    naming the shard when it is not such an archive, whole: a header that is not intact or not ours
    (``member_header``), a member running past the end, no end-of-archive marker. Every member moves
    the offset forward, so the walk always ends."""
    offset = 0
    while offset + BLOCK <= length and (header := block(offset)) != ZERO_BLOCK:
        key, extension, size = member_header(path, header, offset)
        start = offset + BLOCK
        if start + size > length:
            detail = f"member {key}.{extension} runs past the end of the file ({size} bytes, {length - start} left)"
            raise unreadable_tar(path, offset, detail)
        yield key, extension, start, size
        offset = start + -(-size // BLOCK) * BLOCK
    if offset + BLOCK > length:  # a whole archive ends with zero blocks: this one was cut short
        raise unreadable_tar(path, offset, "no end-of-archive marker")


def tar_samples(path: str, data: bytes | None = None) -> Iterator[dict[str, Any]]:
    """Samples of one of our shards (``data``: its bytes, when already read): members grouped by key,
    WebDataset's convention, as {"__key__": key, extension: bytes, ...}."""
    if data is None:
        with open(path, "rb") as f:
            data = f.read()
    view = memoryview(data)
    sample: dict[str, Any] = {}
    for key, extension, offset, size in tar_members(path, view):
        if sample and key != sample["__key__"]:
            yield sample
            sample = {}
        sample["__key__"] = key
        sample[extension] = bytes(view[offset : offset + size])
    if sample:
        yield sample


def sample_records(shard_dir: str | Path) -> list[dict[str, Any]]:
    """Every sample's ``.json`` record (path, class, source, split, file facts) in the pack, in shard order."""
    entries = read_manifest(shard_dir)["shards"]
    return [r for entry in entries for r in shard_records(str(Path(shard_dir) / entry["name"]))]


def shard_records(path: str) -> list[dict[str, Any]]:
    """The ``.json`` records of one shard's samples, in file order, read without the image bytes: only
    member headers and records are read, so a pack of any size is described in about a second.
    ``DamagedShard`` naming the shard when it is not one of ours, whole (``walk_members``)."""
    with open(path, "rb") as f:
        fd = f.fileno()
        members = walk_members(path, os.fstat(fd).st_size, lambda offset: os.pread(fd, BLOCK, offset))
        return [
            json_member(path, os.pread(fd, size, start), start - BLOCK)
            for _, ext, start, size in members
            if ext == "json"
        ]


def tar_problem(path: Path) -> ShardProblem | None:
    """What makes file ``path`` no shard of ours, whole (``shard_records``); None when it is one."""
    try:
        shard_records(str(path))
    except DamagedShard as exc:
        return exc.problem
    return None


def json_member(path: str, data: bytes, offset: int) -> dict[str, Any]:
    """The sample record ``data`` of the member whose header is at ``offset``: a JSON object."""
    try:
        record = json.loads(data)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError
        record = None
    if not isinstance(record, dict):
        raise unreadable_tar(path, offset, "a sample record that is no JSON object")
    return record


def member_header(path: str, header: bytes, offset: int) -> tuple[str, str, int]:
    """Key, extension and size of the member whose 512-byte header ``header`` is at ``offset`` of shard
    ``path``; ``DamagedShard`` unless it is an intact USTAR header (its checksum matches, as tarfile
    checks) of a plain file named KEY.EXTENSION with a size in octal digits, as our shards hold: no sign,
    no base-256 encoding, so the size is never negative."""
    if octal(header[148:156]) != sum(header) - sum(header[148:156]) + CHECKSUM_AS_BLANKS:
        raise unreadable_tar(path, offset, "a corrupted member header (its checksum does not match)")
    name = header[:100].split(b"\0", 1)[0]
    key, dot, extension = name.partition(b".")
    if not (key and dot and extension and name.isascii()):
        raise unreadable_tar(path, offset, f"member name {name!r} is no KEY.EXTENSION")
    if header[156:157] not in (b"0", b"\0"):
        raise unreadable_tar(path, offset, f"member {name.decode()} is not a plain file")
    size = octal(header[124:136])
    if size is None:
        raise unreadable_tar(
            path, offset, f"member {name.decode()}'s size field {header[124:136]!r} is no octal number"
        )
    return key.decode(), extension.decode(), size


def octal(field: bytes) -> int | None:
    """The number in a tar header field written as our shards' are (octal digits, NUL- or space-ended);
    None for anything else: a sign, GNU's base-256 encoding, other characters."""
    match = OCTAL_FIELD.fullmatch(field)
    return int(match[1], 8) if match else None


def unreadable_tar(path: str, offset: int, detail: str) -> DamagedShard:
    return damaged(path, f"unreadable at byte {offset}: {detail}").error()


def as_made(filled: Filled) -> Filled:
    """The DataLoader's collate function: a ``Filled`` needs no conversion (default_convert walks every key)."""
    return filled


def read_image(file: BinaryIO, sample: StoredSample) -> bytes:
    """The stored image's bytes of ``sample``, read alone from its open shard ``file``."""
    data = os.pread(file.fileno(), sample.size, sample.offset)
    if len(data) != sample.size:
        raise damaged(file.name, f"it ends inside sample {sample.key}").error()
    return data


class ShardLoader:
    """Batches of normalised images for one rank; ``set_epoch`` before iterating, as with DistributedSampler."""

    def __init__(self, dataset: ShardDataset, *, device: torch.device, noise_std: float) -> None:
        self.dataset, self.device, self.noise_std = dataset, device, noise_std
        # The workers are asked for explicitly; torch's "more workers than cores" hint is noise in job logs.
        warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
        self.loader = DataLoader(
            dataset,
            batch_size=None,  # the dataset makes whole batches, in its reused buffers
            collate_fn=as_made,
            num_workers=dataset.workers,
            prefetch_factor=AHEAD if dataset.workers else None,
            persistent_workers=dataset.workers > 0,  # no fork and warm-up per epoch
            worker_init_fn=ignore_stop_signals,  # the training process decides when its workers end
        )

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Choose the epoch (its order and augmentation) and, to resume mid-epoch, the first batch."""
        self.dataset.position.copy_(torch.tensor([epoch, start_batch]))

    def __len__(self) -> int:
        return len(self.dataset.batches())

    def batches_on_every_rank(self) -> int:
        """The number of this epoch's batches that every rank yields (evaluation shares differ by one)."""
        d = self.dataset
        counts = (len(rank_batches(d.total, r, d.world, d.batch_size, d.train, d.accumulate)) for r in range(d.world))
        return min(counts) - d.start_batch

    def __iter__(self) -> Iterator[Batch]:
        """Normalised batches on the device: uint8 crosses to the GPU (4x less than float) and is
        normalised there, as timm's prefetcher does."""
        start = self.dataset.start_batch
        for step, (images, labels, keys, sources) in enumerate(self.uint8_batches(), start=start):
            # From the (pageable) batch buffer, the copy has read it when .to() returns: it may be reused.
            images = images.to(self.device, non_blocking=True)
            noise = self.noise(step, images.shape) if self.dataset.train and self.noise_std > 0 else None
            yield Batch(normalize_batch(images, noise), labels.float().to(self.device), keys, sources)

    def uint8_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str], list[str]]]:
        """(uint8 N x H x W x 3 images, labels, keys, sources) per batch, on the CPU. The images are a view
        of a reused buffer, valid until the next batch is requested."""
        slots = self.dataset.slots
        iteration = slots.start()
        batches = iter(self.loader)
        if self.loader.num_workers:
            _worker_owners.add(batches)
        try:
            for filled in one_line_errors(batches):
                if filled.stored is None:
                    images = slots.batch(filled.worker, filled.made, filled.count)
                else:
                    images = self.decoded(filled)
                yield images, filled.labels, filled.keys, filled.sources
                slots.release(filled.worker)
        finally:  # broken off (an error, a break): no worker may wait for a release that will not come
            slots.end(iteration)

    def decoded(self, filled: Filled) -> torch.Tensor:
        """A batch the workers sent undecoded, decoded on this loader's device, then cropped and flipped as
        the workers would have (the same windows, from the same per-sample hash)."""
        d = self.dataset
        images = decode_stored_batch(filled.stored, self.device, filled.keys)
        windows = []
        for image, key in zip(images, filled.keys, strict=True):
            height, width = image.shape[1:]
            if min(height, width) < d.side:
                raise UserError(f"sample {key} is {width}x{height} px, under the {d.side} px it is read at; repack")
            windows.append(d.window(key, d.epoch, height, width))
        return crop_flip_batch(images, windows, d.side)

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
        iterator._shutdown_workers()  # what the iterator's __del__ does: it asks, waits, then sends SIGTERM
        for worker in iterator._workers:
            if worker.is_alive():  # still busy after torch's wait, and stop signals are ignored: kill it
                worker.kill()


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


def read_side(shard_dir: str | Path, crop: int | None) -> int:
    """The side of the square images a loader yields: ``crop``, or the pack's stored size without one."""
    size = read_manifest(shard_dir)["settings"]["size"]
    if crop is not None and not 0 < crop <= size:
        raise UserError(f"crop {crop} px does not fit the {size} px images of {shard_dir}; set data.crop <= {size}")
    return crop or size


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
    decode_on_device: bool = False,
) -> ShardLoader:
    """A loader over ``splits`` of a pack; rank and world default to torch.distributed's when initialised.

    ``keep``: a predicate on each sample's ``.json`` record selecting the samples used (e.g. all but one
    source). ``degrade(pixels, rng)``: applied in the workers to each decoded stored image before the crop,
    with a generator seeded by (seed, epoch, sample key), so its draws depend on nothing else
    (``aidetect.data.degrade``: training augmentation, evaluation perturbations). ``decode_on_device``:
    the stored JPEGs are decoded in batches on ``device`` (nvJPEG on a GPU) instead of in the workers,
    with the same crops and flips; no ``degrade`` then."""
    if decode_on_device:
        check_device_decode(shard_dir, degrade)
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
        side=read_side(shard_dir, crop),
        seed=seed,
        rank=rank,
        world=world,
        workers=num_workers,
        accumulate=accumulate,
        degrade=degrade,
        decode_on_device=decode_on_device,
    )
    return ShardLoader(dataset, device=torch.device(device), noise_std=noise_std)


def check_device_decode(shard_dir: str | Path, degrade: Callable[..., Any] | None) -> None:
    """``UserError`` unless batches of ``shard_dir`` can be decoded on the device: JPEGs, nothing to degrade."""
    codec = read_manifest(shard_dir)["settings"]["codec"]
    if codec != "jpeg":
        raise UserError(f"{shard_dir} stores {codec} images; data.decode gpu decodes JPEG packs only: use cpu")
    if degrade is not None:
        raise UserError("data.decode gpu applies no blur, JPEG or other degradation: set data.decode cpu for them")
