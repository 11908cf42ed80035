"""Native-resolution packs: ``pack --mode native --max-side S`` stores each image as decoded (scaled down only
beyond S, its stored size recorded); training reads a random crop of each, ``evaluate --crops N`` and
``predict --crops N`` the same N tiled crops, their logits combined alike."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from helpers.commands import run_cli, torchrun
from helpers.training import train_args
from PIL import Image

from aidetect.checkpoint import load_checkpoint
from aidetect.data.loader import build_loader, normalize_batch
from aidetect.data.manifest import fold_splits, read_manifest
from aidetect.data.pack import PackSettings, decode_and_preprocess
from aidetect.data.stored import decode_stored
from aidetect.data.transforms import tile_windows
from aidetect.errors import UserError
from aidetect.inference import check_preprocessing, load_for_prediction, predict
from aidetect.scores import read_scores, scores_metadata_of

MAX_SIDE = 96  # the tiny pack's raw files are 64 to 128 px: some are stored as decoded, some scaled down


@pytest.fixture(scope="module")
def native(tiny_pack: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pack's raw files packed at native resolution, within ``MAX_SIDE``: its folder."""
    out = tmp_path_factory.mktemp("native") / "shards"
    raw = str(tiny_pack.parent / "raw")
    packed = run_cli("pack", raw, str(out), "--mode", "native", "--max-side", str(MAX_SIDE), "--shard-size", "16")
    assert packed.returncode == 0, packed.stderr[-2000:]
    return out


def stored_images(pack: Path) -> dict[str, tuple[dict, np.ndarray]]:
    """Each sample's record and stored image, by key."""
    samples = (s for shard in sorted(pack.glob("*.tar")) for s in wds.WebDataset(str(shard), shardshuffle=False))
    return {s["__key__"]: (json.loads(s["json"]), decode_stored(s["jpg"])) for s in samples}


def test_native_pack_stores_images_as_decoded_up_to_max_side(native: Path, tiny_pack: Path) -> None:
    manifest = read_manifest(native)
    assert (manifest["settings"]["mode"], manifest["settings"]["max_side"]) == ("native", MAX_SIDE)
    stored = stored_images(native)
    assert len(stored) == manifest["samples"] > 0
    skipped = read_manifest(tiny_pack)["skipped"]  # the defects synth plants, no more
    assert [r["path"] for r in manifest["skipped"]] == [r["path"] for r in skipped]
    scaled = 0
    for record, pixels in stored.values():
        file, (short, long) = record["file"], sorted(record["file"]["stored"])  # files may be EXIF-rotated
        assert list(pixels.shape[:2]) == file["stored"]
        if max(file["height"], file["width"]) <= MAX_SIDE:
            assert (short, long) == tuple(sorted((file["height"], file["width"])))
        else:
            scaled += 1
            assert long == MAX_SIDE
            assert short / long == pytest.approx(
                min(file["height"], file["width"]) / max(file["height"], file["width"]), abs=0.02
            )
    assert 0 < scaled < len(stored)
    settings = manifest["settings"] | {"crop": None}
    for record, pixels in list(stored.values())[:4]:  # predict makes the image pack stored
        assert np.array_equal(load_for_prediction(tiny_pack.parent / "raw" / record["path"], settings).numpy(), pixels)


def test_max_side_is_for_native_packs_and_an_image_too_thin_once_scaled_is_left_out(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--max-side is for --mode native"):
        PackSettings(max_side=MAX_SIDE).validate()
    with pytest.raises(UserError, match="--max-side must be at least --min-side"):
        PackSettings(mode="native", max_side=16).validate()
    Image.new("RGB", (200, 40), (90, 40, 10)).save(tmp_path / "wide.png")
    _, pixels = decode_and_preprocess(tmp_path / "wide.png", PackSettings(mode="native"))
    assert pixels.shape == (40, 200, 3)  # no --max-side: as decoded
    _, pixels = decode_and_preprocess(tmp_path / "wide.png", PackSettings(mode="native", max_side=160))
    assert pixels.shape == (32, 160, 3)
    with pytest.raises(ValueError, match="too small once scaled to --max-side: 100x20 px"):
        decode_and_preprocess(tmp_path / "wide.png", PackSettings(mode="native", max_side=100))


def test_training_reads_a_random_crop_of_each_native_image_alike_on_any_number_of_ranks(native: Path) -> None:
    train = fold_splits(5, 0)["train"]

    def epoch(rank: int, world: int, batch: int) -> tuple[dict[str, torch.Tensor], object]:
        loader = build_loader(
            native, train, batch_size=batch, train=True, crop=32, num_workers=0, rank=rank, world=world, seed=1
        )
        loader.set_epoch(1)
        return {k: image for b in loader for k, image in zip(b.keys, b.images, strict=True)}, loader.dataset

    alone, dataset = epoch(0, 1, 4)
    halves = [epoch(rank, 2, 2)[0] for rank in range(2)]
    both = halves[0] | halves[1]
    assert not set(halves[0]) & set(halves[1]) and set(both) == set(alone)  # each image once
    assert all(torch.equal(image, both[key]) for key, image in alone.items())  # the same crop and flip
    stored = stored_images(native)
    assert len({stored[key][1].shape for key in alone}) > 1  # images of several sizes in one epoch
    windows = set()
    for key, image in alone.items():
        pixels = stored[key][1]
        top, left, flip = dataset.window(key, "", 1, *pixels.shape[:2])
        crop = pixels[top : top + 32, left : left + 32]
        expected = normalize_batch(torch.from_numpy(np.ascontiguousarray(crop[:, ::-1] if flip else crop))[None])
        assert crop.shape == (32, 32, 3) and torch.allclose(image, expected[0])
        windows.add((top, left))
    assert len(windows) > 1
    with pytest.raises(UserError, match="holds images as small as 32 px"):
        build_loader(native, train, batch_size=4, train=True, crop=48, num_workers=0)
    with pytest.raises(UserError, match=r"set data\.crop"):
        build_loader(native, train, batch_size=4, train=True, num_workers=0)


def test_crops_combine_the_same_in_evaluate_on_any_number_of_ranks_and_in_predict(
    native: Path, tiny_pack: Path, tmp_path: Path
) -> None:
    """evaluate --crops N scores N tiled crops of each stored image, alone and under torchrun alike, and
    combines their logits; predict --crops N on the raw files gives each the same probability."""
    trained = run_cli(*train_args(native, tmp_path / "run", "--epochs", "1", "--set", "data.crop=32"))
    assert trained.returncode == 0, trained.stderr[-2000:]
    checkpoint = str(tmp_path / "run" / "best.pt")
    evaluate = ("evaluate", checkpoint, "--data", str(native), "--crops", "4")
    alone = run_cli(*evaluate, "--out", str(tmp_path / "alone"))
    ranks = torchrun(*evaluate, "--combine", "max", "--out", str(tmp_path / "ranks"))
    assert alone.returncode == 0 and ranks.returncode == 0, (alone.stderr + ranks.stderr)[-2000:]
    mean, highest = (read_scores(tmp_path / where / "scores_test.parquet") for where in ("alone", "ranks"))
    assert mean.column("key").to_pylist() == highest.column("key").to_pylist()
    crops = np.asarray(mean.column("crop_logits").to_pylist())
    assert crops.shape == (mean.num_rows, 4)
    assert np.allclose(crops, highest.column("crop_logits").to_pylist(), atol=1e-5)
    assert not np.allclose(crops, crops[:, :1])  # four windows, four logits
    assert np.allclose(mean.column("logit").to_pylist(), crops.mean(1), atol=1e-6)
    assert np.allclose(highest.column("logit").to_pylist(), crops.max(1), atol=1e-5)
    assert (scores_metadata_of(highest)["crops"], scores_metadata_of(highest)["combine"]) == (4, "max")
    bounded_otherwise = replace(
        load_checkpoint(checkpoint), preprocess=read_manifest(native)["settings"] | {"max_side": 128}
    )
    with pytest.raises(UserError, match="other max_side than the checkpoint"):
        check_preprocessing(str(native), bounded_otherwise)
    files = [str(tiny_pack.parent / "raw" / path) for path in mean.column("path").to_pylist()]

    def predicted(crop_count: int, combine: str) -> np.ndarray:
        out = tmp_path / f"{crop_count}-{combine}.csv"
        assert predict(checkpoint, files, str(out), batch_size=5, crops=crop_count, combine=combine)["errors"] == 0
        rows = list(csv.DictReader(out.open()))
        assert [row["path"] for row in rows] == files
        return np.asarray([float(row["prob_fake"]) for row in rows])

    for combine, scores in (("mean", mean), ("max", highest)):
        assert np.allclose(predicted(4, combine), scores.column("prob_fake").to_pylist(), rtol=0, atol=2e-6)
    assert not np.allclose(predicted(1, "mean"), mean.column("prob_fake").to_pylist(), rtol=0, atol=1e-4)


def test_tiles_spread_over_the_image_and_one_is_the_centre() -> None:
    assert tile_windows(100, 60, 32, 4) == [(0, 0), (0, 28), (68, 0), (68, 28)]
    assert tile_windows(100, 60, 32, 1) == [(34, 14)]  # center_crop's window
    assert tile_windows(32, 100, 32, 3) == [(0, 0), (0, 34), (0, 68)]
