"""Calibration: ECE, NLL and Brier score on synthetic scores, temperature fitting, and a run that fits its
temperature, reports before and after it, and hands it to evaluate and predict."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.commands import run_cli
from helpers.plots import assert_png
from helpers.training import train_args

from aidetect.calibration import apply_temperature, brier, ece, fit_temperature, logits_of, nll
from aidetect.checkpoint import load_checkpoint, save_checkpoint


def drawn_from(logits: np.ndarray, seed: int = 0) -> np.ndarray:
    """Labels drawn with the probabilities ``sigmoid(logits)``: those probabilities are calibrated for them."""
    return (np.random.default_rng(seed).random(len(logits)) < apply_temperature(logits, None)).astype(np.int64)


def test_ece_is_near_zero_when_calibrated_and_large_when_over_confident() -> None:
    logits = np.random.default_rng(1).normal(0, 2, 50_000)
    labels = drawn_from(logits)
    assert ece(apply_temperature(logits, None), labels) < 0.01
    assert ece(apply_temperature(logits, 1 / 3), labels) > 0.1  # three times the logits: over-confident
    assert nll(apply_temperature(logits, 1 / 3), labels) > nll(apply_temperature(logits, None), labels)


def test_nll_and_brier_by_hand() -> None:
    probabilities, labels = np.array([0.9, 0.2, 0.6]), np.array([1, 0, 0])
    assert nll(probabilities, labels) == pytest.approx(-(np.log(0.9) + np.log(0.8) + np.log(0.4)) / 3)
    assert brier(probabilities, labels) == pytest.approx((0.01 + 0.04 + 0.36) / 3)


@pytest.mark.parametrize("temperature", [0.5, 2.5])
def test_the_fitted_temperature_recovers_the_one_the_logits_were_made_with(temperature: float) -> None:
    calibrated = np.random.default_rng(2).normal(0, 2, 20_000)
    labels = drawn_from(calibrated)
    assert fit_temperature(calibrated * temperature, labels) == pytest.approx(temperature, rel=0.05)


def test_a_run_calibrates_and_evaluate_and_predict_use_its_temperature(tiny_pack: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    trained = run_cli(*train_args(tiny_pack, run, "--epochs", "1", "--batch-size", "8"))
    assert trained.returncode == 0, trained.stderr[-2000:]
    tested = json.loads((run / "test_metrics.json").read_text())
    temperature = load_checkpoint(run / "best.pt").temperature
    assert temperature is not None and tested["calibrated"]["temperature"] == temperature
    assert {"ece", "nll", "brier"} <= set(tested) and {"ece", "nll", "brier"} <= set(tested["calibrated"])
    for key in ("accuracy", "balanced_accuracy", "auroc", "ap"):
        assert tested["intervals"][key][0] <= tested[key] <= tested["intervals"][key][1]
    assert all("intervals" in entry for entry in tested["per_source"]["sources"].values())
    assert_png(run / "test_reliability.png")
    assert "calibration: ECE" in trained.stdout

    evaluated = run_cli("evaluate", str(run / "best.pt"), "--data", str(tiny_pack), "--out", str(tmp_path / "eval"))
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    after = json.loads((tmp_path / "eval" / "eval_test.json").read_text())["calibrated"]
    assert after == pytest.approx(tested["calibrated"])

    manifest = json.loads((tiny_pack / "manifest.json").read_text())
    raw = Path(manifest["source"]["path"])
    files = [str(raw / path) for shard in manifest["shards"] if shard["split"] == "test" for path in shard["paths"]]
    stored = torch.load(run / "best.pt", weights_only=True)
    stored.pop("temperature")  # a checkpoint written before calibration still loads, without a temperature
    torch.save(stored, tmp_path / "older.pt")
    assert load_checkpoint(tmp_path / "older.pt").temperature is None
    best = load_checkpoint(run / "best.pt")  # the same model without a temperature and with T = 3
    save_checkpoint(tmp_path / "uncalibrated.pt", replace(best, temperature=None))
    save_checkpoint(tmp_path / "hotter.pt", replace(best, temperature=3.0))
    raw_rows = predicted_rows(tmp_path / "uncalibrated.pt", tmp_path, files)
    rows = predicted_rows(tmp_path / "hotter.pt", tmp_path, files, "--unsure", "0.3,0.7")
    probabilities = np.array([float(row["prob_fake"]) for row in rows])
    raw_probabilities = np.array([float(row["prob_fake"]) for row in raw_rows])
    assert probabilities == pytest.approx(apply_temperature(logits_of(raw_probabilities), 3.0), abs=1e-4)
    band = (probabilities >= 0.3) & (probabilities <= 0.7)
    assert band.any() and [row["label"] == "unsure" for row in rows] == band.tolist()
    assert [row["label"] for row in raw_rows] == ["fake" if p >= 0.5 else "real" for p in raw_probabilities]
    bad = run_cli("predict", str(run / "best.pt"), *files, "--unsure", "0.6,0.4")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--unsure" in bad.stderr


def predicted_rows(checkpoint: Path, tmp_path: Path, files: list[str], *options: str) -> list[dict[str, str]]:
    """The rows of ``aidetect predict`` with ``checkpoint`` on ``files``."""
    result = run_cli("predict", str(checkpoint), *files, "--csv", str(tmp_path / "p.csv"), *options)
    assert result.returncode == 0, result.stderr[-2000:]
    with (tmp_path / "p.csv").open() as f:
        return list(csv.DictReader(f))
