"""Bootstrap intervals on synthetic scores: exact resampled metrics, seeded, stratified, narrower with more
samples; the per-source table with its intervals and its flag for small sources."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from aidetect.intervals import bootstrap_intervals, counts_of, drawn, stratified_resamples, subset_metrics
from aidetect.metrics import FEW_IMAGES, Predictions, format_per_source, report_metrics


def scores(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` labels (a third fake) and overlapping scores rounded to 2 places (ties between the classes)."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 1 / 3).astype(np.int64)
    return np.round(np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0, 1), 2), labels


def test_each_resample_keeps_the_class_counts_and_its_metrics_are_scikit_learns() -> None:
    values, labels = scores(300)
    indices = stratified_resamples(labels, 5, np.random.default_rng(1))
    assert ((labels[indices] == 1).sum(axis=1) == labels.sum()).all()
    assert ((labels[indices] == 0).sum(axis=1) == (labels == 0).sum()).all()
    block = drawn(values, labels, counts_of(indices, len(labels)))
    correct = ((values >= 0.5) == (labels == 1)).astype(float)
    resampled = subset_metrics(block, values, labels, correct, np.ones(len(labels), dtype=bool))
    for row, chosen in enumerate(indices):
        assert resampled["auroc"][row] == pytest.approx(roc_auc_score(labels[chosen], values[chosen]))
        assert resampled["ap"][row] == pytest.approx(average_precision_score(labels[chosen], values[chosen]))
        assert resampled["accuracy"][row] == pytest.approx(correct[chosen].mean())


def test_intervals_hold_the_point_estimate_are_seeded_and_narrow_with_more_samples() -> None:
    values, labels = scores(400)
    found = bootstrap_intervals(values, labels)["overall"]
    point = {"auroc": roc_auc_score(labels, values), "ap": average_precision_score(labels, values)}
    point["accuracy"] = np.mean((values >= 0.5) == (labels == 1))
    for key, value in point.items():
        assert found[key][0] < value < found[key][1]
    assert bootstrap_intervals(values, labels) == {"overall": found}
    assert bootstrap_intervals(values, labels, seed=1)["overall"] != found
    more = bootstrap_intervals(*scores(4000))["overall"]
    for key in ("accuracy", "balanced_accuracy", "auroc", "ap"):
        assert more[key][1] - more[key][0] < (found[key][1] - found[key][0]) / 2  # about 1/sqrt(10) as wide


def test_a_proportion_gets_the_95_percent_interval_of_its_standard_error() -> None:
    correct = np.random.default_rng(3).random(2000) < 0.8  # 2000 fakes, about 80 % called fake
    low, high = bootstrap_intervals(np.where(correct, 0.9, 0.1), np.ones(2000))["overall"]["fake_accuracy"]
    share = correct.mean()
    assert high - low == pytest.approx(2 * 1.96 * np.sqrt(share * (1 - share) / 2000), rel=0.1)


def test_the_per_source_table_shows_intervals_and_flags_a_source_with_few_images() -> None:
    values, labels = scores(300)
    sources = np.where(labels == 0, "photo", "sd").astype(object)
    sources[np.flatnonzero(labels == 1)[: FEW_IMAGES - 1]] = "rare"
    metrics = report_metrics(Predictions(values.tolist(), labels.tolist(), sources=sources.tolist()))
    table = metrics["per_source"]["sources"]
    assert set(table["rare"]["intervals"]) == {"accuracy", "fake_accuracy", "auroc", "ap"}
    lines = format_per_source(metrics["per_source"]).splitlines()
    flagged = [line.split()[0] for line in lines[1:4]]
    assert flagged == ["photo", "rare*", "sd"]  # sd has more than FEW_IMAGES fakes, photo more reals
    assert lines[4].startswith(f"* fewer than {FEW_IMAGES} images")
    low, high = table["sd"]["intervals"]["auroc"]
    assert f"{table['sd']['auroc']:.4f} [{low:.3f}, {high:.3f}]" in lines[3]
