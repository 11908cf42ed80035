"""PNG plots a person reads: training curves, confusion matrix, ROC and precision-recall curves, reliability
diagram, per-source bars."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: compute nodes have no display
import matplotlib.pyplot as plt
import numpy as np

from aidetect.calibration import ECE_BINS, apply_temperature, reliability
from aidetect.intervals import LEVEL
from aidetect.metrics import Predictions, curves, logits


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


def reliability_diagram(predictions: Predictions, metrics: dict, path: Path, title: str) -> Path:
    """Fraction of fakes against the mean probability of fake in each of ``ECE_BINS`` equal-width bins, with
    the diagonal of perfect calibration, before and (where ``metrics`` has the ``calibrated`` block) after
    temperature scaling; below, how many samples each bin holds."""
    figure, (axis, counts) = plt.subplots(2, 1, figsize=(4.5, 5.2), height_ratios=(3, 1), sharex=True)
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey")
    curves_shown = {f"uncalibrated, ECE {metrics['ece']:.3f}": np.asarray(predictions.probabilities)}
    if "calibrated" in metrics:
        after = metrics["calibrated"]
        label = f"T = {after['temperature']:.2f}, ECE {after['ece']:.3f}"
        curves_shown[label] = apply_temperature(logits(predictions), after["temperature"])
    edges = np.linspace(0, 1, ECE_BINS + 1)
    for label, probabilities in curves_shown.items():
        table = reliability(probabilities, predictions.labels)
        axis.plot(table["confidence"], table["frequency"], marker="o", label=label)
        counts.stairs(table["count"], edges, label=label)
    axis.set(ylabel="fraction fake", xlim=(0, 1), ylim=(0, 1.02), title=f"{title}: reliability")
    axis.legend(loc="upper left", fontsize="small")
    counts.set(xlabel="predicted probability of fake", ylabel="images", yscale="symlog")
    return save(figure, path)


def cv_summary(summary: dict, path: Path) -> Path:
    keys = ["accuracy", "precision", "recall", "f1", "auroc", "ap"]
    figure, axis = plt.subplots(figsize=(7, 4))
    means = [summary["mean"][k] for k in keys]
    axis.bar(keys, means, yerr=[summary["std"][k] for k in keys], capsize=4, color="#4c72b0")
    for index, value in enumerate(means):
        axis.text(index, min(value + 0.03, 1.0), f"{value:.3f}", ha="center")
    axis.set(ylim=(0, 1.08), title=f"{summary['n_folds']}-fold cross-validation, test split (mean ± std)")
    return save(figure, path)


HOLDOUT_TITLES = {
    "accuracy": "accuracy",
    "ap": "AP",
    "auroc": "AUROC",
    "real_accuracy": "real acc",
    "fake_accuracy": "fake acc",
}


def holdout_matrix(matrix: dict, path: Path) -> Path:
    """Heat map of a leave-one-source-out matrix (``cluster.report.holdout_matrix``): a row per held-out fake
    source, then its mean and minimum rows; a column per metric (``heat_map``)."""
    columns, sources = matrix["columns"], matrix["sources"]
    labels = [f"{name} (n={row['real']}+{row['fake']})" for name, row in sources.items()] + ["mean", "minimum"]
    values = np.array([[row[key] for key in columns] for row in [*sources.values(), matrix["mean"], matrix["min"]]])
    figure, axis = plt.subplots(figsize=(1.2 * len(columns) + 3, 0.45 * len(labels) + 1.5))
    heat_map(axis, values, [HOLDOUT_TITLES.get(key, key) for key in columns], labels)
    axis.axhline(len(sources) - 0.5, color="black", linewidth=2)  # sources above, their summary below
    axis.set(ylabel="held-out fake source (test n real+fake)", title="Leave-one-source-out: trained without the source")
    return save(figure, path)


def heat_map(axis: plt.Axes, values: np.ndarray, columns: list[str], rows: list[str]) -> None:
    """``values`` (rows x columns) on ``axis`` coloured from red (0) to green (1), each cell written out to 3
    decimals; a NaN cell is left blank."""
    axis.imshow(np.ma.masked_invalid(values), cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    for (row, column), value in np.ndenumerate(values):
        if not np.isnan(value):
            axis.text(column, row, f"{value:.3f}", ha="center", va="center", fontsize=9)
    axis.set_xticks(range(len(columns)), columns)
    axis.set_yticks(range(len(rows)), rows)


TIME_PANELS = ("fake_accuracy", "auroc")  # the metrics time_matrix draws, a panel each


def time_matrix(matrix: dict, path: Path, title: str) -> Path:
    """Heat maps of a chronological run's train-window x test-window matrix (``cluster.report.time_report``),
    one panel per metric of ``TIME_PANELS``: a row per task ("trained w0..wI"), a column per test window ("test wJ",
    J >= 1); the cells below the diagonal (J <= I, windows trained on) are blank."""
    cells, count = matrix["cells"], len(matrix["windows"])
    columns = [f"w{j}" for j in range(1, count)]
    size = (3.2 + 1.1 * len(columns), 0.5 * len(cells) + 2)
    figure, axes = plt.subplots(1, len(TIME_PANELS), figsize=(size[0] * len(TIME_PANELS), size[1]), squeeze=False)
    for axis, key in zip(axes[0], TIME_PANELS, strict=True):
        values = np.array([[row[c][key] if c in row else np.nan for c in columns] for row in cells.values()])
        heat_map(axis, values, [f"test {c}" for c in columns], [f"trained {name}" for name in cells])
        axis.set(title=HOLDOUT_TITLES.get(key, key))
    figure.suptitle(title)
    return save(figure, path)


SOURCE_BARS = {
    "fake_accuracy": ("fake accuracy", "#c44e52"),
    "auroc": ("AUROC", "#dd8452"),
    "real_accuracy": ("real accuracy", "#4c72b0"),
}


def per_source(table: dict, path: Path, title: str, errors: dict[str, dict[str, float]] | None = None) -> Path:
    """Bars of a per-source table (``compute_metrics(...)["per_source"]``): per source, its fake accuracy and
    AUROC (a fake source) and/or its real accuracy (a real source), the source labelled with its n; a dashed
    line at ``fake_accuracy_mean`` when the table has it. Error bars: ``errors`` (source -> key -> std) when
    given (the cross-validation summary), else each entry's ``intervals`` where it has them (``report_metrics``)."""
    sources = table["sources"]
    width = 0.8 / len(SOURCE_BARS)
    figure, axis = plt.subplots(figsize=(min(max(7, 0.6 * len(sources) + 2), 15), 4.8))
    for key, (label, color) in SOURCE_BARS.items():
        x, heights, yerr = [], [], []
        for index, (name, entry) in enumerate(sources.items()):
            shown = [k for k in SOURCE_BARS if k in entry]
            if key in shown:
                x.append(index + (shown.index(key) - (len(shown) - 1) / 2) * width)
                heights.append(entry[key])
                yerr.append(error_bar(entry, key, errors[name] if errors else None))
        if x:  # an empty bar call would still add a legend entry
            axis.bar(x, heights, width, yerr=np.transpose(yerr), capsize=3, color=color, label=label)
    if "fake_accuracy_mean" in table:
        mean = table["fake_accuracy_mean"]
        axis.axhline(mean, linestyle="--", color="grey", label=f"mean fake accuracy {mean:.3f}")
    labels = [f"{name}\nn={entry['n']:,.0f}" for name, entry in sources.items()]
    tilt = len(sources) > 6  # long rows of names overlap unless tilted
    axis.set_xticks(range(len(sources)), labels, rotation=30 if tilt else 0, ha="right" if tilt else "center")
    intervals = not errors and any("intervals" in entry for entry in sources.values())
    shows = f"; bars: {LEVEL:.0%} bootstrap intervals" if intervals else ""
    axis.set(ylim=(0, 1.25), yticks=np.linspace(0, 1, 6), title=f"{title}: per source{shows}")
    axis.legend(loc="upper center", ncol=4, fontsize="small")
    return save(figure, path)


def error_bar(entry: dict, key: str, stds: dict[str, float] | None) -> tuple[float, float]:
    """How far the error bar of ``entry[key]`` reaches below and above it: the std of ``stds`` either way, else
    the entry's interval of ``key`` (``intervals``), else nothing."""
    if stds is not None:
        return stds[key], stds[key]
    low, high = entry.get("intervals", {}).get(key, (entry[key], entry[key]))
    return max(entry[key] - low, 0.0), max(high - entry[key], 0.0)


EXPOSURE_COLOURS = {"reaches": "#c44e52", "neutralised": "#8c8c8c", "hidden": "#4c72b0", "content": "#dd8452"}


def audit(report: dict, path: Path, warn_auroc: float) -> Path:
    """The shortcut audit: test AUROC of each metadata-only baseline (all features on top), coloured by
    whether the feature still reaches the model, with chance and the warning level marked."""
    ranked = sorted(report["features"].items(), key=lambda item: item[1]["auroc"])
    names = [name for name, _ in ranked] + ["joint baseline"]
    values = [feature["auroc"] for _, feature in ranked] + [report["metadata_auroc"]]
    colours = [EXPOSURE_COLOURS[feature["exposure"]] for _, feature in ranked] + ["black"]
    figure, axis = plt.subplots(figsize=(7, 0.32 * len(names) + 1.6))
    axis.barh(names, values, color=colours)
    axis.axvline(0.5, linestyle="--", color="grey")
    axis.axvline(warn_auroc, linestyle=":", color="#c44e52")
    for exposure, colour in EXPOSURE_COLOURS.items():
        axis.barh([names[0]], [0], color=colour, label=exposure)  # legend entries only
    axis.set(xlim=(0, 1), xlabel="test AUROC from file metadata alone (0.5: chance)", title="Shortcut audit")
    axis.legend(loc="lower right", fontsize="small")
    return save(figure, path)


# kind -> x-axis label, and whether a lower value is the stronger degradation (its axis is reversed)
PERTURBATION_AXES = {
    "jpeg": ("JPEG quality (decreasing: stronger →)", True),
    "blur": ("Gaussian blur sigma, px (stronger →)", False),
    "downscale": ("downscale factor (decreasing: stronger →)", True),
}
ROBUSTNESS_LINES = {"accuracy": ("accuracy", "#4c72b0"), "auroc": ("AUROC", "#dd8452")}


def robustness(report: dict, path: Path) -> Path:
    """A robustness report (``aidetect.inference.robustness_report``) with at least one perturbation other
    than none: one panel per kind, accuracy and AUROC against strength (with their intervals where the
    metrics have them), stronger always to the right, the clean evaluation's values as dashed lines (``none``
    has no strength: the clean lines show it)."""
    entries = [entry for entry in report["perturbations"].values() if entry["kind"] != "none"]
    kinds = list(dict.fromkeys(entry["kind"] for entry in entries))
    figure, axes = plt.subplots(1, len(kinds), figsize=(4.3 * len(kinds), 3.9), squeeze=False)
    for axis, kind in zip(axes[0], kinds, strict=True):
        points = sorted((entry for entry in entries if entry["kind"] == kind), key=lambda entry: entry["strength"])
        for key, (label, colour) in ROBUSTNESS_LINES.items():
            values = [entry["metrics"][key] for entry in points]
            errors = np.transpose([error_bar(entry["metrics"], key, None) for entry in points])
            strengths = [entry["strength"] for entry in points]
            axis.errorbar(strengths, values, yerr=errors, marker="o", capsize=3, color=colour, label=label)
            axis.axhline(report["clean"][key], linestyle="--", color=colour, label=f"{label}, clean")
        label, reversed_ = PERTURBATION_AXES[kind]
        if reversed_:
            axis.invert_xaxis()
        axis.set(xlabel=label, ylim=(0, 1.02), title=f"{kind}, {report['split']} split")
    axes[0][0].legend(loc="lower left", fontsize="small")
    return save(figure, path)


def report_plots(predictions: Predictions, metrics: dict, out: Path, name: str) -> dict[str, Path]:
    paths = {"confusion": confusion_matrix(metrics, out / f"{name}_confusion.png", name)}
    if predictions.labels and len(set(predictions.labels)) == 2:
        roc, pr = roc_pr(curves(predictions), metrics, out / f"{name}_roc.png", out / f"{name}_pr.png", name)
        paths |= {"roc": roc, "pr": pr}
        paths["reliability"] = reliability_diagram(predictions, metrics, out / f"{name}_reliability.png", name)
    if "per_source" in metrics:
        paths["per_source"] = per_source(metrics["per_source"], out / f"{name}_per_source.png", name)
    return paths
