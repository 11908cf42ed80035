"""``aidetect features``: a frozen backbone's pooled features of every sample of every split of a pack, run
once and cached for linear probes (``aidetect train --features``; the format: ``aidetect.probe``).

The model is the run config's (``model.name timm:ARCH``, ``model.pretrained``; random weights are drawn
from ``train.seed`` as a training run's rank 0 draws them), in eval mode, without gradients, under the
config's precision; each image is the centre crop at the model's input side, normalised with the
model's mean and std, and its mirror image (what training's flips see). One process, torchrun and srun
run the same code: the pack's shards go to the ranks round-robin, so every sample is extracted once
across ranks and nodes, and each rank writes the feature files of its own shards.

Resumable: each feature file is written atomically, and a rerun skips those present, so a SIGKILL loses
at most the shards in progress. A stop signal (``aidetect.preemption``) drops the shard in progress and
ends with ``Stopped`` (exit 3): run the same command again. ``features.json``, written before any feature
file, records the pack's shard sha256s, the model, its weights' sha256, the backbone as extracted
(``backbone.safetensors`` and its sha256), the preprocessing and the feature dimension; a rerun with
another pack, model or preprocessing is a one-line ``UserError``. The cache is complete once every
shard's file is there (``probe.check_complete``).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import nn

from aidetect.config import Config, validate
from aidetect.data.loader import ShardDataset, ShardLoader, normalize_batch
from aidetect.data.manifest import read_manifest, select_shards
from aidetect.data.shardfile import Shard
from aidetect.distributed import DistInfo, barrier, cleanup_distributed, peers_watched, setup_distributed
from aidetect.engine import autocast
from aidetect.errors import UserError
from aidetect.fileio import atomic_write_bytes, atomic_write_json, replaced_atomically
from aidetect.hardware import resolve_precision
from aidetect.preemption import Stopped, StopRequest
from aidetect.probe import (
    BACKBONE,
    FORMAT,
    MANIFEST,
    check_pack,
    feature_file,
    missing_shards,
    pack_shards,
    read_cache,
)
from aidetect.train import build_trained_model, ranks_by_host, run_crop, seed_everything


def extract_features(config: Config, out: str, layers: tuple[int, ...] = ()) -> dict[str, Any]:
    """Extract the features of pack ``config.data.shards`` into the folder ``out`` (see the module), the
    pooled features and, with ``layers``, the CLS token of each of those ViT blocks (1-based); returns this
    process's summary. Every process of the run calls it."""
    validate(config)
    info = setup_distributed(config.train.dist_timeout_s, config.train.device)
    try:
        with StopRequest() as stop, peers_watched(info):
            if info.is_main:
                print(f"[aidetect] features: ranks by host: {ranks_by_host(list(info.hosts))}", flush=True)
            model, side = backbone_model(config, info.device)
            manifest = cache_manifest(config, model, side, layers)
            prepare(Path(out), manifest, model, info)
            pending = rank_shards(config.data.shards, Path(out), info)
            started = time.perf_counter()
            samples = extract(config, model, side, layers, pending, Path(out), info, stop)
            seconds = time.perf_counter() - started
        missing = len(missing_shards(out, config.data.shards))
        return {"shards": len(pending), "samples": samples, "seconds": seconds, "missing": missing}
    finally:
        cleanup_distributed(info)


def backbone_model(config: Config, device: torch.device) -> tuple[nn.Module, int]:
    """The configured backbone + head model in eval mode, built as rank 0 of a training run builds it, and
    the side its inputs are centre-cropped to: the side a training run reads the pack at (``run_crop``)."""
    size = read_manifest(config.data.shards)["settings"]["size"]
    side = run_crop(config, config.data.shards) or size
    seed_everything(config.train.seed, False, device)
    model = build_trained_model(config.model, side, device).eval()
    if not hasattr(model, "backbone") or not isinstance(getattr(model, "head", None), nn.Linear):
        raise UserError(f"model.name {config.model.name}: features need a backbone + linear head model: timm:ARCH")
    return model, side


def backbone_bytes(model: nn.Module) -> bytes:
    """The backbone's weights as a safetensors file (the same bytes for the same weights)."""
    return safetensors.torch.save({k: v.detach().cpu().contiguous() for k, v in model.backbone.state_dict().items()})


def cache_manifest(config: Config, model: nn.Module, side: int, layers: tuple[int, ...]) -> dict[str, Any]:
    """What ``features.json`` records of a cache (see the module)."""
    pack, pretrained = config.data.shards, config.model.pretrained
    preprocess = model.preprocess
    return {
        "format": FORMAT,
        "pack": {"path": str(pack), "shards": pack_shards(pack)},
        "model": config.model.name,
        "weights": {"spec": pretrained, "sha256": getattr(model.weights, "sha256", None)},
        "backbone_sha256": hashlib.sha256(backbone_bytes(model)).hexdigest(),
        "preprocess": {
            "side": side,
            "size": read_manifest(pack)["settings"]["size"],
            "crop": "centre",
            "mean": list(preprocess.mean),
            "std": list(preprocess.std),
            "views": ["features", "flipped"],
        },
        "dim": model.head.in_features,
        "layers": list(layers),
        "dtype": "float32",
        "seed": config.train.seed,
    }


def prepare(out: Path, manifest: dict[str, Any], model: nn.Module, info: DistInfo) -> None:
    """Check a cache already in ``out`` against ``manifest`` (every rank), else start it (rank 0): the backbone's
    weights, then ``features.json``."""
    if (out / MANIFEST).is_file():
        check_same(out, read_cache(out), manifest)
    elif info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / BACKBONE, backbone_bytes(model))
        atomic_write_json(out / MANIFEST, manifest)
    barrier()


def check_same(out: Path, recorded: dict[str, Any], manifest: dict[str, Any]) -> None:
    """``UserError`` (one line) unless the cache in ``out`` was extracted as ``manifest`` says this run would."""
    check_pack(out, recorded, manifest["pack"]["path"])
    for key in ("model", "weights", "backbone_sha256", "preprocess", "layers"):
        if recorded.get(key) != manifest[key]:
            raise UserError(
                f"{out / MANIFEST}: extracted with {key} {recorded.get(key)}, this run has {manifest[key]}: "
                "use the cache's settings or a new --out folder"
            )


def rank_shards(pack: str, out: Path, info: DistInfo) -> list[tuple[Shard, str]]:
    """(shard, split) of this rank's shards (every world-th of the pack's, round-robin) still without features."""
    splits = {entry["name"]: entry["split"] for entry in read_manifest(pack)["shards"]}
    shards = select_shards(pack, list(dict.fromkeys(splits.values())))
    mine = shards[info.rank :: info.world]
    return [(s, splits[Path(s.path).name]) for s in mine if not feature_file(out, Path(s.path).name).is_file()]


@contextmanager
def block_outputs(model: nn.Module, layers: tuple[int, ...]) -> Iterator[dict[int, torch.Tensor]]:
    """While active, the dict it yields holds each of ``layers``' (1-based ViT blocks) CLS token of the last
    forward pass; ``UserError`` for a model without such blocks."""
    blocks = getattr(model.backbone, "blocks", None)
    if layers and (blocks is None or not all(0 < k <= len(blocks) for k in layers)):
        raise UserError(f"--layers {','.join(map(str, layers))}: the backbone has no such transformer blocks")
    outputs: dict[int, torch.Tensor] = {}

    def hook(k: int) -> Callable[..., None]:
        return lambda module, inputs, output: outputs.__setitem__(k, output[:, 0])

    handles = [blocks[k - 1].register_forward_hook(hook(k)) for k in layers]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def batch_features(
    model: nn.Module, images: torch.Tensor, precision: str, outputs: dict[int, torch.Tensor]
) -> dict[str, np.ndarray]:
    """Each image's pooled features and its mirror's (one pass over both), and the hooked blocks' CLS tokens."""
    x = normalize_batch(images, None, model.preprocess.mean, model.preprocess.std)
    n = len(x)
    with autocast(x.device, precision):
        pooled = model.backbone(torch.cat([x, x.flip(3)])).float()
    arrays = {"features": pooled[:n], "flipped": pooled[n:]} | {f"layer{k}": v[:n].float() for k, v in outputs.items()}
    return {name: value.cpu().numpy() for name, value in arrays.items()}


def extract(
    config: Config,
    model: nn.Module,
    side: int,
    layers: tuple[int, ...],
    pending: list[tuple[Shard, str]],
    out: Path,
    info: DistInfo,
    stop: StopRequest,
) -> int:
    """Write the feature file of each of ``pending``; returns the samples extracted. ``Stopped`` after the
    batch in progress when a stop is requested: the shard in progress is not written."""
    if not pending:
        return 0
    device, batch_size = info.device, config.data.batch_size
    precision = resolve_precision(config.train.precision, device)
    dataset = ShardDataset(
        [shard for shard, _ in pending],
        batch_size=batch_size,
        train=False,
        side=side,
        seed=config.train.seed,
        rank=0,
        world=1,
        workers=config.data.workers,
    )
    loader = ShardLoader(dataset, device=device, noise_std=0.0)
    with loader, stop.deferred(), block_outputs(model, layers) as outputs:
        embed = lambda images: batch_features(model, images.to(device), precision, outputs)  # noqa: E731
        writer = ShardWriter(pending, out, info.rank, batch_size, embed)
        loader.set_epoch(0)
        for images, labels, keys, sources in loader.uint8_batches():
            writer.add(images, labels, keys, sources)
            if stop.requested:
                raise Stopped(f"{writer.written} shard(s) written to {out}; run the same command to continue")
    return dataset.total


Embed = Callable[[torch.Tensor], dict[str, np.ndarray]]  # uint8 N x H x W x 3 images -> arrays of N rows


class ShardWriter:
    """Samples of consecutive shards (``pending``, in order), as the loader's batches bring them, through
    ``embed`` in chunks of ``batch_size`` counted from each shard's first sample (a shard's features are
    the same bytes whichever rank extracts it, whatever came before it); each shard's feature file is
    written once all its rows are in."""

    def __init__(self, pending: list[tuple[Shard, str]], out: Path, rank: int, batch_size: int, embed: Embed) -> None:
        self.pending, self.out, self.rank, self.batch_size, self.embed = list(pending), out, rank, batch_size, embed
        self.waiting: list[tuple[torch.Tensor, int, str, str]] = []  # (image, label, key, source) to embed
        self.rows: dict[str, list[Any]] = {}  # the current shard's rows so far, by array name
        self.done, self.written = 0, 0  # the current shard's rows embedded; shards written

    def add(self, images: torch.Tensor, labels: torch.Tensor, keys: list[str], sources: list[str]) -> None:
        """One loader batch: ``images`` may be a view of a reused buffer, so each row is copied."""
        for image, label, key, source in zip(images, labels.tolist(), keys, sources, strict=True):
            self.waiting.append((image.clone(), int(label), key, source))
            count = self.pending[0][0].count
            if len(self.waiting) == self.batch_size or self.done + len(self.waiting) == count:
                self.embed_waiting()
            if self.done == count:
                self.flush()

    def embed_waiting(self) -> None:
        images, labels, keys, sources = zip(*self.waiting, strict=True)
        arrays = self.embed(torch.stack(images)) | {"labels": np.array(labels, dtype=np.int64)}
        for name, value in (arrays | {"keys": np.array(keys), "sources": np.array(sources)}).items():
            self.rows.setdefault(name, []).append(value)
        self.done, self.waiting = self.done + len(keys), []

    def flush(self) -> None:
        """Write the first pending shard's feature file."""
        shard, split = self.pending.pop(0)
        stored = {name: np.concatenate(parts) for name, parts in self.rows.items()}
        stored = {
            name: np.array(value.tolist()) if value.dtype.kind == "U" else value for name, value in stored.items()
        }
        stored |= {"split": np.array(split), "shard": np.array(Path(shard.path).name), "sha256": np.array(shard.sha256)}
        with replaced_atomically(feature_file(self.out, Path(shard.path).name)) as tmp, open(tmp, "wb") as f:
            np.savez(f, **stored)
        self.rows, self.done, self.written = {}, 0, self.written + 1
        print(
            f"[aidetect] features: rank {self.rank} wrote {Path(shard.path).stem}.npz ({shard.count} samples)",
            flush=True,
        )
