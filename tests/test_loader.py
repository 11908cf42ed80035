from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import webdataset as wds
from helpers.commands import torchrun_command

from aidetect.data.degrade import Augmentation
from aidetect.data.loader import build_loader
from aidetect.data.manifest import fold_splits, read_manifest
from aidetect.data.plan import rank_batches, worker_batches
from aidetect.errors import UserError

PROBE = Path(__file__).parent / "helpers" / "loader_probe.py"


def keys_of(packed_dir: Path, splits: list[str]) -> list[str]:
    manifest = read_manifest(packed_dir)
    urls = [str(packed_dir / s["name"]) for s in manifest["shards"] if s["split"] in splits and s["count"]]
    return [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]


@pytest.mark.parametrize("total", [0, 7, 13, 40])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_plans_give_equal_train_batches_and_exactly_once_evaluation(total: int, world: int) -> None:
    batch = 2
    train = [rank_batches(total, rank, world, batch, train=True) for rank in range(world)]
    assert all(len(batches) == total // (world * batch) for batches in train)  # the same on every rank
    assert all(len(b) == batch for batches in train for b in batches)  # whole batches only
    positions = [p for batches in train for b in batches for p in b]
    assert sorted(positions) == list(range(total // (world * batch) * world * batch))
    evaluation = [p for rank in range(world) for b in rank_batches(total, rank, world, batch, False) for p in b]
    assert sorted(evaluation) == list(range(total))  # every sample exactly once


def test_accumulation_groups_are_never_partial() -> None:
    assert len(rank_batches(40, 0, 2, 4, train=True, group=2)) == 4  # 40 // (2 x 4 x 2) groups of 2
    assert len(rank_batches(47, 1, 2, 4, train=True, group=3)) == 3


def test_global_batches_do_not_depend_on_how_many_ranks_share_them() -> None:
    one = rank_batches(48, 0, 1, 8, train=True)
    two = [rank_batches(48, rank, 2, 4, train=True) for rank in range(2)]
    assert [set(b) for b in one] == [set(a) | set(b) for a, b in zip(*two, strict=True)]


@pytest.mark.parametrize("workers", [1, 2, 5])
def test_workers_take_batches_round_robin(workers: int) -> None:
    batches = rank_batches(23, 0, 1, 2, train=False)
    per_worker = [worker_batches(batches, w, workers) for w in range(workers)]
    round_robin = [b for group in itertools.zip_longest(*per_worker) for b in group if b is not None]
    assert round_robin == batches


@pytest.mark.parametrize("workers", [2, 3])
def test_two_ranks_under_torchrun(packed_dir: Path, tmp_path: Path, workers: int) -> None:
    batch = 4
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    command = torchrun_command(str(PROBE), str(packed_dir), str(tmp_path / "probe"), str(batch), str(workers), "4")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"probe.rank{r}.json").read_text()) for r in range(2)]
    assert sum(s["split"] == "test" for s in read_manifest(packed_dir)["shards"]) < 4  # fewer than eval workers
    splits = fold_splits(5, 0)
    train_keys = keys_of(packed_dir, splits["train"])
    for epoch in range(2):
        per_rank = [r["train"][epoch] for r in ranks]
        assert per_rank[0]["batches"] == per_rank[1]["batches"] == per_rank[0]["len"] == len(train_keys) // (2 * batch)
        both = [k for r in per_rank for b in r["keys"] for k in b]
        assert len(both) == len(set(both)) and set(both) <= set(train_keys)
        assert len(train_keys) - len(both) < 2 * batch  # only the remainder of a global batch is dropped
        # the same global batches, in the same order, as one process with twice the batch size
        single = build_loader(packed_dir, splits["train"], batch_size=2 * batch, train=True, num_workers=0)
        single.set_epoch(epoch)
        expected = [sorted(b.keys) for b in single]
        assert [sorted(a + b) for a, b in zip(per_rank[0]["keys"], per_rank[1]["keys"], strict=True)] == expected
    assert ranks[0]["train"][0]["keys"] != ranks[0]["train"][1]["keys"]  # reshuffled each epoch
    for name in ("val", "test"):  # the test split has fewer shards than the 4 eval workers
        expected = keys_of(packed_dir, splits[name])
        seen = ranks[0]["eval"][name]["keys"] + ranks[1]["eval"][name]["keys"]
        assert sorted(seen) == sorted(expected)
        assert all(r["eval"][name]["batches"] == r["eval"][name]["len"] for r in ranks)


def test_single_process_loader_is_seeded_and_never_noises_evaluation(packed_dir: Path) -> None:
    splits = fold_splits(5, 1)
    blur_and_jpeg = Augmentation(blur_prob=0.5, blur_sigma=(0.0, 3.0), jpeg_prob=0.5, jpeg_quality=(30, 100))

    def epoch_batches(
        seed: int, epoch: int, workers: int = 2, degrade: Augmentation | None = blur_and_jpeg
    ) -> tuple[list[str], torch.Tensor]:
        loader = build_loader(
            packed_dir, splits["train"], batch_size=4, train=True, num_workers=workers, seed=seed, degrade=degrade
        )
        loader.set_epoch(epoch)
        batches = list(loader)
        return [k for b in batches for k in b.keys], torch.cat([b.images for b in batches])

    keys, images = epoch_batches(0, 1)
    for workers in (0, 3):  # any number of workers (none: in this process): the same batches
        same_keys, same_images = epoch_batches(0, 1, workers)
        assert keys == same_keys and torch.equal(images, same_images)  # crop, flip, blur and JPEG included
    plain_keys, plain_images = epoch_batches(0, 1, degrade=None)
    assert plain_keys == keys and not torch.equal(plain_images, images)  # it changes the images, not the order
    assert keys != epoch_batches(0, 2)[0]
    assert keys != epoch_batches(5, 1)[0]

    def eval_images(noise: float) -> torch.Tensor:
        loader = build_loader(packed_dir, splits["val"], batch_size=4, train=False, num_workers=0, noise_std=noise)
        return torch.cat([batch.images for batch in loader])

    clean = eval_images(0.0)
    assert torch.equal(clean, eval_images(0.5))
    assert clean.shape[1:] == (3, 256, 256) and clean.dtype == torch.float32
    assert -3 < clean.min() < -1.5 and 1.5 < clean.max() < 3  # ImageNet-normalised, not [0, 255]


def test_training_noise_and_crop(packed_dir: Path) -> None:
    splits = fold_splits(5, 1)
    kwargs = dict(batch_size=4, train=True, num_workers=0, crop=224)
    plain = next(iter(build_loader(packed_dir, splits["train"], noise_std=0.0, **kwargs)))
    noisy = next(iter(build_loader(packed_dir, splits["train"], noise_std=0.1, **kwargs)))
    assert plain.images.shape == (4, 3, 224, 224) and plain.keys == noisy.keys
    assert 0.3 < (noisy.images - plain.images).std().item() < 0.6  # 0.1 on [0, 1] is ~0.45 after normalising
    assert set(plain.labels.tolist()) <= {0.0, 1.0}


def test_missing_shard_unknown_split_and_tiny_split_are_clear_errors(packed_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text((packed_dir / "manifest.json").read_text())
    with pytest.raises(UserError, match="listed in the manifest but missing"):
        build_loader(tmp_path, ["test"], batch_size=2, train=False)
    with pytest.raises(UserError, match="no split fold9"):
        build_loader(packed_dir, ["fold9"], batch_size=2, train=False)
    with pytest.raises(UserError, match=r"manifest.json: not found"):
        build_loader(tmp_path / "nowhere", ["test"], batch_size=2, train=False)
    with pytest.raises(UserError, match="fewer than one global batch"):
        build_loader(packed_dir, ["test"], batch_size=512, train=True)
    with pytest.raises(UserError, match=r"crop 999 px does not fit the \d+ px images .* set data.crop <="):
        build_loader(packed_dir, ["test"], batch_size=2, train=False, crop=999)


def test_batches_are_written_in_place_and_an_abandoned_epoch_changes_nothing(packed_dir: Path) -> None:
    loader = build_loader(packed_dir, ["fold1"], batch_size=4, train=False, num_workers=2)
    buffers = loader.dataset.decoding.slots.images.untyped_storage().data_ptr()
    seen = [(images.untyped_storage().data_ptr(), keys) for images, _, keys, _ in loader.uint8_batches()]
    assert {pointer for pointer, _ in seen} == {buffers}  # every batch in the reused buffers: no allocation
    whole = [keys for _, keys in seen]
    abandoned = iter(loader)
    assert next(abandoned).keys == whole[0]  # broken off, and still referenced
    assert [batch.keys for batch in loader] == whole
    # A process that exits in the middle of an epoch ends its workers and does not hang.
    made = f"build_loader({str(packed_dir)!r}, ['fold1'], batch_size=2, train=False, num_workers=2)"
    code = f"from aidetect.data.loader import build_loader; next(iter({made}))"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
    # Its owner ends them also while the epoch is still referenced (as an error's traceback keeps it).
    held = f"with {made} as loader:\n    epoch = iter(loader)\n    next(epoch)"
    held = f"from aidetect.data.loader import build_loader\n{held}"
    assert subprocess.run([sys.executable, "-c", held], timeout=60).returncode == 0


def test_decoding_on_the_device_gives_the_workers_batches(packed_dir: Path) -> None:
    """torchvision's CPU JPEG decoder is libjpeg-turbo, as OpenCV's in the workers: decoded on a CPU device
    the batches are the workers', bit for bit, crops and flips included (a GPU's nvJPEG: test_gpu.py)."""
    side = read_manifest(packed_dir)["settings"]["size"] - 8  # random crops: every window differs

    def epoch(decode_on_device: bool) -> tuple[list[str], torch.Tensor]:
        loader = build_loader(
            packed_dir, ["fold1"], batch_size=4, train=True, crop=side, seed=3, decode_on_device=decode_on_device
        )
        loader.set_epoch(1)
        batches = list(loader)
        return [key for batch in batches for key in batch.keys], torch.cat([batch.images for batch in batches])

    keys, images = epoch(False)
    assert epoch(True)[0] == keys and torch.equal(epoch(True)[1], images)
    blur = Augmentation(blur_prob=1.0, blur_sigma=(1.0, 1.0), jpeg_prob=0.0, jpeg_quality=(30, 100))
    with pytest.raises(UserError, match="applies no blur"):
        build_loader(packed_dir, ["fold1"], batch_size=4, train=True, degrade=blur, decode_on_device=True)
