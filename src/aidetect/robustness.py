"""The robustness report of ``aidetect evaluate --perturb``: clean and degraded metrics, their drops,
robustness.json, its plot and its wandb table."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from aidetect import plots
from aidetect.calibration import CALIBRATION
from aidetect.config import Config
from aidetect.data.degrade import Perturbation
from aidetect.fileio import atomic_write_json
from aidetect.tracking import Tracker

# Metrics whose drop under a perturbation the report gives, overall and (where a source has them) per source.
DROP_KEYS = ("accuracy", "balanced_accuracy", "auroc", "ap", "real_accuracy", "fake_accuracy")
# The table's columns: each evaluation's DROP_KEYS and calibration figures (ECE, NLL, Brier), then its drops.
SHOWN_KEYS = (*DROP_KEYS, *CALIBRATION)
ROBUSTNESS_COLUMNS = ["perturbation", "kind", "strength", *SHOWN_KEYS, *(f"{key}_drop" for key in DROP_KEYS)]


def robustness_report(split: str, clean: dict[str, Any], perturbed: dict[Perturbation, dict]) -> dict[str, Any]:
    """What ``evaluate --perturb`` writes to robustness.json::

        {"split": SPLIT,
         "clean": metrics of the clean evaluation (as eval_SPLIT.json: every metric, its intervals, the
                  calibration figures and per_source),
         "perturbations": {name ("none", "jpeg:50", "blur:2", "downscale:0.5"; in the order given): {
             "kind": "none" | "jpeg" | "blur" | "downscale",
             "strength": JPEG quality, blur sigma in px or downscale factor (0.0 for none),
             "metrics": that evaluation's metrics, the same keys as "clean",
             "drop": {key: clean - perturbed for each key of DROP_KEYS},
             "per_source_drop": {source: {key: clean - perturbed, for each key of DROP_KEYS the source's
                                           per-source entry has}}}}}

    A positive drop is a loss (every key of DROP_KEYS is higher-is-better); NaN where a metric is
    undefined (e.g. AUROC with one class)."""
    sources = clean.get("per_source", {}).get("sources", {})
    entries = {}
    for perturbation, metrics in perturbed.items():
        after = metrics.get("per_source", {}).get("sources", {})
        entries[perturbation.name] = {
            "kind": perturbation.kind,
            "strength": perturbation.strength,
            "metrics": metrics,
            "drop": drops(clean, metrics),
            "per_source_drop": {name: drops(entry, after.get(name, {})) for name, entry in sources.items()},
        }
    return {"split": split, "clean": clean, "perturbations": entries}


def drops(clean: dict[str, Any], perturbed: dict[str, Any]) -> dict[str, float]:
    return {key: clean[key] - perturbed[key] for key in DROP_KEYS if key in clean and key in perturbed}


def robustness_rows(report: dict[str, Any]) -> list[list[Any]]:
    """The report as rows of ``ROBUSTNESS_COLUMNS``: the clean evaluation first (drops 0), then each
    perturbation."""
    clean = {"kind": "none", "strength": 0.0, "metrics": report["clean"], "drop": dict.fromkeys(DROP_KEYS, 0.0)}
    entries = {"clean": clean} | report["perturbations"]
    return [
        [name, e["kind"], e["strength"], *(e["metrics"][k] for k in SHOWN_KEYS), *(e["drop"][k] for k in DROP_KEYS)]
        for name, e in entries.items()
    ]


def format_robustness(report: dict[str, Any]) -> str:
    """Accuracy and AUROC of each evaluation and their drop vs clean, and its ECE, one aligned line each."""
    shown = ("accuracy", "accuracy_drop", "auroc", "auroc_drop", "ece")
    lines = [f"{'perturbation':<16}" + "".join(f"{column:>15}" for column in shown)]
    for row in robustness_rows(report):
        values = dict(zip(ROBUSTNESS_COLUMNS, row, strict=True))
        lines.append(f"{row[0]:<16}" + "".join(f"{values[column]:>15.4f}" for column in shown))
    return "\n".join(lines)


def write_robustness(report: dict[str, Any], folder: Path, config: Config, run_name: str) -> None:
    """FOLDER/robustness.json and robustness.png (when a perturbation other than none was evaluated),
    then both to wandb (``log_robustness``)."""
    atomic_write_json(folder / "robustness.json", report)
    swept = any(entry["kind"] != "none" for entry in report["perturbations"].values())
    plot = plots.robustness(report, folder / "robustness.png") if swept else None
    log_robustness(report, plot, folder, config, run_name)


def log_robustness(report: dict[str, Any], plot: Path | None, folder: Path, config: Config, run_name: str) -> None:
    """The report as the table ``robustness/table`` (``ROBUSTNESS_COLUMNS``) and the plot, in a wandb run
    of job type "robustness" under FOLDER/wandb, in the training run's group (``run_name``, the run
    folder's name, when it had none), with the training run's ``config`` (its checkpoint's) and wandb settings."""
    group = config.wandb.group or run_name
    name = f"{run_name}-robustness-{report['split']}"
    config = replace(config, wandb=replace(config.wandb, job_type="robustness", group=group, name=name))
    tracker = Tracker(config, folder, None, enabled=True)
    tracker.log_table("robustness/table", ROBUSTNESS_COLUMNS, robustness_rows(report), step=0)
    if plot:
        tracker.log_plots("robustness", {"plot": plot}, step=0)
    tracker.finish()
