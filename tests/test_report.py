"""Per-source plots, and the cross-validation summary of folds' per-source tables, on real metric files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers.plots import assert_png

from aidetect.cluster.report import cv_report, wandb_values
from aidetect.metrics import Predictions, compute_metrics, report_metrics
from aidetect.plots import report_plots


def predictions(seed: int, fakes: dict[str, int], reals: int = 8, sources: bool = True) -> Predictions:
    """``reals`` photos and, per generator, its number of fakes; fakes score higher but overlap the reals."""
    rng = np.random.default_rng(seed)
    names = ["photo"] * reals + [name for name, n in fakes.items() for _ in range(n)]
    labels = [0 if name == "photo" else 1 for name in names]
    probabilities = [float(rng.uniform(0.0, 0.7) if label == 0 else rng.uniform(0.3, 1.0)) for label in labels]
    return Predictions(
        probabilities=probabilities,
        labels=labels,
        keys=[f"{seed}-{index}" for index in range(len(names))],
        sources=names if sources else [],
        loss_sum=float(rng.uniform(1.0, 5.0)),
    )


def write_fold(run: Path, fold: int, predictions: Predictions, threshold: float | None = 0.4) -> dict:
    """A fold's ``test_metrics.json`` as training writes it (with intervals and the threshold keys), or as older
    runs wrote it (neither) when ``threshold`` is None."""
    metrics = compute_metrics(predictions) if threshold is None else report_metrics(predictions)
    if threshold is not None:
        at_threshold = compute_metrics(predictions, threshold)
        metrics |= {
            "val_threshold": threshold,
            "accuracy_at_val_threshold": at_threshold["accuracy"],
            "balanced_accuracy_at_val_threshold": at_threshold["balanced_accuracy"],
        }
    (run / f"fold{fold}").mkdir(parents=True)
    (run / f"fold{fold}" / "test_metrics.json").write_text(json.dumps(metrics))
    return metrics


def assert_mean_std(stats: dict, key: str, values: list[float]) -> None:
    """``stats["mean"][key]`` and ``stats["std"][key]`` are numpy's mean and sample std (ddof=1) of ``values``."""
    expected = np.array(values, dtype=float)
    assert stats["mean"][key] == pytest.approx(expected.mean())
    assert stats["std"][key] == pytest.approx(expected.std(ddof=1))


def test_per_source_tables_are_aggregated_across_folds(tmp_path: Path) -> None:
    run = tmp_path / "cv"
    generators = [{"sd": 6, "mj": 5}, {"sd": 7, "mj": 4}, {"sd": 5}]  # mj is missing from fold2's test split
    folds = [write_fold(run, k, predictions(k, fakes), threshold=0.35 + 0.05 * k) for k, fakes in enumerate(generators)]
    summary = cv_report(run)
    assert json.loads((run / "cv_summary.json").read_text())["per_source"] == summary["per_source"]
    table = summary["per_source"]
    assert table["n_folds"] == 3 and list(table["sources"]) == ["mj", "photo", "sd"]
    for name, entry in table["sources"].items():
        entries = [fold["per_source"]["sources"][name] for fold in folds if name in fold["per_source"]["sources"]]
        assert entry["folds"] == len(entries) == (2 if name == "mj" else 3)
        assert set(entry["mean"]) == set(entry["std"]) == set(entries[0]) - {"intervals"}
        for key in entry["mean"]:
            assert_mean_std(entry, key, [e[key] for e in entries])
        for key, bounds in entry["intervals"].items():  # each bound averaged over the folds
            assert bounds == pytest.approx(np.mean([e["intervals"][key] for e in entries], axis=0))
    for key in ("accuracy", "balanced_accuracy", "auroc", "ap"):
        assert summary["intervals"][key] == pytest.approx(np.mean([fold["intervals"][key] for fold in folds], axis=0))
    assert set(table["sources"]["sd"]["mean"]) == {"n", "accuracy", "fake_accuracy", "auroc", "ap"}
    assert set(table["sources"]["photo"]["mean"]) == {"n", "accuracy", "real_accuracy"}
    assert table["sources"]["sd"]["std"]["n"] == pytest.approx(1.0)  # 6, 7, 5 fakes
    for key in ("fake_accuracy_mean", "fake_accuracy_min"):
        assert_mean_std(table, key, [fold["per_source"][key] for fold in folds])
    for key in ("val_threshold", "accuracy_at_val_threshold", "balanced_accuracy_at_val_threshold"):
        assert_mean_std(summary, key, [fold[key] for fold in folds])
    values = wandb_values(summary)
    assert values["cv/per_source/mj/fake_accuracy/mean"] == table["sources"]["mj"]["mean"]["fake_accuracy"]
    assert values["cv/per_source/photo/real_accuracy/std"] == table["sources"]["photo"]["std"]["real_accuracy"]
    assert values["cv/per_source/fake_accuracy_min/mean"] == table["mean"]["fake_accuracy_min"]
    assert values["cv/mean/accuracy"] == summary["mean"]["accuracy"]
    assert_png(run / "cv_summary.png")
    assert_png(run / "cv_per_source.png")


def test_folds_without_a_per_source_table_are_skipped(tmp_path: Path) -> None:
    run = tmp_path / "cv"
    new = write_fold(run, 0, predictions(0, {"sd": 6, "mj": 5}))
    write_fold(run, 1, predictions(1, {"sd": 6}, sources=False), threshold=None)  # a run from before both
    summary = cv_report(run)
    assert summary["n_folds"] == 2 and summary["per_source"]["n_folds"] == 1
    sd = summary["per_source"]["sources"]["sd"]
    assert sd["folds"] == 1 and sd["mean"] | {"intervals": sd["intervals"]} == new["per_source"]["sources"]["sd"]
    assert set(sd["std"].values()) == {0.0}
    assert "val_threshold" not in summary["mean"] and "accuracy" in summary["mean"]
    assert_png(run / "cv_per_source.png")

    old = tmp_path / "old"
    for fold in range(2):
        write_fold(old, fold, predictions(fold, {"sd": 6}, sources=False), threshold=None)
    summary = cv_report(old)
    assert "per_source" not in summary and not (old / "cv_per_source.png").exists()
    assert not any(key.startswith("cv/per_source") for key in wandb_values(summary))
    assert_png(old / "cv_summary.png")


@pytest.mark.parametrize("generators", [1, 19])
def test_report_plots_writes_the_per_source_plot(tmp_path: Path, generators: int) -> None:
    with_sources = predictions(0, {f"generator-{k}": 3 for k in range(generators)})
    paths = report_plots(with_sources, report_metrics(with_sources), tmp_path, "test")  # bars with intervals
    assert paths["per_source"] == tmp_path / "test_per_source.png"
    assert_png(paths["per_source"])
    without = predictions(0, {"sd": 3}, sources=False)
    assert "per_source" not in report_plots(without, compute_metrics(without), tmp_path, "old")
    assert not (tmp_path / "old_per_source.png").exists()
