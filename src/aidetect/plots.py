"""PNG plots a person reads: training curves, confusion matrix, ROC and precision-recall curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: compute nodes have no display
import matplotlib.pyplot as plt
import numpy as np

from aidetect.metrics import Predictions, curves


def save(figure: plt.Figure, path: Path) -> Path:
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=110)
    plt.close(figure)
    tmp.replace(path)
    return path


def training_curves(history: list[dict], path: Path) -> Path:
    epochs = [row["epoch"] for row in history]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(epochs, [row["train_loss"] for row in history], marker="o", label="train")
    loss_axis.plot(epochs, [row["val"]["loss"] for row in history], marker="o", label="validation")
    loss_axis.set(xlabel="epoch", ylabel="BCE loss", title="Loss")
    loss_axis.legend()
    accuracy_axis.plot(epochs, [row["val"]["accuracy"] for row in history], marker="o", label="accuracy")
    accuracy_axis.plot(epochs, [row["val"]["auroc"] for row in history], marker="o", label="AUROC")
    accuracy_axis.set(xlabel="epoch", ylim=(0, 1.02), title="Validation")
    accuracy_axis.legend()
    return save(figure, path)


def confusion_matrix(metrics: dict, path: Path, title: str) -> Path:
    counts = np.array([[metrics["tn"], metrics["fp"]], [metrics["fn"], metrics["tp"]]])
    figure, axis = plt.subplots(figsize=(4.2, 3.8))
    axis.imshow(counts, cmap="Blues")
    for (row, column), value in np.ndenumerate(counts):
        axis.text(column, row, str(value), ha="center", va="center", fontsize=13)
    axis.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["real", "fake"], yticklabels=["real", "fake"])
    axis.set(xlabel="predicted", ylabel="true", title=f"{title}: accuracy {metrics['accuracy']:.3f}")
    return save(figure, path)


def roc_pr(curves: dict, metrics: dict, roc_path: Path, pr_path: Path, title: str) -> tuple[Path, Path]:
    figure, axis = plt.subplots(figsize=(4.5, 4))
    axis.plot(curves["fpr"], curves["tpr"], label=f"AUROC {metrics['auroc']:.3f}")
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey")
    axis.set(xlabel="false positive rate", ylabel="true positive rate (fake)", title=f"{title}: ROC")
    axis.legend(loc="lower right")
    save(figure, roc_path)
    figure, axis = plt.subplots(figsize=(4.5, 4))
    axis.plot(curves["recall"], curves["precision"], label=f"AP {metrics['ap']:.3f}")
    axis.set(xlabel="recall (fake)", ylabel="precision (fake)", ylim=(0, 1.02), title=f"{title}: precision-recall")
    axis.legend(loc="lower left")
    return roc_path, save(figure, pr_path)


def cv_summary(summary: dict, path: Path) -> Path:
    keys = ["accuracy", "precision", "recall", "f1", "auroc", "ap"]
    figure, axis = plt.subplots(figsize=(7, 4))
    means = [summary["mean"][k] for k in keys]
    axis.bar(keys, means, yerr=[summary["std"][k] for k in keys], capsize=4, color="#4c72b0")
    for index, value in enumerate(means):
        axis.text(index, min(value + 0.03, 1.0), f"{value:.3f}", ha="center")
    axis.set(ylim=(0, 1.08), title=f"{summary['n_folds']}-fold cross-validation, test split (mean ± std)")
    return save(figure, path)


def report_plots(predictions: Predictions, metrics: dict, out: Path, name: str) -> dict[str, Path]:
    paths = {"confusion": confusion_matrix(metrics, out / f"{name}_confusion.png", name)}
    if predictions.labels and len(set(predictions.labels)) == 2:
        roc, pr = roc_pr(curves(predictions), metrics, out / f"{name}_roc.png", out / f"{name}_pr.png", name)
        paths |= {"roc": roc, "pr": pr}
    return paths
