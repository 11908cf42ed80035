from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from conftest import SHARD_SIZE, SYNTH_N
from helpers.commands import run_cli
from PIL import Image

from aidetect.data.pack import PackSettings, pack
from aidetect.data.splits import assign_splits
from aidetect.data.stored import decode_stored
from aidetect.data.synth import DEFECT_OUTCOMES, synth
from aidetect.errors import UserError
from aidetect.inference import load_for_prediction


def manifest_of(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def all_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_every_file_is_accounted_for_with_its_outcome(synth_dir: Path, packed_dir: Path) -> None:
    manifest = manifest_of(packed_dir)
    packed = [p for shard in manifest["shards"] for p in shard["paths"]]
    skipped = {r["path"]: r["reason"] for r in manifest["skipped"]}
    repaired = {r["path"]: r["reason"] for r in manifest["repaired"]}
    assert len(packed) == len(set(packed)) == manifest["samples"]
    assert set(packed) | set(skipped) == all_files(synth_dir)
    assert not set(packed) & set(skipped)
    assert manifest["files"] == len(all_files(synth_dir)) == SYNTH_N + len(DEFECT_OUTCOMES)
    for path, outcome in DEFECT_OUTCOMES.items():
        status = "skipped" if path in skipped else "repaired" if path in repaired else "packed"
        assert status == outcome, path
    assert skipped["real/empty.jpg"].startswith("empty file")
    assert skipped["fake/page_saved_as.jpg"].startswith("not an image")
    assert skipped["real/tiny.jpg"].startswith("too small")
    assert skipped["fake/huge_header.png"].startswith("over the pixel budget")
    assert skipped["fake/Thumbs.db"] == skipped[".DS_Store"] == "system file, not an image"
    assert repaired["fake/truncated.jpg"].startswith("truncated JPEG: inpainted")
    assert all(reason for reason in skipped.values())


def test_shards_are_plain_webdataset_with_matching_hashes_and_labels(packed_dir: Path) -> None:
    manifest = manifest_of(packed_dir)
    per_split: dict[str, Counter] = {}
    for shard in manifest["shards"]:
        path = packed_dir / shard["name"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
        samples = list(wds.WebDataset(str(path), shardshuffle=False, empty_check=False))
        assert len(samples) == shard["count"] <= SHARD_SIZE
        for sample in samples:
            meta = json.loads(sample["json"])
            assert int(sample["cls"]) == meta["label"] == {"real": 0, "fake": 1}[meta["class"]]
            assert meta["split"] == shard["split"] and meta["path"] in shard["paths"]
            assert sample["jpg"][:2] == b"\xff\xd8"
            per_split.setdefault(shard["split"], Counter())[meta["class"]] += 1
    for split, counts in manifest["splits"].items():
        assert counts["total"] == counts["real"] + counts["fake"] == sum(per_split[split].values())
        assert counts["real"] == per_split[split]["real"]
    assert manifest["classes"] == {"real": 0, "fake": 1}
    assert manifest["settings"]["size"] == 256 and manifest["seed"] == 0


def test_splits_are_disjoint_stratified_and_independent_of_listing_order() -> None:
    names = {c: [f"{c}/img_{i:04d}.jpg" for i in range(n)] for c, n in (("real", 103), ("fake", 97))}
    reference = assign_splits(names, seed=7, test_fraction=0.1, folds=5)
    shuffled = {c: random.Random(1).sample(v, len(v)) for c, v in reversed(list(names.items()))}
    assert assign_splits(shuffled, seed=7, test_fraction=0.1, folds=5) == reference
    assert set(reference) == {p for v in names.values() for p in v}  # every path once
    for paths in names.values():
        counts = Counter(reference[p] for p in paths)
        assert counts["test"] == round(0.1 * len(paths))
        fold_sizes = [counts[f"fold{k}"] for k in range(5)]
        assert max(fold_sizes) - min(fold_sizes) <= 1
    totals = Counter(reference.values())
    assert max(totals[f"fold{k}"] for k in range(5)) - min(totals[f"fold{k}"] for k in range(5)) <= 1
    assert assign_splits(names, seed=8, test_fraction=0.1, folds=5) != reference


def test_sources_are_recorded_counted_and_spread_over_every_split(tmp_path: Path) -> None:
    """The first sub-folder of a class folder is a sample's source (files directly in it: the class)."""
    synth(tmp_path / "flat", n=96, seed=11, workers=2, min_side=64, max_side=96)
    layout = {"fake": ["midjourney", "sd"], "real": ["wikiart", None]}
    for class_name, sources in layout.items():
        for index, image in enumerate(sorted((tmp_path / "flat" / class_name).iterdir())):
            source = sources[index % 2]
            target = tmp_path / "src" / class_name / (source or "") / image.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(image, target)
    settings = PackSettings(mode="crop", size=32, test_fraction=0.25, folds=3, shard_size=8)
    manifest = pack(tmp_path / "src", tmp_path / "out", settings, workers=2, progress=False)
    by_source = {s: counts for by_class in manifest["sources"].values() for s, counts in by_class.items()}
    assert set(manifest["sources"]["fake"]) == {"midjourney", "sd"} and set(manifest["sources"]["real"]) == {
        "wikiart",
        "real",
    }
    for counts in by_source.values():  # every source in the test split and in every fold, in proportion
        assert counts["test"] == round(0.25 * counts["total"]) > 0
        folds = [counts[f"fold{k}"] for k in range(3)]
        assert min(folds) > 0 and max(folds) - min(folds) <= 1
    samples = [
        json.loads(s["json"])
        for shard in sorted((tmp_path / "out").glob("*.tar"))
        for s in wds.WebDataset(str(shard), shardshuffle=False)
    ]
    seen = Counter((m["class"], m["source"]) for m in samples)
    assert seen == Counter({(c, s): n["total"] for c, by in manifest["sources"].items() for s, n in by.items()})
    assert all(m["source"] == m["path"].split("/")[1] or m["source"] == "real" for m in samples)


def test_each_sample_records_what_its_file_says_and_its_padding(synth_dir: Path, packed_dir: Path) -> None:
    shards = sorted(packed_dir.glob("*.tar"))
    samples = [json.loads(s["json"]) for shard in shards for s in wds.WebDataset(str(shard), shardshuffle=False)]
    for meta in samples:
        facts, path = meta["file"], synth_dir / meta["path"]
        with Image.open(path) as image:
            assert (facts["format"], facts["width"], facts["height"], facts["mode"]) == (
                image.format,
                *image.size,
                image.mode,
            )
        assert facts["bytes"] == path.stat().st_size
        assert (facts["jpeg_quality"] is None) == (facts["format"] != "JPEG")
        long, short = max(facts["width"], facts["height"]), min(facts["width"], facts["height"])
        # Resize mode: bars; within a row of the stored ratio (a JPEG decoded reduced has its sides rounded up).
        assert facts["padding"] == pytest.approx(1 - round(short * 256 / long) / 256, abs=1 / 256)
    assert {m["file"]["format"] for m in samples} >= {"JPEG", "PNG", "GIF"}


def test_parity_reencodes_both_classes_and_predict_sees_the_same_pixels(synth_dir: Path, tmp_path: Path) -> None:
    plain, parity = (PackSettings(mode="crop", size=96, shard_size=64, parity=p) for p in ("none", "jpeg:60"))
    stored = {}
    for settings in (plain, parity):
        pack(synth_dir, tmp_path / settings.parity, settings, workers=2, progress=False)
        for shard in sorted((tmp_path / settings.parity).glob("*.tar")):
            for sample in wds.WebDataset(str(shard), shardshuffle=False):
                stored[(settings.parity, json.loads(sample["json"])["path"])] = sample["jpg"]
    assert manifest_of(tmp_path / "jpeg:60")["settings"]["parity"] == "jpeg:60"
    paths = sorted({path for _, path in stored})
    changed = [path for path in paths if stored[("none", path)] != stored[("jpeg:60", path)]]
    assert changed == paths  # every image of both classes went through the parity codec
    for path in ("real/img_000000.jpg", "fake/img_000001.jpg"):
        pixels = load_for_prediction(synth_dir / path, asdict(parity) | {"crop": None}).numpy()
        assert np.array_equal(pixels, decode_stored(stored[("jpeg:60", path)]))
    with pytest.raises(UserError, match="--parity jpeg:101"):
        PackSettings(parity="jpeg:101").validate()


def test_pack_is_identical_across_worker_counts_and_file_creation_order(
    synth_dir: Path, packed_dir: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "reordered"
    files = sorted(all_files(synth_dir), reverse=True)  # create the files in the opposite order
    for relpath in files:
        (copy / relpath).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(synth_dir / relpath, copy / relpath)
    pack(copy, tmp_path / "one", PackSettings(shard_size=SHARD_SIZE), workers=1, progress=False)
    reference, again = manifest_of(packed_dir), manifest_of(tmp_path / "one")
    assert [(s["name"], s["sha256"], s["paths"]) for s in again["shards"]] == [
        (s["name"], s["sha256"], s["paths"]) for s in reference["shards"]
    ]
    assert again["splits"] == reference["splits"] and again["skipped"] == reference["skipped"]


def test_kaggle_layout_keeps_its_own_test_split(synth_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "kaggle"
    images = sorted(p for p in all_files(synth_dir) if "/img_" in p)
    source_test = set(images[::4])
    for relpath in images:
        split = "test" if relpath in source_test else "train"
        (src / split / relpath).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(synth_dir / relpath, src / split / relpath)
    pack(src, tmp_path / "out", PackSettings(shard_size=SHARD_SIZE, folds=3), workers=2, progress=False)
    manifest = manifest_of(tmp_path / "out")
    test_paths = {p for s in manifest["shards"] if s["split"] == "test" for p in s["paths"]}
    assert test_paths == {f"test/{p}" for p in source_test}
    assert manifest["source"]["layout"] == "kaggle"
    assert set(manifest["splits"]) == {"test", "fold0", "fold1", "fold2"}


def test_interrupted_pack_resumes_to_the_same_result(synth_dir: Path, tmp_path: Path) -> None:
    options = ["--shard-size", "2", "--workers", "1"]
    reference = tmp_path / "reference"
    assert run_cli("pack", str(synth_dir), str(reference), *options).returncode == 0
    out = tmp_path / "interrupted"
    process = subprocess.Popen([sys.executable, "-m", "aidetect.cli", "pack", str(synth_dir), str(out), *options])
    deadline = time.monotonic() + 120
    while len(list(out.glob("*.tar"))) < 3 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "manifest.json").exists(), "pack finished before it could be interrupted"
    assert len(list(out.glob("*.tar"))) >= 3
    (out / "fold0-000000.tar.tmp").write_bytes(b"half a shard")  # what a kill mid-write leaves
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    result = run_cli("pack", str(synth_dir), str(out), *options)
    assert result.returncode == 0, result.stderr
    assert [s["sha256"] for s in manifest_of(out)["shards"]] == [s["sha256"] for s in manifest_of(reference)["shards"]]
    assert manifest_of(out) == manifest_of(reference) | {"source": manifest_of(out)["source"]}
    assert not list(out.glob("*.tmp")) and not (out / ".pack-state").exists()
    complete_before = [n for n, mtime in kept.items() if (out / n).stat().st_mtime_ns == mtime]
    assert complete_before, "complete shards were rewritten instead of kept"
    again = run_cli("pack", str(synth_dir), str(out), *options)  # a finished pack is left as it is
    assert again.returncode == 0 and manifest_of(out) == manifest_of(reference) | {"source": manifest_of(out)["source"]}


def test_a_signal_to_the_process_group_stops_pack_keeping_every_complete_shard(synth_dir: Path, tmp_path: Path) -> None:
    options = ["--shard-size", "2", "--workers", "2"]
    reference = tmp_path / "reference"
    assert run_cli("pack", str(synth_dir), str(reference), *options).returncode == 0
    out = tmp_path / "stopped"
    command = [sys.executable, "-m", "aidetect.cli", "pack", str(synth_dir), str(out), *options]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while len(list(out.glob("*.tar"))) < 3 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C on a terminal: the pool's workers get it too
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 3, stderr
    assert "every complete shard is kept" in stderr and "Traceback" not in stderr
    with pytest.raises(ProcessLookupError):  # no worker outlived the command
        os.killpg(process.pid, 0)
    assert not (out / "manifest.json").exists() and len(list(out.glob("*.tar"))) >= 3
    resumed = run_cli("pack", str(synth_dir), str(out), *options)
    assert resumed.returncode == 0, resumed.stderr
    assert [s["sha256"] for s in manifest_of(out)["shards"]] == [s["sha256"] for s in manifest_of(reference)["shards"]]


@pytest.mark.parametrize(
    ("make", "args", "message"),
    [
        (None, ["pack", "{tmp}/missing", "{tmp}/out"], "source folder not found"),
        ("empty", ["pack", "{tmp}/src", "{tmp}/out"], "needs both real/ and fake/"),
        ("empty_classes", ["pack", "{tmp}/src", "{tmp}/out"], "holds no files"),
        ("foreign_out", ["pack", "{synth}", "{tmp}/out"], "holds other data"),
        (None, ["pack", "{synth}", "{synth}/real/out"], "must lie outside the source folder"),
        (None, ["pack", "{synth}", "{tmp}/out", "--mode", "stretch"], "--mode must be one of"),
        (None, ["pack", "{synth}", "{tmp}/out", "--workers", "0"], "--workers must be at least 1"),
        (None, ["pack", "{synth}"], "the following arguments are required: out"),
        ("foreign_out", ["synth", "{tmp}/out"], "exists and is not empty"),
        (None, ["bench", "data", "--src", "{synth}"], "required: --shards"),
    ],
)
def test_cli_errors_are_one_clear_line(synth_dir: Path, tmp_path: Path, make, args, message) -> None:
    if make == "empty":
        (tmp_path / "src").mkdir()
    elif make == "empty_classes":
        for name in ("real", "fake"):
            (tmp_path / "src" / name).mkdir(parents=True)
    elif make == "foreign_out":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "notes.txt").write_text("mine")
    result = run_cli(*[a.format(tmp=tmp_path, synth=synth_dir) for a in args])
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert (tmp_path / "out" / "notes.txt").exists() or make != "foreign_out"  # nothing of the user's is touched


def test_changed_settings_refuse_to_mix_into_an_existing_pack(synth_dir: Path, packed_dir: Path) -> None:
    result = run_cli("pack", str(synth_dir), str(packed_dir), "--shard-size", str(SHARD_SIZE), "--size", "128")
    assert result.returncode == 2 and "other settings (size)" in result.stderr
