"""``aidetect bench data``: pack and loader throughput against their decode floors and the original pipeline.

All figures come from one run on the same images with the same number of worker processes:

- ``pack_img_per_s``: ``aidetect pack`` end to end (scan, decode, preprocess, encode, write, manifest);
- ``pack_decode_floor_img_per_s``: only decoding the raw files (reduced JPEG decoding allowed);
- ``load_img_per_s``: the training loader, shards to batched uint8 tensors (normalisation to float runs
  on the GPU, as in timm's prefetcher; ``load_normalized_on_cpu_img_per_s`` includes it on this CPU);
- ``load_aug_img_per_s``: the training loader with blur and JPEG applied to every image (``BENCH_AUGMENTATION``:
  the worst case of the ``forensic_resnet50`` ranges; at probability p each, the cost is p times this one's),
  and ``aug_cost_ms_per_img``, the time it adds per image in one worker process;
- ``load_decode_floor_img_per_s``: only decoding the images stored in the shards (bytes already in memory);
- with a CUDA GPU (else null): ``load_gpu_decode_img_per_s``, the loader with ``decode_on_device`` (workers
  read, the GPU decodes each batch with nvJPEG and crops it), and ``gpu_decode_floor_img_per_s``, only
  the GPU's batched decoding of the stored images;
- ``naive_img_per_s``: the original project's pipeline, torchvision ImageFolder + PIL pad-to-square +
  Resize from the raw files with ``num_workers=0``.
"""

from __future__ import annotations

import itertools
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from aidetect.data.decode import MAX_PIXELS, bomb_guard, reduced_decode_scale
from aidetect.data.degrade import Augmentation
from aidetect.data.loader import ShardDataset, ShardLoader, read_side
from aidetect.data.manifest import read_manifest, select_shards
from aidetect.data.pack import PackSettings, pack, scan_source
from aidetect.data.packformat import MANIFEST
from aidetect.data.shardfile import sample_images
from aidetect.data.stored import decode_stored, decode_stored_batch
from aidetect.fileio import atomic_write_json
from aidetect.parallel import parallel_imap

# Read-only inputs for the forked floor workers (fork shares them; pickling bytes would dominate).
_FLOOR_INPUTS: list = []

# Every image blurred and re-compressed, at strengths drawn from the forensic_resnet50 config's ranges.
BENCH_AUGMENTATION = Augmentation(blur_prob=1.0, blur_sigma=(0.0, 3.0), jpeg_prob=1.0, jpeg_quality=(30, 100))


def bench_data(
    src: str | Path,
    shards: str | Path,
    json_path: str | Path | None = None,
    *,
    workers: int | None = None,
    batch_size: int = 64,
    naive_limit: int = 192,
    min_images: int = 4096,
    settings: PackSettings = PackSettings(),
) -> dict[str, Any]:
    workers = workers or os.cpu_count() or 1
    src, shards = Path(src), Path(shards)
    results: dict[str, Any] = {"workers": workers, "batch_size": batch_size, "machine": machine()}
    paths = [f.path for f in scan_source(src)[0]]
    warm_page_cache(paths)
    results |= time_pack(src, shards, settings, workers, len(paths))
    reduced_to = settings.size if settings.mode == "resize" else None  # pack decodes crops at full size
    results["pack_decode_floor_img_per_s"] = floor_rate(decode_raw, paths, workers, reduced_to)
    timed = partial(loader_rate, shards, batch_size, workers, min_images)
    results["load_img_per_s"] = timed()
    results["load_normalized_on_cpu_img_per_s"] = timed(normalized=True)
    results["load_aug_img_per_s"] = timed(degrade=BENCH_AUGMENTATION)
    # The loader is CPU-bound in its workers: each spends `workers` times the added wall time per image.
    added_s = 1 / results["load_aug_img_per_s"] - 1 / results["load_img_per_s"]
    results["aug_cost_ms_per_img"] = 1000 * workers * added_s
    stored = stored_images(shards)
    repeats = -(-min_images // len(stored))  # as many images as the loader measurement decodes
    results["load_decode_floor_img_per_s"] = floor_rate(decode_stored_floor, stored * repeats, workers)
    gpu = torch.cuda.is_available()
    results["load_gpu_decode_img_per_s"] = timed(device="cuda", decode_on_device=True) if gpu else None
    results["gpu_decode_floor_img_per_s"] = gpu_decode_rate(stored * repeats, batch_size) if gpu else None
    results["naive_img_per_s"] = naive_rate(src, shards, settings.size, naive_limit)
    results["pack_vs_floor"] = results["pack_img_per_s"] / results["pack_decode_floor_img_per_s"]
    results["load_vs_floor"] = results["load_img_per_s"] / results["load_decode_floor_img_per_s"]
    results["load_vs_naive"] = results["load_img_per_s"] / results["naive_img_per_s"]
    if json_path:
        atomic_write_json(json_path, results)
    return results


def machine() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def warm_page_cache(paths: list[str]) -> None:
    """Read every raw file once: pack, timed first, would otherwise pay the disk reads its floor is spared."""
    for path in paths:
        Path(path).read_bytes()


def time_pack(src: Path, shards: Path, settings: PackSettings, workers: int, files: int) -> dict[str, Any]:
    """Pack into ``shards`` when it holds no pack yet; otherwise into a scratch folder, removed after."""
    target = shards if not (shards / MANIFEST).exists() else Path(tempfile.mkdtemp(dir=shards.parent))
    if target != shards:
        target.rmdir()
    try:
        started = time.perf_counter()
        manifest = pack(src, target, settings, workers=workers, progress=False)
        seconds = time.perf_counter() - started
    finally:
        if target != shards:
            shutil.rmtree(target, ignore_errors=True)
    return {"pack_img_per_s": files / seconds, "pack_files": files, "packed_samples": manifest["samples"]}


def floor_rate(decode: Callable[[int], int], inputs: list, workers: int, *args: Any) -> float:
    global _FLOOR_INPUTS
    _FLOOR_INPUTS = inputs
    started = time.perf_counter()
    for _ in parallel_imap(partial(decode, *args) if args else decode, range(len(inputs)), workers, chunksize=16):
        pass
    return len(inputs) / (time.perf_counter() - started)


def decode_raw(size: int | None, index: int) -> int:
    """Open and decode one raw file, reduced where pack may reduce it (to no less than ``size``; None:
    only to stay within the pixel budget), and nothing else."""
    try:
        with bomb_guard(MAX_PIXELS), Image.open(_FLOOR_INPUTS[index]) as image:
            scale = reduced_decode_scale(image, size, MAX_PIXELS)
            if scale > 1:
                image.draft(image.mode, (image.size[0] // scale, image.size[1] // scale))
            image.load()
            return image.size[0]
    except Exception:  # the defects pack skips; decoding them is still part of the floor's work
        return 0


def decode_stored_floor(index: int) -> int:
    return decode_stored(_FLOOR_INPUTS[index]).shape[1]


def gpu_decode_rate(stored: list[bytes], batch_size: int) -> float:
    """Batched nvJPEG decoding of ``stored`` on the GPU (after one warm-up batch), and nothing else."""
    device, keys = torch.device("cuda"), ["bench"] * batch_size
    decode_stored_batch(stored[:batch_size], device, keys)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for start in range(0, len(stored), batch_size):
        decode_stored_batch(stored[start : start + batch_size], device, keys)
    torch.cuda.synchronize()
    return len(stored) / (time.perf_counter() - started)


def stored_images(shards: Path) -> list[bytes]:
    """Every image stored in the pack at ``shards``, in shard order."""
    manifest = read_manifest(shards)
    return [stored for s in manifest["shards"] for _, stored in sample_images(str(shards / s["name"]))]


def loader_rate(
    shards: Path,
    batch_size: int,
    workers: int,
    min_images: int,
    *,
    normalized: bool = False,
    degrade: Augmentation | None = None,
    device: str = "cpu",
    decode_on_device: bool = False,
) -> float:
    """Steady-state rate of the training loader over every split, with ``degrade`` applied to each image:
    shards to batched uint8 tensors ready to cross to the device or, ``normalized``, as a CPU training
    loop sees them (normalised on this CPU). A warm-up epoch first starts the persistent workers."""
    loader = repeated_loader(
        shards, batch_size, workers, min_images, device=device, degrade=degrade, decode_on_device=decode_on_device
    )
    with loader:
        epoch = loader.__iter__ if normalized else loader.uint8_batches
        loader.set_epoch(0)
        for _ in epoch():
            pass
        loader.set_epoch(1)
        started = time.perf_counter()
        images = sum(len(batch[0]) for batch in epoch())
        if device == "cuda":
            torch.cuda.synchronize()
        return images / (time.perf_counter() - started)


def repeated_loader(
    shards: str | Path,
    batch_size: int,
    workers: int,
    min_images: int,
    *,
    crop: int | None = None,
    device: str | torch.device = "cpu",
    degrade: Augmentation | None = None,
    decode_on_device: bool = False,
) -> ShardLoader:
    """The training loader (as ``build_loader`` makes it) over the shards of the pack at ``shards``, all
    splits, listed in turn (and again from the first) until one epoch holds at least ``min_images``
    images: a small pack then times as long as a large one, on the same images again."""
    listed, total = [], 0
    for shard in itertools.cycle(select_shards(shards, list(read_manifest(shards)["splits"]))):
        if total >= min_images:
            break
        listed.append(shard)
        total += shard.count
    dataset = ShardDataset(
        listed,
        batch_size=batch_size,
        train=True,
        side=read_side(shards, crop),
        seed=0,
        rank=0,
        world=1,
        workers=workers,
        degrade=degrade,
        decode_on_device=decode_on_device,
    )
    return ShardLoader(dataset, device=torch.device(device), noise_std=0.0)


def naive_rate(src: Path, shards: Path, size: int, limit: int) -> float:
    """The original pipeline: ImageFolder, pad to square with black, Resize, no worker processes."""
    manifest = read_manifest(shards)
    repaired = {r["path"] for r in manifest["repaired"]}  # the original pipeline crashed on these
    packed = {str(src / p) for s in manifest["shards"] for p in s["paths"] if p not in repaired}
    transform = transforms.Compose([pad_to_square, transforms.Resize((size, size)), transforms.ToTensor()])
    folder = datasets.ImageFolder(str(src), transform=transform, is_valid_file=lambda p: p in packed)
    subset = torch.utils.data.Subset(folder, range(0, len(folder), max(1, len(folder) // limit))[:limit])
    started, images = time.perf_counter(), 0
    for batch, _ in DataLoader(subset, batch_size=32, shuffle=False, num_workers=0):
        images += batch.shape[0]
    return images / (time.perf_counter() - started)


def pad_to_square(image: Image.Image) -> Image.Image:
    side = max(image.size)
    return ImageOps.pad(image.convert("RGB"), (side, side), color=(0, 0, 0))


def format_table(results: dict[str, Any]) -> str:
    rows = [
        ("pack", results["pack_img_per_s"], results["pack_decode_floor_img_per_s"], "pack_vs_floor", 0.7),
        ("load", results["load_img_per_s"], results["load_decode_floor_img_per_s"], "load_vs_floor", 0.9),
    ]
    lines = [f"{'stage':<8}{'img/s':>10}{'floor img/s':>14}{'ratio':>8}{'target':>8}"]
    for name, rate, floor, key, target in rows:
        lines.append(f"{name:<8}{rate:>10.1f}{floor:>14.1f}{results[key]:>8.2f}{'>= ' + str(target):>8}")
    lines.append(f"{'naive':<8}{results['naive_img_per_s']:>10.1f}")
    lines.append(f"load incl. normalisation on this CPU: {results['load_normalized_on_cpu_img_per_s']:.1f} img/s")
    lines.append(
        f"load with blur + JPEG on every image: {results['load_aug_img_per_s']:.1f} img/s"
        f" ({results['aug_cost_ms_per_img']:+.2f} ms per image per worker)"
    )
    if results["load_gpu_decode_img_per_s"] is None:
        lines.append("load with decoding on the GPU: no CUDA GPU here")
    else:
        lines.append(
            f"load with decoding on the GPU: {results['load_gpu_decode_img_per_s']:.1f} img/s"
            f" (nvJPEG alone: {results['gpu_decode_floor_img_per_s']:.1f} img/s)"
        )
    lines.append(f"load / naive = {results['load_vs_naive']:.1f}x (target >= 50x); workers = {results['workers']}")
    return "\n".join(lines)
