"""Metrics researchers report, computed by hand on small predictions; model selection and the threshold."""

from __future__ import annotations

import pytest

from aidetect.metrics import Predictions, compute_metrics, is_better, val_threshold


def test_per_class_accuracies_and_counts_by_hand() -> None:
    # 3 reals (one called fake), 5 fakes (two called real)
    predictions = Predictions([0.1, 0.2, 0.7, 0.9, 0.8, 0.6, 0.4, 0.3], [0, 0, 0, 1, 1, 1, 1, 1])
    metrics = compute_metrics(predictions)
    assert (metrics["real"], metrics["fake"]) == (3, 5)
    assert metrics["real_accuracy"] == pytest.approx(2 / 3) and metrics["fake_accuracy"] == pytest.approx(3 / 5)
    assert metrics["balanced_accuracy"] == pytest.approx((2 / 3 + 3 / 5) / 2)
    assert metrics["accuracy"] == pytest.approx(5 / 8)  # the pooled figure hides the class imbalance


def test_the_validation_threshold_maximises_balanced_accuracy() -> None:
    # Every fake scores 0.3-0.45, every real below: 0.5 calls all fakes real; a lower threshold separates them.
    predictions = Predictions([0.05, 0.1, 0.2, 0.3, 0.35, 0.45], [0, 0, 0, 1, 1, 1])
    threshold = val_threshold(predictions)
    assert 0.2 < threshold <= 0.3
    assert compute_metrics(predictions, threshold)["balanced_accuracy"] == 1.0
    assert compute_metrics(predictions)["balanced_accuracy"] == 0.5
    assert val_threshold(Predictions([0.2, 0.9], [1, 1])) == 0.5  # one class only: nothing to choose


def test_a_perfectly_separated_validation_set_gives_the_midpoint_of_the_gap() -> None:
    # Every threshold in (0.3, 0.9] separates perfectly: the middle of that range, not its edge (0.9).
    predictions = Predictions([0.1, 0.3, 0.2, 0.95, 0.9, 0.99], [0, 0, 0, 1, 1, 1])
    assert val_threshold(predictions) == pytest.approx((0.3 + 0.9) / 2)


def test_ties_on_the_best_metric_go_to_the_lower_validation_loss() -> None:
    assert is_better("auroc", 1.0, None, loss=0.3, best_loss=None)
    assert is_better("auroc", 1.0, 1.0, loss=0.1, best_loss=0.3)  # same AUROC, better calibrated: later epoch
    assert not is_better("auroc", 1.0, 1.0, loss=0.4, best_loss=0.3)
    assert not is_better("auroc", 0.99, 1.0, loss=0.01, best_loss=0.3)  # the metric comes first
    assert is_better("loss", 0.2, 0.3, loss=0.2, best_loss=0.3)


def test_per_source_breakdown_by_hand() -> None:
    # sd: 2 fakes, both caught; mj: 2 fakes, one missed and scored below one real; photo: 3 reals, one called fake.
    predictions = Predictions(
        probabilities=[0.9, 0.8, 0.6, 0.15, 0.1, 0.2, 0.7],
        labels=[1, 1, 1, 1, 0, 0, 0],
        sources=["sd", "sd", "mj", "mj", "photo", "photo", "photo"],
    )
    table = compute_metrics(predictions)["per_source"]
    assert table["sources"]["sd"] == {"n": 2, "accuracy": 1.0, "fake_accuracy": 1.0, "auroc": 1.0, "ap": 1.0}
    mj = table["sources"]["mj"]
    assert (mj["n"], mj["fake_accuracy"]) == (2, 0.5)
    # mj against the 3 reals: 0.6 beats 2 of 3 reals, 0.15 beats 1 of 3 -> AUROC (2 + 1) / 6
    assert mj["auroc"] == pytest.approx(3 / 6)
    photo = table["sources"]["photo"]
    assert photo == {"n": 3, "accuracy": pytest.approx(2 / 3), "real_accuracy": pytest.approx(2 / 3)}
    assert (table["fake_accuracy_mean"], table["fake_accuracy_min"]) == (0.75, 0.5)
