"""``evaluate --perturb`` and ``predict --perturb``: one tiny checkpoint, evaluated clean and degraded."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers.commands import run_cli, torchrun
from helpers.training import train_args

from aidetect.cli import main
from aidetect.data.degrade import Perturbation, jpeg
from aidetect.data.loader import build_loader
from aidetect.data.manifest import select_shards
from aidetect.data.shardfile import tar_samples
from aidetect.data.stored import decode_stored
from aidetect.inference import predict
from aidetect.robustness import DROP_KEYS

PERTURB = ["--perturb", "none", "jpeg:50", "blur:2", "downscale:0.5"]


@pytest.fixture(scope="module")
def checkpoint(tiny_pack: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("robustness") / "run"
    env = os.environ | {"WANDB_MODE": "disabled"}  # the checkpoint's config keeps wandb.mode unset
    result = run_cli(*train_args(tiny_pack, run, "--epochs", "1", "--batch-size", "8"), env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    return run / "best.pt"


def evaluate_args(checkpoint: Path, pack: Path, out: Path) -> list[str]:
    return ["evaluate", str(checkpoint), "--data", str(pack), "--out", str(out), *PERTURB]


@pytest.fixture(scope="module")
def single(checkpoint: Path, tiny_pack: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output folder of ``evaluate --perturb`` in one process."""
    out = tmp_path_factory.mktemp("single")
    result = run_cli(*evaluate_args(checkpoint, tiny_pack, out), env=os.environ | {"WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def test_the_report_holds_clean_and_every_perturbation_with_its_drops(single: Path) -> None:
    report = json.loads((single / "robustness.json").read_text())
    clean = report["clean"]
    assert report["split"] == "test" and clean == json.loads((single / "eval_test.json").read_text())
    assert list(report["perturbations"]) == ["none", "jpeg:50", "blur:2", "downscale:0.5"]
    assert report["perturbations"]["none"]["metrics"] == clean  # every metric and per_source, exactly
    for name, entry in report["perturbations"].items():
        metrics = entry["metrics"]
        assert Perturbation(entry["kind"], entry["strength"]).name == name
        assert entry["drop"] == {key: clean[key] - metrics[key] for key in DROP_KEYS}
        for source, drops in entry["per_source_drop"].items():
            before, after = clean["per_source"]["sources"][source], metrics["per_source"]["sources"][source]
            assert drops == {key: before[key] - after[key] for key in DROP_KEYS if key in before}
        assert set(entry["per_source_drop"]) == set(clean["per_source"]["sources"])
        assert (metrics["loss"] == clean["loss"]) == (name == "none")  # each degradation reached the model
    assert (single / "robustness.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    records = list(single.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(records) == 1
    assert b"robustness/table" in records[0].read_bytes() and b"robustness/plot" in records[0].read_bytes()


def test_the_loader_degrades_the_stored_image_and_nothing_else(tiny_pack: Path) -> None:
    def samples(degrade: Perturbation | None) -> list[tuple[Any, ...]]:
        loader = build_loader(tiny_pack, ["test"], batch_size=4, train=False, num_workers=0, degrade=degrade)
        return [  # (uint8 HWC image, label, key, source): what the workers batch
            (image.clone(), int(label), key, source)
            for images, labels, keys, sources in loader.uint8_batches()
            for image, label, key, source in zip(images, labels, keys, sources, strict=True)
        ]

    clean, degraded = samples(None), samples(Perturbation("jpeg", 50))
    assert [sample[1:] for sample in clean] == [sample[1:] for sample in degraded]  # labels, keys, sources
    assert all(not np.array_equal(a[0], b[0]) for a, b in zip(clean, degraded, strict=True))
    stored = next(tar_samples(select_shards(tiny_pack, ["test"])[0].path))  # exactly the perturbation:
    seen = next(image for image, _, key, _ in degraded if key == stored["__key__"])
    assert np.array_equal(seen.numpy(), jpeg(decode_stored(stored["jpg"]), 50))


def leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from leaves(item, f"{path}/{key}")
    else:
        yield path, value


def test_two_ranks_write_the_report_of_one(single: Path, checkpoint: Path, tiny_pack: Path, tmp_path: Path) -> None:
    result = torchrun(*evaluate_args(checkpoint, tiny_pack, tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    one = dict(leaves(json.loads((single / "robustness.json").read_text())))
    two = dict(leaves(json.loads((tmp_path / "robustness.json").read_text())))
    assert one.keys() == two.keys()
    for key, value in one.items():
        assert two[key] == (value if isinstance(value, str) else pytest.approx(value, abs=1e-6)), key
    assert len(list(tmp_path.glob("wandb/offline-run-*"))) == 1  # rank 0 alone logs


def test_predict_perturbs_the_raw_files(checkpoint: Path, tiny_pack: Path, tmp_path: Path) -> None:
    manifest = json.loads((tiny_pack / "manifest.json").read_text())
    raw = Path(manifest["source"]["path"])
    files = [str(raw / p) for s in manifest["shards"] if s["split"] == "test" for p in s["paths"]]
    predict(str(checkpoint), files, str(tmp_path / "clean.csv"))  # in this process: one start less
    result = run_cli("predict", str(checkpoint), *files, "--csv", str(tmp_path / "jpeg.csv"), "--perturb", "jpeg:50")
    assert result.returncode == 0, result.stderr[-2000:]
    clean, degraded = (list(csv.DictReader((tmp_path / f"{name}.csv").open())) for name in ("clean", "jpeg"))
    assert [(r["path"], r["error"]) for r in clean] == [(r["path"], r["error"]) for r in degraded]
    assert len(clean) == len(files) and not any(r["error"] for r in clean)
    assert any(a["prob_fake"] != b["prob_fake"] for a, b in zip(clean, degraded, strict=True))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["evaluate", "best.pt", "--data", "pack", "--perturb", "jpeg:101"], "'101' is not an integer quality"),
        (["evaluate", "best.pt", "--data", "pack", "--perturb", "sharpen:2"], "expected none, jpeg:Q"),
        (["evaluate", "best.pt", "--data", "pack", "--perturb"], "expected at least one argument"),
        (["predict", "best.pt", "a.jpg", "--perturb", "jpeg:50,30"], "predict takes one perturbation"),
    ],
)
def test_a_bad_perturbation_is_one_line_and_exit_code_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:  # in this process, as `python -m aidetect.cli` runs it: sys.exit(main())
        code = main(args)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    stderr = capsys.readouterr().err
    assert code == 2 and message in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1


def test_jpeg_augmentation_keeps_a_detector_working_under_compression(tmp_path: Path) -> None:
    """On ``synth --fragile`` (a trace JPEG q50 all but destroys), a model trained without augmentation
    loses more under ``--perturb jpeg:50`` than one trained on JPEG q30-60 copies (README figures).

    At this size (800 images, 5 epochs) the effect varies with the seed: over train seeds 0, 1, 2 the
    augmented drop was 0.35, 0.53 and 0.68 of the plain one; at ``data.jpeg_prob 0.5`` with the default
    q30-100 it was 0.72, 1.09 and 0.78, too close to tell from chance. The bound below holds for all three."""
    raw, pack = tmp_path / "raw", tmp_path / "pack"
    written = run_cli("synth", str(raw), "--fragile", "--n", "800", "--min-side", "64", "--max-side", "128")
    assert written.returncode == 0, written.stderr[-2000:]
    packed = run_cli("pack", str(raw), str(pack), "--mode", "crop", "--size", "48", "--shard-size", "100")
    assert packed.returncode == 0, packed.stderr[-2000:]
    drops = {}
    augmented = ["--set", "data.jpeg_prob=1.0", "--set", "data.jpeg_quality=[30,60]"]
    for name, extra in (("plain", []), ("augmented", augmented)):
        run = tmp_path / name
        args = ["train", "--config", "smoke", "--data", str(pack), "--out", str(run), "--epochs", "5", *extra]
        assert run_cli(*args, env=os.environ | {"WANDB_MODE": "disabled"}).returncode == 0
        evaluated = run_cli("evaluate", str(run / "best.pt"), "--data", str(pack), "--perturb", "jpeg:50")
        assert evaluated.returncode == 0, evaluated.stderr[-2000:]
        report = json.loads((run / "robustness.json").read_text())
        drops[name] = report["perturbations"]["jpeg:50"]["drop"]["auroc"]
        print(f"{name}: clean AUROC {report['clean']['auroc']:.3f}, AUROC drop under jpeg:50 {drops[name]:.3f}")
    assert drops["plain"] > 0.05 and drops["augmented"] < 0.75 * drops["plain"]
