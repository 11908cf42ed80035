"""The shortcut audit on real packs: synthetic classes that differ in metadata the way the Kaggle set's
do, classes that do not, and a pack whose settings neutralise part of the difference."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers.commands import run_cli
from PIL import Image

from aidetect.data.pack import PackSettings, pack
from aidetect.data.synth import synth


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("audit")
    for name, shortcuts in (("plain", False), ("shortcuts", True)):
        synth(root / name, n=240, seed=2, workers=2, min_side=96, max_side=320, shortcuts=shortcuts)
    return {"plain": root / "plain", "shortcuts": root / "shortcuts", "root": root}


def packed(raw: dict[str, Path], name: str, **settings) -> Path:
    out = raw["root"] / f"{name}-{'-'.join(f'{k}{v}' for k, v in settings.items())}"
    defaults = {"size": 64, "test_fraction": 0.3, "folds": 3, "shard_size": 64}
    pack(raw[name], out, PackSettings(**(defaults | settings)), workers=2, progress=False)
    return out


def audit_cli(shards: Path) -> tuple[dict, str]:
    result = run_cli("audit", str(shards))
    assert result.returncode == 0, result.stderr[-2000:]
    with Image.open(shards / "audit.png") as plot:
        plot.verify()
    return json.loads((shards / "audit.json").read_text()), result.stdout


def test_metadata_shortcuts_are_found_named_and_warned_about(raw: dict[str, Path]) -> None:
    shards = packed(raw, "shortcuts")
    report, printed = audit_cli(shards)
    assert report["metadata_auroc"] >= 0.95
    features = report["features"]
    assert features["format"]["auroc"] >= 0.95 and features["format"]["exposure"] == "reaches"
    assert features["padding"]["exposure"] == "reaches"  # resize mode: the square fakes get no bars
    assert "WARNING: shortcut" in printed and "format 1.00" in report["warning"]
    assert "--parity jpeg:95" in report["warning"] and "--mode crop" in report["warning"]
    confined = {(row["feature"], str(row["value"])): row["class"] for row in report["confined"]}
    assert confined[("format", "PNG")] == "fake" and confined[("format", "JPEG")] == "real"
    assert report["sources"] == json.loads((shards / "manifest.json").read_text())["sources"]


def test_classes_that_share_metadata_stay_near_chance_without_a_warning(raw: dict[str, Path]) -> None:
    report, printed = audit_cli(packed(raw, "plain"))
    assert 0.3 <= report["metadata_auroc"] <= 0.7, report["metadata_auroc"]
    assert report["warning"] is None and "WARNING" not in printed
    assert report["confined"] == []


def test_parity_and_crop_are_reported_as_neutralising_codec_and_padding(raw: dict[str, Path]) -> None:
    report, printed = audit_cli(packed(raw, "shortcuts", mode="crop", parity="jpeg:95"))
    features = report["features"]
    for name in ("format", "jpeg_quality", "subsampling", "aspect", "padding"):
        assert features[name]["exposure"] == "neutralised", name
    assert "--parity jpeg:95" in features["format"]["why"] and "--mode crop" in features["padding"]["why"]
    assert features["width"]["exposure"] == "reaches"  # fixed square sizes still set the content's scale
    assert "Neutralised by this pack's settings: format" in report["warning"]
    assert "Still reaching the model: " in report["warning"] and "--parity" not in report["warning"].split("Try")[-1]
    assert "neutralised" in printed


def test_train_puts_the_warning_in_its_log_and_in_wandb_once(raw: dict[str, Path], tmp_path: Path) -> None:
    shards = packed(raw, "shortcuts", mode="crop", size=48)
    out = tmp_path / "run"
    args = ["train", "--config", "smoke", "--data", str(shards), "--out", str(out), "--epochs", "1"]
    result = run_cli(*args, env=os.environ | {"WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("WARNING: shortcut") == 1
    assert "shortcut audit: a metadata-only baseline reaches test AUROC" in result.stdout
    logged = next(out.glob("wandb/offline-run-*/run-*.wandb")).read_bytes()
    assert b"audit/warning" in logged and b"audit/metadata_auroc" in logged
