"""The training/evaluation loader over packed WebDataset shards.

Which batches a rank yields, in which order, and which DataLoader worker makes each: ``aidetect.data.plan``.
Augmentation is seeded per sample, so what a rank yields depends on nothing but (seed, epoch, rank,
world, batch size). Images are decoded one of two ways, each a small type: ``WorkerDecode`` (the
workers decode and crop each image straight into a reused shared-memory batch buffer,
``aidetect.data.batchslots``) or ``DeviceDecode`` (``data.decode gpu``: the workers only read, the
training process decodes each batch on its device). A worker reads a shard whole once per run, to
check and index it, and after that only the images of its own batches; workers and ranks on one node
share the page cache, so a node reads each shard from a parallel file system about once per epoch.

Shards are checked against the manifest, since copies between file systems get truncated or
corrupted: every selected shard's size when the loader is built, and a shard's sha256 the first time
a process reads it. A damaged shard or sample ends the run with one ``UserError`` line naming the
file and how to restore it, also when a DataLoader worker process found it.

The owner of a loader ends its worker processes once done with it, also on an error:
``with build_loader(...) as loader:`` (``ShardLoader.close``).
"""

from __future__ import annotations

import bisect
import itertools
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from aidetect.data.batchslots import AHEAD, BatchSlots
from aidetect.data.integrity import damaged
from aidetect.data.manifest import Keep, read_manifest, select_shards
from aidetect.data.plan import epoch_order, rank_batches, sample_permutation, seeded, worker_batches
from aidetect.data.shardfile import Shard, ShardIndexes, StoredSample, read_image
from aidetect.data.stored import decode_stored, decode_stored_batch
from aidetect.data.transforms import IMAGENET_MEAN, IMAGENET_STD, crop_flip_draws, crop_flip_into, tile_windows
from aidetect.errors import UserError
from aidetect.preemption import ignore_stop_signals

Degrade = Callable[[np.ndarray, np.random.Generator], np.ndarray]
Row = tuple[StoredSample, bytes, str]  # a sample, its stored image's bytes, the path of its shard


class Batch(NamedTuple):
    images: torch.Tensor  # N x 3 x H x W, float32, normalised, channels_last memory format
    labels: torch.Tensor  # N, float32, 1 = fake
    keys: list[str]
    sources: list[str]  # each sample's source (pack's first sub-folder under the class folder)


class Filled(NamedTuple):
    """What a worker sends per batch. Its images are where the loader's decoding put them: in the worker's
    ``made``-th batch buffer (``WorkerDecode``), or in ``stored``, undecoded (``DeviceDecode``)."""

    worker: int
    made: int
    labels: torch.Tensor
    keys: list[str]
    sources: list[str]
    stored: tuple[tuple[bytes, str], ...] = ()  # (stored image, its shard's path) per sample: DeviceDecode's


def filled_batch(worker: int, made: int, rows: list[Row], stored: tuple[tuple[bytes, str], ...] = ()) -> Filled:
    labels, keys, sources = zip(*((s.label, s.key, s.source) for s, _, _ in rows), strict=True)
    return Filled(worker, made, torch.tensor(labels), list(keys), list(sources), stored)


# ----------------------------------------------------------------------------------------------------
# The two ways to decode: each has a worker side (``made``) and a training-process side (``images``)


class WorkerDecode:
    """Decoding in the DataLoader workers (OpenCV), each batch written straight into a reused shared-memory
    batch buffer (``BatchSlots``). Both sides of the buffers' protocol are here: a worker claims a buffer
    for each batch it makes (``made``); the training process starts an iteration before the workers hear
    of it, releases each batch once done with it, and ends the iteration, also when broken off (``images``)."""

    def __init__(self, workers: int, batch_size: int, side: int) -> None:
        self.slots = BatchSlots(max(1, workers), batch_size, side)

    def made(self, dataset: ShardDataset, worker: int, rows: Iterator[list[Row]], epoch: int) -> Iterator[Filled]:
        """In worker ``worker``: each batch of ``rows`` decoded, degraded and cropped into its buffer."""
        iteration = int(self.slots.iteration)
        for made, batch in enumerate(rows):
            images = self.slots.claim(worker, made, iteration)
            for row, (sample, data, path) in enumerate(batch):
                dataset.write(images[row], sample.key, data, epoch, path)
            yield filled_batch(worker, made, batch)

    def images(
        self, dataset: ShardDataset, filled: Callable[[], Iterator[Filled]], device: torch.device
    ) -> Iterator[tuple[torch.Tensor, Filled]]:
        """In the training process: (uint8 N x H x W x 3 images, what the worker sent) per batch of the
        iteration ``filled()`` starts; the images are a view of the batch's buffer, valid until the next
        batch is requested."""
        iteration = self.slots.start()
        try:
            for batch in filled():
                yield self.slots.batch(batch.worker, batch.made, len(batch.keys)), batch
                self.slots.release(batch.worker)
        finally:  # broken off (an error, a break): no worker may wait for a release that will not come
            self.slots.end(iteration)


class DeviceDecode:
    """Decoding on the training process's device (``data.decode gpu``): the workers only read the stored
    JPEGs and send them; each batch is decoded in one call (nvJPEG on a GPU), then cropped and flipped as
    ``WorkerDecode`` would (the same windows, from the same per-sample hash). Nothing is degraded."""

    def made(self, dataset: ShardDataset, worker: int, rows: Iterator[list[Row]], epoch: int) -> Iterator[Filled]:
        for made, batch in enumerate(rows):
            yield filled_batch(worker, made, batch, tuple((data, path) for _, data, path in batch))

    def images(
        self, dataset: ShardDataset, filled: Callable[[], Iterator[Filled]], device: torch.device
    ) -> Iterator[tuple[torch.Tensor, Filled]]:
        for batch in filled():
            stored, paths = zip(*batch.stored, strict=True)
            images = decode_stored_batch(list(stored), device, batch.keys)
            windows = [
                dataset.window(key, path, dataset.epoch, *image.shape[1:])
                for image, key, path in zip(images, batch.keys, paths, strict=True)
            ]
            yield crop_flip_batch(images, windows, dataset.side), batch


# ----------------------------------------------------------------------------------------------------
# Dataset (runs in DataLoader workers) and loader (runs in the training process)


class ShardDataset(IterableDataset):
    """This rank's batches of ``side`` x ``side`` images, made by the DataLoader workers and decoded by
    ``decoding`` (``WorkerDecode``; ``DeviceDecode`` with ``decode_on_device``). ``workers``: the
    DataLoader's worker processes (0: batches are made in the training process)."""

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
        degrade: Degrade | None = None,
        decode_on_device: bool = False,
        tile: tuple[int, int] = (0, 1),
    ) -> None:
        self.shards, self.batch_size, self.train, self.side = shards, batch_size, train, side
        self.degrade, self.workers, self.tile = degrade, workers, tile
        self.seed, self.rank, self.world, self.accumulate = seed, rank, world, accumulate
        self.total = sum(s.count for s in shards)
        # (epoch, first batch) in shared memory: persistent DataLoader workers hold copies of this object.
        self.position = torch.zeros(2, dtype=torch.int64).share_memory_()
        self.indexes = ShardIndexes()  # each process's copy fills its own
        self.decoding = DeviceDecode() if decode_on_device else WorkerDecode(workers, batch_size, side)

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
        epoch = self.epoch
        batches = worker_batches(self.batches(), worker, workers)
        yield from self.decoding.made(self, worker, self.rows(batches, epoch), epoch)

    def rows(self, batches: list[range], epoch: int) -> Iterator[list[Row]]:
        """The rows of each of ``batches``, in order."""
        samples = self.samples(batches, epoch)
        for batch in batches:
            yield [next(samples) for _ in batch]

    def samples(self, batches: list[range], epoch: int) -> Iterator[Row]:
        """(sample, its stored image's bytes, its shard's path) at each position of ``batches``, in order."""
        order = epoch_order(self.shards, self.seed, epoch, shuffle=self.train)
        starts = list(itertools.accumulate((s.count for s in order), initial=0))
        index, samples, file = -1, [], None
        try:
            for position in itertools.chain.from_iterable(batches):
                if position >= starts[index + 1]:  # positions only grow: one shard at a time
                    index = bisect.bisect_right(starts, position) - 1
                    chosen = self.indexes.samples(order[index])
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
        the side (``window``)."""
        pixels = decode_stored(stored)
        if pixels is None:
            raise damaged(path, f"sample {key} holds no decodable image").error()
        window = self.window(key, path, epoch, *pixels.shape[:2])
        if self.degrade is not None:  # on the stored image, before the crop; its size stays
            pixels = self.degrade(pixels, np.random.default_rng(seeded("degrade", self.seed, epoch, key)))
        crop_flip_into(out, pixels, *window)

    def window(self, key: str, path: str, epoch: int, height: int, width: int) -> tuple[int, int, bool]:
        """(top, left, flip) of the side x side crop of sample ``key``, a height x width image: drawn from one
        hash of (seed, epoch, key) when training, else window ``tile`` = (K, N): the K-th of N tiled over the
        image (``tile_windows``; (0, 1), the default, is the centre crop), not flipped. ``DamagedShard``
        naming its shard ``path`` when the image is smaller than the side (pack stores none such)."""
        if min(height, width) < self.side:
            raise damaged(path, f"sample {key} is {width}x{height} px, under the {self.side} px it is read at").error()
        if self.train:
            return crop_flip_draws(height, width, self.side, seeded("augment", self.seed, epoch, key))
        top, left = tile_windows(height, width, self.side, self.tile[1])[self.tile[0]]
        return top, left, False


def as_made(filled: Filled) -> Filled:
    """The DataLoader's collate function: a ``Filled`` needs no conversion (default_convert walks every key)."""
    return filled


class ShardLoader:
    """Batches of normalised images for one rank; ``set_epoch`` before iterating, as with DistributedSampler.
    Its owner ends its worker processes once done with it: ``with loader:`` or ``close``."""

    def __init__(
        self,
        dataset: ShardDataset,
        *,
        device: torch.device,
        noise_std: float,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.dataset, self.device, self.noise_std = dataset, device, noise_std
        self.mean, self.std = mean, std  # the model's normalisation (normalize_batch)
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
        self.running: Any = None  # the DataLoader's iterator once it has started worker processes

    def __enter__(self) -> ShardLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End the worker processes and wait for them; the loader is not iterated after. The workers ignore
        stop signals, so one still alive when the interpreter exits would block multiprocessing's exit
        hook, which joins them after a SIGTERM, for ever; and after an error the traceback keeps the
        loader referenced, so garbage collection does not end them first. torch has no public call for
        it: this does what the DataLoader iterator's ``__del__`` does (ask, wait, then SIGTERM), then kills
        a worker still busy. Idempotent; nothing to do without worker processes."""
        running, self.running = self.running, None
        if running is None:
            return
        running._shutdown_workers()
        for worker in running._workers:
            if worker.is_alive():
                worker.kill()

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
            yield Batch(
                normalize_batch(images, noise, self.mean, self.std), labels.float().to(self.device), keys, sources
            )

    def uint8_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str], list[str]]]:
        """(uint8 N x H x W x 3 images, labels, keys, sources) per batch, the images on the CPU (on the
        device when decoded there). The images may be a view of a reused buffer, valid until the next
        batch is requested."""
        for images, filled in self.dataset.decoding.images(self.dataset, self.filled, self.device):
            yield images, filled.labels, filled.keys, filled.sources

    def filled(self) -> Iterator[Filled]:
        """A new iteration of the DataLoader: what the workers send, their errors as one line each."""
        iterator = iter(self.loader)
        if self.loader.num_workers:
            self.running = iterator  # the same one every epoch: the workers persist
        return one_line_errors(iterator)

    def noise(self, step: int, shape: torch.Size) -> torch.Tensor:
        """Noise for this rank's slice of global batch ``step``: the same however many ranks share it."""
        d = self.dataset
        generator = torch.Generator(self.device).manual_seed(seeded("noise", d.seed, d.epoch, step))
        batch, height, width, channels = shape
        noise = torch.randn((d.world * batch, channels, height, width), generator=generator, device=self.device)
        return noise[d.rank * batch : (d.rank + 1) * batch].mul_(self.noise_std)


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


# ----------------------------------------------------------------------------------------------------
# Batches on the device


def crop_flip_batch(images: list[torch.Tensor], windows: list[tuple[int, int, bool]], side: int) -> torch.Tensor:
    """N x side x side x 3 uint8 batch on the images' device from 3 x H x W images, each cut at its
    (top, left, flip) window: what ``crop_flip_into`` writes, for images decoded on a device."""
    batch = torch.empty((len(images), side, side, 3), dtype=torch.uint8, device=images[0].device)
    for row, (image, (top, left, flip)) in enumerate(zip(images, windows, strict=True)):
        window = image[:, top : top + side, left : left + side]
        batch[row] = (window.flip(2) if flip else window).permute(1, 2, 0)
    return batch


def normalize_batch(
    images: torch.Tensor,
    noise: torch.Tensor | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """uint8 NHWC batch to a normalised float32 NCHW view (channels_last), on the batch's device:
    ``(x / 255 - mean) / std`` per channel, with the model's ``mean`` and ``std`` (ImageNet's by default).

    ``noise`` (NCHW, on the [0, 1] scale) is added before normalising, as the original project did;
    callers pass it for training batches only (the original also noised test images, which biased
    its numbers).
    """
    x = images.permute(0, 3, 1, 2).float().div_(255)
    if noise is not None:
        x.add_(noise)
    return x.sub_(torch.tensor(mean, device=x.device).view(1, 3, 1, 1)).div_(
        torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    )


# ----------------------------------------------------------------------------------------------------
# Building a loader


def read_side(shard_dir: str | Path, crop: int | None) -> int:
    """The side of the square images a loader yields: ``crop``, or the pack's stored size without one. A pack
    of native-resolution images has none: it needs a ``crop`` no longer than the shortest side it stores
    (its ``min_side``), else ``UserError``."""
    settings = read_manifest(shard_dir)["settings"]
    if settings["mode"] == "native":
        return native_side(shard_dir, crop, settings["min_side"])
    size = settings["size"]
    if crop is not None and not 0 < crop <= size:
        raise UserError(f"crop {crop} px does not fit the {size} px images of {shard_dir}; set data.crop <= {size}")
    return crop or size


def native_side(shard_dir: str | Path, crop: int | None, min_side: int) -> int:
    """``crop``, the side a native pack's images are read at; ``UserError`` when it is unset or longer than
    ``min_side``, the shortest side the pack stores."""
    if crop is None:
        raise UserError(f"{shard_dir} holds images of native sizes: set data.crop, the side they are read at")
    if not 0 < crop <= min_side:
        raise UserError(
            f"crop {crop} px: {shard_dir} holds images as small as {min_side} px (its --min-side); set data.crop "
            f"<= {min_side} or pack with --min-side {crop}"
        )
    return crop


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
    keep: Keep | None = None,
    degrade: Degrade | None = None,
    decode_on_device: bool = False,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    tile: tuple[int, int] = (0, 1),
) -> ShardLoader:
    """A loader over ``splits`` of a pack; rank and world default to torch.distributed's when initialised.

    ``keep``: a predicate on each sample's ``.json`` record selecting the samples used (e.g. all but one
    source). ``degrade(pixels, rng)``: applied in the workers to each decoded stored image before the crop,
    with a generator seeded by (seed, epoch, sample key), so its draws depend on nothing else
    (``aidetect.data.degrade``: training augmentation, evaluation perturbations). ``decode_on_device``:
    the stored JPEGs are decoded in batches on ``device`` (nvJPEG on a GPU) instead of in the workers,
    with the same crops and flips; no ``degrade`` then. ``mean``, ``std``: the model's normalisation
    (``normalize_batch``). ``tile``: an evaluation loader's window, (K, N) the K-th of N crops tiled
    over each image (``ShardDataset.window``). The caller ends the loader's workers when done
    with it (``with build_loader(...) as loader:``)."""
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
        tile=tile,
    )
    return ShardLoader(dataset, device=torch.device(device), noise_std=noise_std, mean=mean, std=std)


def check_device_decode(shard_dir: str | Path, degrade: Callable[..., Any] | None) -> None:
    """``UserError`` unless batches of ``shard_dir`` can be decoded on the device: JPEGs, nothing to degrade."""
    codec = read_manifest(shard_dir)["settings"]["codec"]
    if codec != "jpeg":
        raise UserError(f"{shard_dir} stores {codec} images; data.decode gpu decodes JPEG packs only: use cpu")
    if degrade is not None:
        raise UserError("data.decode gpu applies no blur, JPEG or other degradation: set data.decode cpu for them")
