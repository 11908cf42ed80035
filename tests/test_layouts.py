"""The source layouts pack reads (GenImage, Synthbuster, CSV lists; ImageFolder and Kaggle in test_pack.py):
real image files packed, each sample's class, source and split read back from the shards."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from helpers.commands import run_cli
from PIL import Image

from aidetect.data.layouts import detect_layout
from aidetect.data.manifest import chrono_windows, read_manifest, sample_records
from aidetect.data.pack import PackSettings, pack
from aidetect.errors import UserError

SETTINGS = PackSettings(mode="crop", size=32, shard_size=8, folds=2)


def write_images(root: Path, relpaths: list[str]) -> None:
    """A small noise PNG at each path under ``root``."""
    rng = np.random.default_rng(len(relpaths))
    for relpath in relpaths:
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)


def packed(src: Path, out: Path, settings: PackSettings = SETTINGS) -> tuple[dict, dict[str, dict]]:
    """The manifest of ``src`` packed into ``out``, and every sample's record by its path."""
    manifest = pack(src, out, settings, workers=1, progress=False)
    return manifest, {r["path"]: r for r in sample_records(out)}


def genimage_tree(root: Path) -> list[str]:
    files = [
        f"{gen}/{split}/{kind}/{i}.png"
        for gen in ("sdv14", "biggan")
        for split in ("train", "val")
        for kind in ("ai", "nature")
        for i in range(3)
    ]
    write_images(root, files)
    return files


def test_genimage_generators_are_sources_and_val_is_the_test_split(tmp_path: Path) -> None:
    files = genimage_tree(tmp_path / "genimage")
    manifest, records = packed(tmp_path / "genimage", tmp_path / "out")
    assert manifest["source"]["layout"] == "genimage" and set(records) == set(files)
    for path, record in records.items():
        generator, split, kind, _ = path.split("/")
        assert record["class"] == {"ai": "fake", "nature": "real"}[kind]
        assert record["source"] == (generator if kind == "ai" else "nature")
        assert (record["split"] == "test") == (split == "val")
    assert sorted(manifest["sources"]["fake"]) == ["biggan", "sdv14"]
    assert list(manifest["sources"]["real"]) == ["nature"]


@pytest.mark.parametrize("real", ["RAISE", "real"])
def test_synthbuster_folders_beside_the_real_one_are_generators(tmp_path: Path, real: str) -> None:
    files = [f"{real}/{i}.png" for i in range(6)] + ["dalle2/a.png", "dalle2/b.png", "midjourney/v5/c.png"]
    write_images(tmp_path / "sb", [*files, "notes.png"])
    manifest, records = packed(tmp_path / "sb", tmp_path / "out")
    assert manifest["source"]["layout"] == "synthbuster" and set(records) == set(files)
    assert {p: (r["class"], r["source"]) for p, r in records.items()} == {
        p: ("real", real) if p.startswith(real) else ("fake", p.split("/")[0]) for p in files
    }
    reason = "not inside a class folder (a real or generator folder)"
    assert manifest["skipped"] == [{"path": "notes.png", "reason": reason}]


def test_a_csv_list_packs_relative_and_absolute_paths_with_labels_splits_and_dates(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_images(data, ["r/1.png", "r/2.png", "r/3.png", "f/sd.png", "f/mj.png", "f/mj2.png"])
    write_images(tmp_path / "elsewhere", ["x.png"])
    rows = [
        "path,label,source,split,date",
        "r/1.png,real,photos,,",
        "r/2.png,0,photos,test,",
        "./r/3.png,REAL,,train,",
        "f/sd.png,fake,sd,test,2022-08",
        "f/mj.png,1,mj,,2022-07-12",
        "f/mj2.png,1,mj,,",
        f"{tmp_path / 'elsewhere' / 'x.png'},fake,sd,,",
        "f/gone.png,fake,sd,,",
    ]
    (data / "list.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "dates.yaml").write_text("sd: 2022-08\ndalle: 2022-04-06\nphotos: 2000-01\n")
    settings = PackSettings(mode="crop", size=32, folds=2, source_dates=str(tmp_path / "dates.yaml"))
    manifest, records = packed(data / "list.csv", tmp_path / "out", settings)
    absolute = (tmp_path / "elsewhere" / "x.png").as_posix()
    assert manifest["source"]["layout"] == "csv"
    assert {p: (r["class"], r["source"]) for p, r in records.items()} == {
        "r/1.png": ("real", "photos"),
        "r/2.png": ("real", "photos"),
        "r/3.png": ("real", "real"),
        "f/sd.png": ("fake", "sd"),
        "f/mj.png": ("fake", "mj"),
        "f/mj2.png": ("fake", "mj"),
        absolute: ("fake", "sd"),
    }
    assert {p for p, r in records.items() if r["split"] == "test"} == {"r/2.png", "f/sd.png"}
    assert manifest["skipped"] == [{"path": "f/gone.png", "reason": "not found (listed on line 9 of list.csv)"}]
    assert manifest["source_dates"] == {"mj": "2022-07-12", "photos": "2000-01", "sd": "2022-08"}


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("a.png,maybe", "line 3: label 'maybe' is none of real, fake, 0, 1"),
        ("a.png,fake,sd,,2022-13-01", "line 3: date '2022-13-01' is not a date YYYY-MM-DD or YYYY-MM"),
        ("a.png,fake,sd,,last year", "line 3: date 'last year' is not a date"),
        ("a.png,fake,sd,val,", "line 3: split 'val' is neither test nor train"),
        ("b.png,fake,sd,,2022-01", "line 3: lists b.png a second time"),
        ("a.png,fake,sd,,2022-02", "line 3: gives source sd the date 2022-02, elsewhere 2022-01"),
    ],
)
def test_bad_csv_rows_are_one_line_naming_the_line(tmp_path: Path, row: str, message: str) -> None:
    write_images(tmp_path, ["a.png", "b.png"])
    (tmp_path / "list.csv").write_text(f"path,label,source,split,date\nb.png,fake,sd,,2022-01\n{row}\n")
    with pytest.raises(UserError, match="list.csv: " + message.replace("(", r"\(")):
        pack(tmp_path / "list.csv", tmp_path / "out", SETTINGS, workers=1, progress=False)


def test_a_list_that_is_no_utf8_csv_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "list.csv").write_bytes(b"path,label\na.png,real\n\xff\xfe.png,fake\n")
    with pytest.raises(UserError, match=r"list\.csv: not a UTF-8 CSV, near line"):
        pack(tmp_path / "list.csv", tmp_path / "out", SETTINGS, workers=1, progress=False)


def test_cli_reports_the_layout_it_found_and_rejects_unknown_trees(tmp_path: Path) -> None:
    genimage_tree(tmp_path / "genimage")
    found = run_cli("pack", str(tmp_path / "genimage"), str(tmp_path / "out"), "--mode", "crop", "--size", "32")
    assert found.returncode == 0, found.stderr
    assert f"pack: {tmp_path / 'genimage'} is a genimage layout" in found.stdout
    write_images(tmp_path / "odd", ["photos/a.png", "renders/b.png"])
    refused = run_cli("pack", str(tmp_path / "odd"), str(tmp_path / "out2"))
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert f"{tmp_path / 'odd'}: matches no layout pack reads" in refused.stderr
    assert "genimage: SRC/GENERATOR/{train,val}/{ai,nature}/" in refused.stderr
    assert "found folders: photos, renders" in refused.stderr


@pytest.mark.parametrize(
    ("files", "layout"),
    [
        (["real/a.png", "fake/sd/b.png"], "imagefolder"),
        (["train/real/a.png", "train/fake/b.png", "test/real/c.png"], "kaggle"),
        (["sd/train/ai/a.png", "sd/val/nature/b.png"], "genimage"),
        (["RAISE/a.png", "sd/b.png"], "synthbuster"),
    ],
)
def test_auto_detection_names_each_layout(tmp_path: Path, files: list[str], layout: str) -> None:
    write_images(tmp_path / "src", files)
    assert detect_layout(tmp_path / "src") == layout


def test_ambiguous_trees_and_a_wrong_layout_are_refused(tmp_path: Path) -> None:
    write_images(tmp_path / "src", ["RAISE/a.png", "sd/train/ai/b.png"])
    with pytest.raises(UserError, match=r"matches several layouts \(genimage, synthbuster\); choose one with --layout"):
        detect_layout(tmp_path / "src")
    with pytest.raises(UserError, match="is no imagefolder layout \\(SRC/real/ and SRC/fake/\\)"):
        pack(tmp_path / "src", tmp_path / "out", PackSettings(layout="imagefolder"), workers=1, progress=False)
    write_images(tmp_path / "lone", ["real/a.png"])  # an ImageFolder lacking fake/, not a Synthbuster tree
    with pytest.raises(UserError, match="needs both real/ and fake/ class folders"):
        pack(tmp_path / "lone", tmp_path / "out", workers=1, progress=False)
    settings = PackSettings(mode="crop", size=32, layout="genimage")
    manifest, records = packed(tmp_path / "src", tmp_path / "out", settings)
    assert manifest["source"]["layout"] == "genimage" and list(records) == ["sd/train/ai/b.png"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["settings"]["layout"] == "genimage"


def test_dates_given_later_are_recorded_without_packing_again(tmp_path: Path) -> None:
    genimage_tree(tmp_path / "genimage")
    out = tmp_path / "out"
    pack(tmp_path / "genimage", out, SETTINGS, workers=1, progress=False)
    with pytest.raises(UserError, match="no release date for fake source biggan, sdv14; pack again with --source"):
        chrono_windows(out, 1)
    written = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    dates = tmp_path / "dates.csv"
    dates.write_text("source,date\nsdv14,22-08\n")
    with pytest.raises(UserError, match=r"dates\.csv: line 2: date '22-08' is not a date YYYY-MM-DD or YYYY-MM"):
        pack(tmp_path / "genimage", out, replace(SETTINGS, source_dates=str(dates)), workers=1, progress=False)
    dates.write_text("source,date\nsdv14,2022-08-22\nbiggan,2018-09\nunused,2020-01\n")
    again = pack(tmp_path / "genimage", out, replace(SETTINGS, source_dates=str(dates)), workers=1, progress=False)
    assert "run" not in again and read_manifest(out)["source_dates"] == {"biggan": "2018-09", "sdv14": "2022-08-22"}
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == written
    assert chrono_windows(out, 1) == [["biggan"], ["sdv14"]]
