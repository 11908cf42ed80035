"""``aidetect bench train``: the training loop's throughput against a bare PyTorch loop, and per setting.

Both loops run the same model on the same in-memory batches at the same precision, so the ratio
``loop_overhead_ratio`` (ours / bare, target >= 0.95) isolates what aidetect's loop adds: progress,
signal checks, accumulation bookkeeping, the scheduler. Then every (precision, channels_last,
compile) setting asked for is timed with aidetect's loop. With a pack (``data``), the loop at the
reference setting is also timed fed by the training loader, real batches decoded by its workers:
``loader_fed.vs_in_memory`` below 1 is what the loader costs the GPU. Each setting's timed steps also
report minor page faults and system CPU seconds per step (``settings_kernel``): an allocator that returns
memory to the kernel every step (and faults it in again) shows there, not only as a lower rate. For a
backbone + linear head model (``timm:ARCH``), ``probe`` holds the images per second of feature extraction
(``aidetect features``) and of a linear probe's steps on cached features (``train --features``).
"""

from __future__ import annotations

import itertools
import resource
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from aidetect.bench.data import machine, repeated_loader
from aidetect.data.loader import Batch, ShardLoader
from aidetect.engine import EpochResult, Progress, TrainingParts, autocast, train_one_epoch
from aidetect.fileio import atomic_write_json
from aidetect.hardware import resolve_precision
from aidetect.models import build_model
from aidetect.probe import Probe


class InMemoryBatches:
    """The same pre-made batches, over and over: a loader with no data cost."""

    def __init__(self, batches: list[Batch], steps: int) -> None:
        self.batches, self.steps = batches, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Batch]:
        return itertools.islice(itertools.cycle(self.batches), self.steps)


def make_batches(batch_size: int, image_size: int, device: torch.device, count: int = 4) -> list[Batch]:
    generator = torch.Generator().manual_seed(0)
    return [
        Batch(
            torch.randn(batch_size, 3, image_size, image_size, generator=generator).to(device),
            torch.randint(0, 2, (batch_size,), generator=generator).float().to(device),
            [str(i) for i in range(batch_size)],
            ["synthetic"] * batch_size,
        )
        for _ in range(count)
    ]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def setup(name: str, image_size: int, device: torch.device, precision: str, channels_last: bool, compile_: bool):
    torch.manual_seed(0)
    model = build_model(name, image_size).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    return (torch.compile(model) if compile_ else model), optimizer, scaler


def bare_rate(batches: list[Batch], steps: int, warmup: int, **settings: Any) -> float:
    """A textbook PyTorch step: autocast forward, scaled backward, optimiser step. Nothing else."""
    device, precision, channels_last = settings["device"], settings["precision"], settings["channels_last"]
    model, optimizer, scaler = setup(
        settings["name"], settings["image_size"], device, precision, channels_last, settings["compile_"]
    )
    criterion = nn.BCEWithLogitsLoss()
    started = 0.0
    for step, batch in enumerate(itertools.islice(itertools.cycle(batches), warmup + steps)):
        if step == warmup:
            synchronize(device)
            started = time.perf_counter()
        images = batch.images.contiguous(memory_format=torch.channels_last) if channels_last else batch.images
        with autocast(device, precision):
            loss = criterion(model(images).float(), batch.labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return steps * len(batches[0].keys) / (time.perf_counter() - started)


def make_parts(settings: dict[str, Any]) -> TrainingParts:
    device, precision = settings["device"], settings["precision"]
    model, optimizer, scaler = setup(
        settings["name"], settings["image_size"], device, precision, settings["channels_last"], settings["compile_"]
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return TrainingParts(
        model=model,
        optimizer=optimizer,
        scaler=scaler,
        scheduler=scheduler,
        device=device,
        precision=precision,
        channels_last=settings["channels_last"],
    )


def run_epoch(parts: TrainingParts, batches: InMemoryBatches | ShardLoader, start_batch: int = 0) -> EpochResult:
    """aidetect's ``train_one_epoch`` as a training run calls it, reading the loss every 20 steps, showing nothing."""
    progress = Progress(0, start_batch, len(batches), 1, "none")
    result = train_one_epoch(parts, batches, progress, start_batch=start_batch, log_every=20)
    synchronize(parts.device)
    return result


def loop_rate(batches: list[Batch], steps: int, warmup: int, **settings: Any) -> tuple[float, dict[str, float]]:
    """aidetect's loop on the same in-memory batches over and over: images per second, and what the timed
    steps cost in the kernel (``kernel_cost``)."""
    parts = make_parts(settings)
    run_epoch(parts, InMemoryBatches(batches, warmup))
    before = resource.getrusage(resource.RUSAGE_SELF)
    result = run_epoch(parts, InMemoryBatches(batches, steps))
    return result.images / result.seconds, kernel_cost(before, resource.getrusage(resource.RUSAGE_SELF), steps)


def kernel_cost(before: resource.struct_rusage, after: resource.struct_rusage, steps: int) -> dict[str, float]:
    """Minor page faults and system CPU seconds per step between two ``getrusage(RUSAGE_SELF)`` readings (all
    threads of this process): an allocator that hands memory back to the kernel every step shows here."""
    return {
        "minor_faults_per_step": (after.ru_minflt - before.ru_minflt) / steps,
        "system_s_per_step": (after.ru_stime - before.ru_stime) / steps,
    }


def loader_fed_rate(pack: str, workers: int, batch_size: int, steps: int, warmup: int, **settings: Any) -> float:
    """aidetect's loop fed by the training loader: ``pack``'s images decoded by ``workers`` processes,
    cropped to the image size, normalised on the device, for an epoch of at least ``steps`` batches (the
    pack listed as often as that takes). The last ``warmup`` batches of a first epoch start the workers."""
    parts = make_parts(settings)
    loader = repeated_loader(
        pack, batch_size, workers, steps * batch_size, crop=settings["image_size"], device=settings["device"]
    )
    first = max(0, len(loader) - warmup)
    loader.set_epoch(0, first)
    run_epoch(parts, loader, first)
    loader.set_epoch(1)
    result = run_epoch(parts, loader)
    return result.images / result.seconds


@torch.no_grad()
def extract_rate(model: nn.Module, batches: list[Batch], steps: int, warmup: int, precision: str) -> float:
    """Images per second through a frozen backbone as ``aidetect features`` runs it: eval mode, no gradients,
    each image and its mirror in one pass."""
    model.eval()
    for step, batch in enumerate(itertools.islice(itertools.cycle(batches), warmup + steps)):
        if step == warmup:
            synchronize(batch.images.device)
            started = time.perf_counter()
        with autocast(batch.images.device, precision):
            model.backbone(torch.cat([batch.images, batch.images.flip(3)]))
    synchronize(batches[0].images.device)
    return steps * len(batches[0].keys) / (time.perf_counter() - started)


def probe_rates(batches: list[Batch], steps: int, warmup: int, **settings: Any) -> dict[str, float] | None:
    """For a backbone + linear head model (``timm:ARCH``): images per second of feature extraction
    (``extract_rate``) and of a linear probe's training steps on cached features (aidetect's loop, the head
    of ``probe.Probe``); None for other models."""
    parts = make_parts(settings | {"channels_last": False})
    if not hasattr(parts.model, "backbone"):
        return None
    extract = extract_rate(parts.model, batches, steps, warmup, settings["precision"])
    probe = Probe(parts.model)
    parts.model, parts.channels_last = probe, False
    parts.optimizer = torch.optim.Adam(probe.head.parameters(), lr=1e-4)
    parts.scheduler = torch.optim.lr_scheduler.LambdaLR(parts.optimizer, lambda step: 1.0)
    width = probe.head.in_features
    features = [b._replace(images=torch.randn(len(b.keys), width, device=b.images.device)) for b in batches]
    run_epoch(parts, InMemoryBatches(features, warmup))
    result = run_epoch(parts, InMemoryBatches(features, steps * 10))  # steps of microseconds: time more of them
    return {"extract_img_per_s": extract, "probe_img_per_s": result.images / result.seconds}


def bench_train(
    json_path: str | None = None,
    *,
    model: str = "seed_cnn2",
    image_size: int = 128,
    batch_size: int = 32,
    steps: int = 30,
    warmup: int = 5,
    precisions: tuple[str, ...] = ("fp32", "bf16"),
    compile_: bool = False,
    data: str | None = None,
    workers: int = 1,
) -> dict[str, Any]:
    """Time the loops and write the figures to ``json_path``. ``precisions`` may hold ``auto`` (the one a
    run's ``train.precision: auto`` picks here); bf16 on a GPU without bf16 is a ``UserError``. With
    ``data`` (a pack holding images of at least ``image_size``), ``loader_fed`` times the reference
    setting fed by the training loader with ``workers`` processes; else it is null."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precisions = tuple(dict.fromkeys(resolve_precision(p, device) for p in precisions))
    batches = make_batches(batch_size, image_size, device)
    base = {"name": model, "image_size": image_size, "device": device, "compile_": False}
    default = base | {"precision": resolve_precision("auto", device), "channels_last": True}
    bare = bare_rate(batches, steps, warmup, **default)
    ours, _ = loop_rate(batches, steps, warmup, **default)
    results: dict[str, Any] = {
        "model": model,
        "image_size": image_size,
        "batch_size": batch_size,
        "device": device_name(device),
        "machine": machine(),
        "reference_setting": setting_name(default),
        "bare_img_per_s": bare,
        "loop_img_per_s": ours,
        "loop_overhead_ratio": ours / bare,
        "settings": {},
        "settings_kernel": {},
        "loader_fed": None,
        "probe": probe_rates(batches, steps, warmup, **default),
    }
    for settings in each_setting(base, precisions, compile_):
        name = setting_name(settings)
        results["settings"][name], results["settings_kernel"][name] = loop_rate(batches, steps, warmup, **settings)
    if data:
        fed = loader_fed_rate(data, workers, batch_size, steps, warmup, **default)
        results["loader_fed"] = {"pack": str(data), "workers": workers, "img_per_s": fed, "vs_in_memory": fed / ours}
    if json_path:
        atomic_write_json(json_path, results)
    return results


def each_setting(base: dict[str, Any], precisions: tuple[str, ...], compile_: bool) -> Iterator[dict[str, Any]]:
    """``base`` at every precision, in both memory layouts, compiled too with ``compile_``."""
    for precision, channels_last, compiled in itertools.product(precisions, (False, True), (False, True)):
        if compile_ or not compiled:
            yield base | {"precision": precision, "channels_last": channels_last, "compile_": compiled}


def setting_name(settings: dict[str, Any]) -> str:
    layout = "channels_last" if settings["channels_last"] else "contiguous"
    return f"{settings['precision']}/{layout}{'/compile' if settings['compile_'] else ''}"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def format_table(results: dict[str, Any]) -> str:
    lines = [
        f"{results['model']} @ {results['image_size']} px, batch {results['batch_size']} on {results['device']}",
        f"bare PyTorch loop {results['bare_img_per_s']:.1f} img/s, aidetect loop {results['loop_img_per_s']:.1f} "
        f"img/s ({results['reference_setting']}): loop_overhead_ratio {results['loop_overhead_ratio']:.3f} "
        "(target >= 0.95)",
    ]
    for name, rate in results["settings"].items():
        kernel = results["settings_kernel"][name]
        lines.append(
            f"  {name:<28}{rate:>10.1f} img/s {kernel['minor_faults_per_step']:>12.0f} minor faults/step "
            f"{kernel['system_s_per_step'] * 1000:>9.1f} ms system CPU/step"
        )
    probe = results.get("probe")
    if probe:
        lines.append(
            f"frozen backbone (aidetect features, image + mirror): {probe['extract_img_per_s']:.1f} img/s; "
            f"linear probe on cached features: {probe['probe_img_per_s']:.0f} img/s"
        )
    fed = results["loader_fed"]
    if fed:
        lines.append(
            f"fed by the loader ({fed['workers']} workers, {results['reference_setting']}): {fed['img_per_s']:.1f} "
            f"img/s, {fed['vs_in_memory']:.3f} of the in-memory rate"
        )
    return "\n".join(lines)
