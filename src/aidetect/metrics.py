"""Binary classification metrics from every rank's predictions (positive class = fake = 1).

Predictions are gathered from all ranks before anything is computed, so a metric under DDP is the
metric of the whole split, never of rank 0's share. AUROC, AP and the curves come from scikit-learn.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from aidetect.distributed import all_gather_objects

METRIC_KEYS = ("accuracy", "precision", "recall", "f1", "auroc", "ap", "loss", "tp", "fp", "tn", "fn")


@dataclass
class Predictions:
    """One rank's share of an evaluation: probabilities of fake, labels, summed loss, sample keys."""

    probabilities: list[float] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    loss_sum: float = 0.0

    def gather(self) -> Predictions:
        merged = Predictions()
        for part in all_gather_objects(self):
            merged.probabilities += part.probabilities
            merged.labels += part.labels
            merged.keys += part.keys
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
    both_classes = len(set(labels.tolist())) == 2
    return {
        "accuracy": (tp + tn) / total,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "auroc": float(roc_auc_score(labels, probabilities)) if both_classes else float("nan"),
        "ap": float(average_precision_score(labels, probabilities)) if both_classes else float("nan"),
        "loss": predictions.loss_sum / total,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "samples": len(labels),
    }


def curves(predictions: Predictions) -> dict[str, np.ndarray]:
    labels, probabilities = np.asarray(predictions.labels), np.asarray(predictions.probabilities)
    fpr, tpr, _ = roc_curve(labels, probabilities)
    precision, recall, _ = precision_recall_curve(labels, probabilities)
    return {"fpr": fpr, "tpr": tpr, "precision": precision, "recall": recall}


def is_better(metric: str, value: float, best: float | None) -> bool:
    if best is None or np.isnan(best):
        return not np.isnan(value)
    return value < best if metric == "loss" else value > best
