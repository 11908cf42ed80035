from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import webdataset as wds

from aidetect.data import build_loader, fold_splits, read_manifest
from aidetect.data.shards import Shard, batches_per_rank, rank_range, worker_counts, worker_plan
from aidetect.errors import UserError

PROBE = Path(__file__).parent / "helpers" / "loader_probe.py"


def keys_of(packed_dir: Path, splits: list[str]) -> list[str]:
    manifest = read_manifest(packed_dir)
    urls = [str(packed_dir / s["name"]) for s in manifest["shards"] if s["split"] in splits and s["count"]]
    return [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]


def planned_positions(shards, **kwargs) -> list[tuple[str, int]]:
    return [(r.shard.path, r.skip + i) for r in worker_plan(shards, **kwargs) for i in range(r.take)]


@pytest.mark.parametrize("counts", [[7], [5, 0, 9, 3], [1] * 13, [40, 2]])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [1, 2, 5])
def test_plans_give_equal_train_batches_and_exactly_once_evaluation(counts, world, workers) -> None:
    shards = [Shard(f"s{i}", c) for i, c in enumerate(counts)]
    total, batch = sum(counts), 2
    for train in (True, False):
        seen = []
        for rank in range(world):
            positions = []
            for worker in range(workers):
                args = dict(seed=1, epoch=3, train=train, rank=rank, world=world, batch_size=batch)
                mine = planned_positions(shards, worker=worker, workers=workers, **args)
                if train:
                    assert len(mine) % batch == 0  # whole batches only
                positions += mine
            _, count = rank_range(total, rank, world, batch, train)
            assert len(positions) == count
            if train:
                assert batches_per_rank(count, workers, batch) == total // (world * batch)
            seen += positions
        assert len(seen) == len(set(seen))  # no sample twice
        if not train:
            assert sorted(seen) == sorted((f"s{i}", j) for i, c in enumerate(counts) for j in range(c))


def test_worker_split_leaves_at_most_one_partial_batch() -> None:
    assert worker_counts(23, 3, 4) == [8, 8, 7]
    assert worker_counts(8, 5, 4) == [4, 4, 0, 0, 0]
    assert worker_counts(3, 2, 4) == [3, 0]


@pytest.mark.parametrize("workers", [2, 3])
def test_two_ranks_under_torchrun(packed_dir: Path, tmp_path: Path, workers: int) -> None:
    batch = 4
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += [str(PROBE), str(packed_dir), str(tmp_path / "probe"), str(batch), str(workers), "4"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"probe.rank{r}.json").read_text()) for r in range(2)]
    assert sum(s["split"] == "test" for s in read_manifest(packed_dir)["shards"]) < 4  # fewer than eval workers
    splits = fold_splits(5, 0)
    train_keys = keys_of(packed_dir, splits["train"])
    for epoch in range(2):
        per_rank = [r["train"][epoch] for r in ranks]
        assert per_rank[0]["batches"] == per_rank[1]["batches"] == per_rank[0]["len"] == len(train_keys) // (2 * batch)
        both = per_rank[0]["keys"] + per_rank[1]["keys"]
        assert len(both) == len(set(both)) and set(both) <= set(train_keys)
        assert len(train_keys) - len(both) < 2 * batch  # only the remainder of a global batch is dropped
    assert ranks[0]["train"][0]["keys"] != ranks[0]["train"][1]["keys"]  # reshuffled each epoch
    for name in ("val", "test"):  # the test split has fewer shards than the 4 eval workers
        expected = keys_of(packed_dir, splits[name])
        seen = ranks[0]["eval"][name]["keys"] + ranks[1]["eval"][name]["keys"]
        assert sorted(seen) == sorted(expected)
        assert all(r["eval"][name]["batches"] == r["eval"][name]["len"] for r in ranks)


def test_single_process_loader_is_seeded_and_never_noises_evaluation(packed_dir: Path) -> None:
    splits = fold_splits(5, 1)

    def epoch_keys(seed: int, epoch: int) -> list[str]:
        loader = build_loader(packed_dir, splits["train"], batch_size=4, train=True, num_workers=2, seed=seed)
        loader.set_epoch(epoch)
        return [k for batch in loader for k in batch.keys]

    assert epoch_keys(0, 1) == epoch_keys(0, 1)
    assert epoch_keys(0, 1) != epoch_keys(0, 2)
    assert epoch_keys(0, 1) != epoch_keys(5, 1)

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
