"""Binary classification metrics from every rank's predictions (positive class = fake = 1).

Predictions are gathered from all ranks before anything is computed, so a metric under DDP is the
metric of the whole split, never of rank 0's share. AUROC, AP and the curves come from scikit-learn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from aidetect.calibration import apply_temperature, calibration_metrics, format_calibration, logits_of
from aidetect.distributed import all_gather_objects
from aidetect.intervals import LEVEL, RESAMPLES, SEED, bootstrap_intervals

METRIC_KEYS = (
    "accuracy",
    "balanced_accuracy",
    "real_accuracy",
    "fake_accuracy",
    "precision",
    "recall",
    "f1",
    "auroc",
    "ap",
    "loss",
    "ece",
    "nll",
    "brier",
    "tp",
    "fp",
    "tn",
    "fn",
    "real",
    "fake",
)

# per-source metric -> column title in format_per_source
PER_SOURCE_COLUMNS = {
    "n": "n",
    "accuracy": "accuracy",
    "fake_accuracy": "fake acc",
    "real_accuracy": "real acc",
    "auroc": "AUROC",
}
# A source with fewer test images than this is flagged in format_per_source: its figures are noisy.
FEW_IMAGES = 30
INTERVAL_METHOD = (
    f"{LEVEL:.0%} percentile, {RESAMPLES} bootstrap resamples stratified by class (and source), seed {SEED}"
)


@dataclass
class Predictions:
    """One rank's share of an evaluation: probabilities of fake (and the logits they are the sigmoid of),
    labels, summed loss, sample keys."""

    probabilities: list[float] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    logits: list[float] = field(default_factory=list)
    loss_sum: float = 0.0

    def gather(self) -> Predictions:
        merged = Predictions()
        for part in all_gather_objects(self):
            merged.probabilities += part.probabilities
            merged.logits += part.logits
            merged.labels += part.labels
            merged.keys += part.keys
            merged.sources += part.sources
            merged.loss_sum += part.loss_sum
        return merged


def compute_metrics(predictions: Predictions, threshold: float = 0.5) -> dict[str, float]:
    probabilities = np.asarray(predictions.probabilities, dtype=np.float64)
    labels = np.asarray(predictions.labels, dtype=np.int64)
    predicted = probabilities >= threshold
    tp = int(np.sum(predicted & (labels == 1)))
    fp = int(np.sum(predicted & (labels == 0)))
    tn = int(np.sum(~predicted & (labels == 0)))
    fn = int(np.sum(~predicted & (labels == 1)))
    total = max(len(labels), 1)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    real_accuracy = tn / (tn + fp) if tn + fp else float("nan")  # true negative rate
    fake_accuracy = recall if tp + fn else float("nan")  # true positive rate
    both_classes = len(set(labels.tolist())) == 2
    return {
        "accuracy": (tp + tn) / total,
        "balanced_accuracy": (real_accuracy + fake_accuracy) / 2,
        "real_accuracy": real_accuracy,
        "fake_accuracy": fake_accuracy,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "auroc": float(roc_auc_score(labels, probabilities)) if both_classes else float("nan"),
        "ap": float(average_precision_score(labels, probabilities)) if both_classes else float("nan"),
        "loss": predictions.loss_sum / total,
        **(calibration_metrics(probabilities, labels) if len(labels) else {}),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "real": tn + fp,
        "fake": tp + fn,
        "samples": len(labels),
    } | ({"per_source": per_source(predictions, threshold)} if predictions.sources else {})


def per_source(predictions: Predictions, threshold: float = 0.5) -> dict[str, Any]:
    """Each source's n and accuracy; for a fake source (a generator) its fake accuracy, and AUROC/AP against
    every real sample of the split, the protocol of per-generator tables; for a real source its real
    accuracy. Then the mean and the minimum over fake sources, where a detector's weakness shows."""
    probabilities = np.asarray(predictions.probabilities, dtype=np.float64)
    labels = np.asarray(predictions.labels, dtype=np.int64)
    sources = np.asarray(predictions.sources)
    reals = labels == 0
    table: dict[str, dict[str, float]] = {}
    for source in sorted(set(predictions.sources)):
        mask = sources == source
        correct = (probabilities[mask] >= threshold) == (labels[mask] == 1)
        entry = {"n": int(mask.sum()), "accuracy": float(correct.mean())}
        if np.any(labels[mask] == 1):
            entry["fake_accuracy"] = float(correct[labels[mask] == 1].mean())
            versus = (mask & (labels == 1)) | reals
            if reals.any():
                entry["auroc"] = float(roc_auc_score(labels[versus], probabilities[versus]))
                entry["ap"] = float(average_precision_score(labels[versus], probabilities[versus]))
        if np.any(labels[mask] == 0):
            entry["real_accuracy"] = float(correct[labels[mask] == 0].mean())
        table[source] = entry
    fake = [entry["fake_accuracy"] for entry in table.values() if "fake_accuracy" in entry]
    summary = {"fake_accuracy_mean": float(np.mean(fake)), "fake_accuracy_min": float(np.min(fake))} if fake else {}
    return {"sources": table} | summary


def report_metrics(predictions: Predictions, threshold: float = 0.5, temperature: float | None = None) -> dict:
    """``compute_metrics`` as a report shows it (test_metrics.json, eval_SPLIT.json, robustness.json): with
    ``intervals``, the bootstrap intervals overall (``aidetect.intervals``; ``interval_method`` says how they
    were made), ``intervals`` in each per-source entry (of the keys the entry has), and with a ``temperature``
    the ``calibrated`` block (``calibrated``)."""
    metrics = compute_metrics(predictions, threshold)
    labels = np.asarray(predictions.labels, dtype=np.int64)
    sources = predictions.sources or None
    found = bootstrap_intervals(predictions.probabilities, labels, threshold, sources)
    metrics |= {"intervals": found.get("overall", {}), "interval_method": INTERVAL_METHOD}
    for name, entry in metrics.get("per_source", {}).get("sources", {}).items():
        entry["intervals"] = {key: value for key, value in found["per_source"][name].items() if key in entry}
    if temperature is not None:
        metrics["calibrated"] = calibrated(predictions, temperature)
    return metrics


def calibrated(predictions: Predictions, temperature: float) -> dict[str, float]:
    """``{"temperature", "ece", "nll", "brier"}`` of the predictions scaled by ``temperature``
    (``calibration.apply_temperature`` of their logits). The rest of the metrics are those of the unscaled
    predictions: a temperature moves no score across 0.5 and keeps their order."""
    probabilities = apply_temperature(logits(predictions), temperature)
    return {"temperature": temperature} | calibration_metrics(probabilities, predictions.labels)


def logits(predictions: Predictions) -> np.ndarray:
    """The predictions' logits: as the model gave them, or (predictions made without) from the probabilities."""
    return np.asarray(predictions.logits) if predictions.logits else logits_of(predictions.probabilities)


def curves(predictions: Predictions) -> dict[str, np.ndarray]:
    labels, probabilities = np.asarray(predictions.labels), np.asarray(predictions.probabilities)
    fpr, tpr, _ = roc_curve(labels, probabilities)
    precision, recall, _ = precision_recall_curve(labels, probabilities)
    return {"fpr": fpr, "tpr": tpr, "precision": precision, "recall": recall}


def val_threshold(predictions: Predictions) -> float:
    """The decision threshold (fake when p >= threshold) that maximises balanced accuracy on these
    (validation) predictions, chosen on validation and applied to test: the test split never picks it.

    Every threshold in (u[k-1], u[k]] (u: the sorted distinct scores, with 0 below and 1 above them) makes
    the same decisions; the best value is reached on one or more runs of such intervals, and the threshold is
    the middle of the run nearest 0.5, never its edge: a validation fold that separates perfectly gives the
    midpoint between its highest real and its lowest fake score. O(n log n): every candidate is scored by
    binary search."""
    probabilities = np.asarray(predictions.probabilities, dtype=np.float64)
    labels = np.asarray(predictions.labels, dtype=np.int64)
    fakes, reals = np.sort(probabilities[labels == 1]), np.sort(probabilities[labels == 0])
    if not len(fakes) or not len(reals):
        return 0.5
    scores = np.unique(probabilities)
    edges = np.concatenate([[min(0.0, scores[0])], scores, [max(1.0, np.nextafter(scores[-1], np.inf))]])
    candidates = edges[1:]  # candidate k decides as every threshold in (edges[k], edges[k + 1]]
    fake_accuracy = (len(fakes) - np.searchsorted(fakes, candidates, side="left")) / len(fakes)
    real_accuracy = np.searchsorted(reals, candidates, side="left") / len(reals)
    balanced = (fake_accuracy + real_accuracy) / 2
    best = np.flatnonzero(balanced == balanced.max())
    breaks = np.flatnonzero(np.diff(best) > 1)
    low, high = edges[best[np.append(0, breaks + 1)]], edges[best[np.append(breaks, -1)] + 1]
    distance = np.maximum(np.maximum(low - 0.5, 0.5 - high), 0.0)  # 0 for the run whose range holds 0.5
    run = np.argmin(distance)
    return float((low[run] + high[run]) / 2)


def is_better(metric: str, value: float, best: float | None, loss: float, best_loss: float | None) -> bool:
    """Whether an epoch with ``value`` of ``metric`` (and validation ``loss``) beats the best so far. A tie
    on the metric (e.g. AUROC 1.0 at several epochs) goes to the lower validation loss, never to the
    earlier epoch by default."""
    if best is None or np.isnan(best):
        return not np.isnan(value)
    if value == best:
        return best_loss is not None and loss < best_loss
    return value < best if metric == "loss" else value > best


def format_per_source(per_source: dict[str, Any]) -> str:
    """A metrics dict's ``per_source`` as an aligned text table: one line per source (n, accuracy, and its
    fake or real accuracy and AUROC where it has them, "-" where not; each with its interval where the entry
    has ``intervals``), a source with fewer than ``FEW_IMAGES`` images marked ``*`` and a footnote saying so,
    then the mean and minimum fake accuracy over fake sources where there are any."""
    table = per_source["sources"]
    few = [name for name, entry in table.items() if entry["n"] < FEW_IMAGES]
    names = {name: f"{name}*" if name in few else name for name in table}
    name_width = max(len("source"), *map(len, names.values()))
    wide = any("intervals" in entry for entry in table.values())  # a value and its interval: 22 characters
    widths = {key: 22 if wide and key != "n" else 10 for key in PER_SOURCE_COLUMNS}
    lines = [f"{'source':<{name_width}}" + "".join(f"{PER_SOURCE_COLUMNS[k]:>{w}}" for k, w in widths.items())]
    for name, entry in table.items():
        intervals = entry.get("intervals", {})
        row = "".join(f"{format_cell(entry.get(k), intervals.get(k)):>{w}}" for k, w in widths.items())
        lines.append(f"{names[name]:<{name_width}}{row}")
    if few:
        lines.append(f"* fewer than {FEW_IMAGES} images: its figures and their intervals are unreliable")
    if "fake_accuracy_mean" in per_source:
        lines.append(
            f"fake accuracy over fake sources: mean {per_source['fake_accuracy_mean']:.4f}, "
            f"min {per_source['fake_accuracy_min']:.4f}"
        )
    return "\n".join(lines)


def format_cell(value: float | None, interval: list[float] | None = None) -> str:
    """A table cell: "-" for no value, an int as is, a float to 4 places, with its interval to 3 when given."""
    if value is None or isinstance(value, int):
        return "-" if value is None else str(value)
    return f"{value:.4f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")


def format_calibration_line(metrics: dict[str, Any]) -> str:
    """One line of a metrics dict's calibration (``calibration.format_calibration``), and after temperature
    scaling where it has the ``calibrated`` block."""
    after = metrics.get("calibrated")
    scaled = f"; at temperature {after['temperature']:.3f}: {format_calibration(after)}" if after else ""
    return f"calibration: {format_calibration(metrics)}{scaled}"
