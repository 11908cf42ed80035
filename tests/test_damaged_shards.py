"""Shards damaged by a copy (truncated, or flipped bytes): one clear line, never a traceback or silent
garbage; ``verify_shards`` finds them and re-running pack restores them byte-identically."""

from __future__ import annotations

import hashlib
import io
import re
import shutil
import tarfile
from pathlib import Path

import pytest
from conftest import run_cli

from aidetect.data.shards import (
    Shard,
    ShardDataset,
    epoch_order,
    fold_splits,
    read_manifest,
    select_shards,
    tar_samples,
    verify_shards,
)
from aidetect.errors import UserError

FIX = "copy it again, or restore it by re-running 'aidetect pack SRC "


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:5000])


def flip(path: Path) -> None:
    """Same size, 16 bytes inverted in the middle: only the sha256 can tell."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    path.write_bytes(data)


def copy_pack(tiny_pack: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_pack, tmp_path / "shards"))


def first_train_shard(pack: Path) -> Path:
    """The shard a one-process training run reads first (train's defaults: seed 0, validation fold 0)."""
    shards = select_shards(pack, fold_splits(read_manifest(pack)["settings"]["folds"], 0)["train"])
    return Path(epoch_order(shards, seed=0, epoch=0, shuffle=True)[0].path)


@pytest.mark.parametrize("workers", [1, 0])
@pytest.mark.parametrize(
    ("damage", "detail"),
    [(truncate, "5000 bytes where the manifest records"), (flip, "its sha256 differs from the manifest's")],
)
def test_training_on_a_damaged_shard_stops_with_one_line(
    tiny_pack: Path, tmp_path: Path, damage, detail, workers
) -> None:
    pack = copy_pack(tiny_pack, tmp_path)
    shard = first_train_shard(pack)
    damage(shard)
    run = tmp_path / "run"
    args = ["--model", "seed_cnn1", "--epochs", "1", "--batch-size", "8", "--precision", "fp32"]
    result = run_cli("train", "--data", str(pack), "--out", str(run), *args, "--set", f"data.workers={workers}")
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # also when a worker process found it
    assert result.stderr.startswith(f"aidetect: error: {shard}: damaged shard, ")
    assert detail in result.stderr and FIX in result.stderr
    assert not (run / "last.pt").exists()  # stopped before an epoch was spent on it


def test_verify_finds_the_damaged_shards_and_pack_restores_them(tiny_pack: Path, tmp_path: Path) -> None:
    pack = copy_pack(tiny_pack, tmp_path)
    manifest = read_manifest(pack)
    assert verify_shards(pack) == []
    names = [s["name"] for s in manifest["shards"]]
    truncate(pack / names[1])
    flip(pack / names[-1])
    problems = verify_shards(pack)
    assert [p.path for p in problems] == [str(pack / names[1]), str(pack / names[-1])]
    assert "5000 bytes" in str(problems[0]) and "sha256" in str(problems[1]) and FIX in str(problems[0])

    settings = manifest["settings"]
    options = ["--mode", settings["mode"], "--size", str(settings["size"]), "--shard-size", str(settings["shard_size"])]
    untouched = {n: (pack / n).stat().st_mtime_ns for n in names[2:-1]}
    result = run_cli("pack", manifest["source"]["path"], str(pack), *options)
    assert result.returncode == 0, result.stderr
    for entry in manifest["shards"]:
        assert hashlib.sha256((pack / entry["name"]).read_bytes()).hexdigest() == entry["sha256"], entry["name"]
    assert {n: (pack / n).stat().st_mtime_ns for n in untouched} == untouched  # only the damaged ones rewritten
    assert read_manifest(pack) == manifest and not list(pack.glob("*.tmp"))


def test_unreadable_tar_and_image_name_the_shard(tiny_pack: Path, tmp_path: Path) -> None:
    """What the size and hash checks normally catch first, as the parser and decoder meet it."""
    source = tiny_pack / read_manifest(tiny_pack)["shards"][1]["name"]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(source.read_bytes()[:5000])
    with pytest.raises(UserError, match=rf"{re.escape(str(cut))}: damaged shard, unreadable at byte \d+: "):
        list(tar_samples(str(cut)))
    renamed = bytearray(source.read_bytes())
    renamed[0:2] = b"\xff\xfe"  # the first member's name, no longer UTF-8
    with pytest.raises(UserError, match="unreadable at byte 0: a corrupted member header"):
        list(tar_samples("renamed.tar", bytes(renamed)))

    garbage = tmp_path / "garbage.tar"
    with tarfile.open(garbage, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in (("k1.jpg", b"\xff\xd8 not a jpeg"), ("k1.cls", b"1")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = garbage.read_bytes()
    shard = Shard(str(garbage), 1, len(data), hashlib.sha256(data).hexdigest())
    dataset = ShardDataset([shard], batch_size=1, train=False, side=64, seed=0, rank=0, world=1)
    expected = rf"{re.escape(str(garbage))}: damaged shard, sample k1 holds no decodable image; {re.escape(FIX)}"
    with pytest.raises(UserError, match=expected):
        next(iter(dataset))
