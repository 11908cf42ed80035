"""Linear probes on a feature cache (``aidetect features``): the cache's format and checks, the loader that
yields cached features in the batches and order the image loader yields images, and the head as the
trained model.

A cache is a folder: ``features.json`` (the manifest), ``backbone.safetensors`` (the backbone's weights as
extracted) and one ``SHARD.npz`` per shard of the pack, in the shard's sample order: ``features`` (N x D
float32, the pooled features of the centre crop), ``flipped`` (the same of its mirror image), ``labels``,
``keys``, ``sources``, the shard's ``split``, ``shard`` name and ``sha256``, and with ``--layers`` a
``layerK`` (N x D', block K's CLS token) per block. float32: a probe trained on the cache equals the probe
trained on the images (``model.tune probe``) to float tolerance.

``FeatureLoader`` follows ``aidetect.data.plan`` as ``ShardLoader`` does: the same shard order, sample
permutations and rank batches, so a run on the cache sees the samples in the same order and global
batches; a training sample is the mirrored features exactly when the image loader would mirror its
image (the same per-sample draw). The image loader's random crop position (packs stored larger than the
model's input side) has no counterpart: the cache holds the centre crop. Noise, blur and JPEG act on
images and are refused with a cache.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import nn

from aidetect.config import Config
from aidetect.data.loader import Batch
from aidetect.data.manifest import Selection, read_manifest, select_shards
from aidetect.data.plan import epoch_order, rank_batches, sample_permutation, seeded
from aidetect.data.shardfile import Shard
from aidetect.data.transforms import crop_flip_draws
from aidetect.distributed import DistInfo
from aidetect.errors import UserError

MANIFEST = "features.json"
FORMAT = "aidetect-features/1"
BACKBONE = "backbone.safetensors"


# ----------------------------------------------------------------------------------------------------
# The cache's files and checks


def feature_file(cache: str | Path, shard_name: str) -> Path:
    """Where the features of the pack's shard ``shard_name`` lie in ``cache``."""
    return Path(cache) / f"{Path(shard_name).stem}.npz"


def pack_shards(pack: str | Path) -> dict[str, str]:
    """{shard name: sha256} of every shard the manifest of ``pack`` lists."""
    return {entry["name"]: entry["sha256"] for entry in read_manifest(pack)["shards"]}


def read_cache(cache: str | Path) -> dict[str, Any]:
    """The manifest of the cache at ``cache``; ``UserError`` when there is none or it is no cache of ours."""
    path = Path(cache) / MANIFEST
    if not path.is_file():
        raise UserError(f"{path}: not found; make the cache with 'aidetect features --data PACK --out {cache}'")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise UserError(f"{path}: not an aidetect feature cache (format {manifest.get('format')!r})")
    return manifest


def check_pack(cache: str | Path, manifest: dict[str, Any], pack: str | Path) -> None:
    """``UserError`` (one line naming the shard) unless pack ``pack`` holds the shards, with the sha256s, that
    the cache ``manifest`` was extracted from."""
    recorded, current = manifest["pack"]["shards"], pack_shards(pack)
    for name in sorted(set(recorded) | set(current)):
        if recorded.get(name) != current.get(name):
            raise UserError(
                f"{Path(cache) / MANIFEST}: extracted from a pack whose shard {name} had sha256 "
                f"{recorded.get(name, 'absent')}, {pack} has {current.get(name, 'absent')}: the pack changed; "
                f"extract again into a new folder (aidetect features --data {pack} --out NEW)"
            )


def missing_shards(cache: str | Path, pack: str | Path) -> list[str]:
    """The shards of pack ``pack`` that hold samples and have no feature file in ``cache`` yet."""
    entries = read_manifest(pack)["shards"]
    return [e["name"] for e in entries if e["count"] > 0 and not feature_file(cache, e["name"]).is_file()]


def check_complete(cache: str | Path, pack: str | Path) -> dict[str, Any]:
    """The manifest of a finished cache of pack ``pack``; ``UserError`` when it is unfinished or of another pack."""
    manifest = read_cache(cache)
    check_pack(cache, manifest, pack)
    missing = missing_shards(cache, pack)
    if missing:
        raise UserError(
            f"{cache}: no features of {len(missing)} shard(s) yet ({missing[0]}, ...): the extraction is not "
            "finished; run the same 'aidetect features' command again"
        )
    return manifest


def check_cache(config: Config, pack: str | Path) -> None:
    """``UserError`` (one line) unless ``data.features`` is a finished cache of pack ``pack`` extracted with
    ``model.name``, and the config sets no option that acts on images, which the cache no longer has."""
    cache, data = config.data.features, config.data
    manifest = check_complete(cache, pack)
    if manifest["model"] != config.model.name:
        raise UserError(f"{cache}: features of {manifest['model']}, not of model.name {config.model.name}; set it")
    for key, value in {"noise_std": data.noise_std, "blur_prob": data.blur_prob, "jpeg_prob": data.jpeg_prob}.items():
        if value:
            raise UserError(f"data.features: data.{key} acts on images, the cache holds features; set it to 0")


# ----------------------------------------------------------------------------------------------------
# The probe: the head on cached features


class Probe(nn.Module):
    """A backbone + head model (``TimmBinary``) whose head runs on cached features: it holds the model's
    modules under their names (its ``state_dict`` is the model's, for ``evaluate`` and ``predict``), the
    backbone frozen and unused, and ``forward`` maps N x D features to N logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        self.backbone.requires_grad_(False)
        self.weights = getattr(model, "weights", None)  # where the backbone's pretrained weights came from

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features).squeeze(1)


def probe_model(model: nn.Module, cache: str | Path) -> Probe:
    """``model`` (backbone + head) with the cache's backbone weights, as a ``Probe``; ``UserError`` for a
    model without a backbone and a linear head, or another backbone than the cache's."""
    if not isinstance(getattr(model, "head", None), nn.Linear) or not hasattr(model, "backbone"):
        raise UserError("data.features trains the linear head of a backbone model: set model.name timm:ARCH")
    state = safetensors.torch.load_file(Path(cache) / BACKBONE)
    try:
        model.backbone.load_state_dict(state)
    except RuntimeError:
        raise UserError(f"{cache}: its features come from another backbone than model.name; set the cache's") from None
    return Probe(model)


# ----------------------------------------------------------------------------------------------------
# The loader


class FeatureLoader:
    """Batches of cached features for one rank, as ``ShardLoader`` yields images (``set_epoch`` first): the
    same ``Batch`` objects, ``images`` holding N x D features. Every selected sample's features are held in
    memory (D floats per sample and view)."""

    def __init__(
        self,
        cache: str | Path,
        shards: list[Shard],
        *,
        batch_size: int,
        train: bool,
        seed: int,
        rank: int,
        world: int,
        device: torch.device,
        accumulate: int,
        side: int,
        size: int,
    ) -> None:
        self.shards, self.batch_size, self.train, self.seed = shards, batch_size, train, seed
        self.rank, self.world, self.device, self.accumulate = rank, world, device, accumulate
        self.side, self.size = side, size
        self.total = sum(s.count for s in shards)
        self.position = (0, 0)
        self.offsets = dict(zip((s.path for s in shards), np.cumsum([0] + [s.count for s in shards]), strict=False))
        self.rows = load_rows(cache, shards)

    def __enter__(self) -> FeatureLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to end: no worker processes."""

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.position = (epoch, start_batch)

    def all_batches(self, rank: int) -> list[range]:
        return rank_batches(self.total, rank, self.world, self.batch_size, self.train, self.accumulate)

    def __len__(self) -> int:
        return len(self.all_batches(self.rank)) - self.position[1]

    def batches_on_every_rank(self) -> int:
        """The number of this epoch's batches that every rank yields (evaluation shares differ by one)."""
        return min(len(self.all_batches(rank)) for rank in range(self.world)) - self.position[1]

    def sequence(self, epoch: int) -> np.ndarray:
        """The row of ``self.rows`` at each position of the epoch's sequence (``aidetect.data.plan``)."""
        order = epoch_order(self.shards, self.seed, epoch, shuffle=self.train)
        parts = [self.offsets[s.path] + np.array(sample_permutation(s, self.seed, epoch, self.train)) for s in order]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def mirrored(self, keys: list[str], epoch: int) -> np.ndarray:
        """Which samples the image loader would mirror (training only: its per-sample draw of crop and flip)."""
        if not self.train:
            return np.zeros(len(keys), dtype=bool)
        draws = (crop_flip_draws(self.size, self.size, self.side, seeded("augment", self.seed, epoch, k)) for k in keys)
        return np.array([flip for _, _, flip in draws], dtype=bool)

    def __iter__(self) -> Iterator[Batch]:
        epoch, start = self.position
        sequence = self.sequence(epoch)
        for positions in self.all_batches(self.rank)[start:]:
            rows = sequence[positions.start : positions.stop]
            keys = [self.rows["keys"][r] for r in rows]
            flip = self.mirrored(keys, epoch)[:, None]
            features = np.where(flip, self.rows["flipped"][rows], self.rows["features"][rows])
            yield Batch(
                torch.from_numpy(features).to(self.device),
                torch.from_numpy(self.rows["labels"][rows]).float().to(self.device),
                keys,
                [self.rows["sources"][r] for r in rows],
            )


def load_rows(cache: str | Path, shards: list[Shard]) -> dict[str, Any]:
    """The selected samples of ``shards`` from their feature files, concatenated in shard order (each shard's
    kept samples in file order): features, flipped, labels (arrays); keys and sources (lists)."""
    parts: dict[str, list[Any]] = {"features": [], "flipped": [], "labels": [], "keys": [], "sources": []}
    for shard in shards:
        with np.load(feature_file(cache, Path(shard.path).name)) as stored:
            kept = np.array(shard.keep) if shard.keep is not None else np.arange(shard.stored)
            for name in parts:
                parts[name].append(stored[name][kept])
    rows = {name: np.concatenate(chosen) for name, chosen in parts.items()}
    return rows | {"keys": rows["keys"].tolist(), "sources": rows["sources"].tolist()}


def features_loader(config: Config, info: DistInfo, shards: str, selection: Selection, train: bool) -> FeatureLoader:
    """This process's loader of ``selection`` of pack ``shards`` from the cache ``data.features``: what
    ``train.build_split_loader`` builds from the images, with features instead."""
    data, manifest = config.data, read_cache(config.data.features)
    chosen = select_shards(shards, selection.splits, selection.keep)
    if train and sum(s.count for s in chosen) < info.world * data.batch_size * config.optim.accumulate:
        raise UserError(f"{shards}: splits {', '.join(selection.splits)} hold fewer samples than one global batch")
    return FeatureLoader(
        data.features,
        chosen,
        batch_size=data.batch_size,
        train=train,
        seed=config.train.seed,
        rank=info.rank,
        world=info.world,
        device=info.device,
        accumulate=config.optim.accumulate if train else 1,
        side=manifest["preprocess"]["side"],
        size=manifest["preprocess"]["size"],
    )
