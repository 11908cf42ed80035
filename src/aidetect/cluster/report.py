"""After jobs: the cross-validation and leave-one-source-out summaries, the status of a submitted run, and
syncing offline wandb runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from aidetect import plots
from aidetect.calibration import apply_temperature
from aidetect.cluster.submit import JOBS_FILE, load_jobs, time_folder
from aidetect.config import load_config
from aidetect.data.manifest import chrono_windows, fake_sources, read_manifest, source_dates
from aidetect.errors import UserError
from aidetect.fileio import atomic_write_json
from aidetect.metrics import METRIC_KEYS, Predictions, compute_metrics
from aidetect.scores import read_scores
from aidetect.tracking import Tracker

THRESHOLD_KEYS = ("val_threshold", "accuracy_at_val_threshold", "balanced_accuracy_at_val_threshold")
HOLDOUT_COLUMNS = ("accuracy", "ap", "auroc", "real_accuracy", "fake_accuracy")
ROW_KEYS = (*HOLDOUT_COLUMNS, "real", "fake")  # a row of a holdout matrix, a cell of a chronological one
RUN_FOLDERS = {"source": "holdout-*/config.yaml", "time": "time-*/config.yaml"}  # a run's tasks, by cv kind


def cv_report(run: Path) -> dict[str, Any]:
    """``RUN/cv_summary.json``: ``folds`` (each fold's test metrics), ``mean`` and ``std`` of every key of
    ``METRIC_KEYS`` and of the validation-threshold keys that every fold has, ``intervals`` (``fold_intervals``)
    when the folds have bootstrap intervals, and ``per_source`` (see ``per_source_summary``) when a fold has a
    per-source table; plots ``cv_summary.png`` and
    ``cv_per_source.png``, and logs all of it to wandb. A leave-one-source-out run: ``holdout_report``; a
    chronological one: ``time_report``."""
    kind = cv_kind(run)
    if kind != "fold":
        return holdout_report(run) if kind == "source" else time_report(run)
    results = {p.parent.name: json.loads(p.read_text()) for p in sorted(run.glob("fold*/test_metrics.json"))}
    if not results:
        raise UserError(f"{run}: no fold*/test_metrics.json yet; are the folds finished? (aidetect status {run})")
    expected = load_jobs(run).get("folds") if (run / "jobs.json").exists() else None
    missing = [f"fold{k}" for k in range(expected or 0) if f"fold{k}" not in results]
    rows = list(results.values())
    keys = [key for key in METRIC_KEYS + THRESHOLD_KEYS if all(key in row for row in rows)]  # older runs lack some
    summary = {"n_folds": len(results), "missing": missing} | mean_std(rows, keys) | fold_intervals(rows)
    summary["folds"] = results
    tables = [row["per_source"] for row in rows if "per_source" in row]  # older runs have none
    if tables:
        summary["per_source"] = per_source_summary(tables)
    atomic_write_json(run / "cv_summary.json", summary)
    paths = {"summary": plots.cv_summary(summary, run / "cv_summary.png")}
    if tables:
        paths["per_source"] = per_source_plot(summary["per_source"], run / "cv_per_source.png")
    log_to_wandb(run, sorted(run.glob("fold*/config.yaml")), wandb_values(summary), paths)
    return summary


def cv_kind(run: Path) -> str:
    """What ``run`` is: ``fold`` (cross-validation), ``source`` (leave-one-source-out) or ``time`` (the
    chronological protocol), as its jobs.json says, or (sbatch runs have none) its run folders show."""
    if (run / JOBS_FILE).exists():
        return load_jobs(run).get("by", "fold")
    found = [kind for kind, pattern in RUN_FOLDERS.items() if any(run.glob(pattern))]
    return found[0] if found else "fold"


def holdout_report(run: Path) -> dict[str, Any]:
    """``RUN/cv_summary.json`` of a leave-one-source-out run, the train-on-the-rest / test-on-the-held-out
    matrix::

        {"by": "source", "n_sources": finished runs, "missing": expected sources without test metrics,
         "holdout": {"columns": HOLDOUT_COLUMNS,
                     "sources": {source: {column: ..., "real": n, "fake": n, "folder": "holdout-..."}},
                     "mean": {column: ...}, "min": {column: ...}, "argmin": {column: source}}}

    A row holds the test metrics of the run trained without that fake source (``RUN/holdout-*/``, the
    source read from its config.yaml); its test set is the real test samples and every sample of the source,
    so ``fake_accuracy`` is the accuracy on the held-out generator's fakes, and ``real``/``fake`` count
    them. Mean and minimum are over the rows. Expected sources: jobs.json's, else (sbatch) the pack's fake
    sources. Plots ``cv_holdout.png`` (``plots.holdout_matrix``) and logs all of it to wandb."""
    folders = {
        load_config(str(path.parent / "config.yaml")).data.holdout_source: path.parent
        for path in sorted(run.glob("holdout-*/test_metrics.json"))
    }
    if not folders:
        raise UserError(f"{run}: no holdout-*/test_metrics.json yet; are the runs finished? (aidetect status {run})")
    matrix = holdout_matrix(dict(sorted(folders.items())))
    missing = [source for source in expected_sources(run, folders[min(folders)]) if source not in folders]
    summary = {"by": "source", "n_sources": len(folders), "missing": missing, "holdout": matrix}
    atomic_write_json(run / "cv_summary.json", summary)
    paths = {"holdout": plots.holdout_matrix(matrix, run / "cv_holdout.png")}
    columns = matrix["columns"]
    table = (
        ["held-out source", *columns],
        [[name, *(row[k] for k in columns)] for name, row in matrix["sources"].items()],
    )
    configs = [folder / "config.yaml" for folder in folders.values()]
    log_to_wandb(run, configs, holdout_wandb_values(matrix), paths, table)
    return summary


def holdout_matrix(folders: dict[str, Path]) -> dict[str, Any]:
    """The ``holdout`` matrix of ``holdout_report`` from each held-out source's run folder (rows in the order
    of ``folders``)."""
    rows = {}
    for source in folders:
        metrics = json.loads((folders[source] / "test_metrics.json").read_text())
        rows[source] = {key: metrics[key] for key in ROW_KEYS}
        if "intervals" in metrics:  # each run's own test set: its own bootstrap intervals
            rows[source]["intervals"] = {k: v for k, v in metrics["intervals"].items() if k in HOLDOUT_COLUMNS}
        rows[source]["folder"] = folders[source].name
    return rows_summary(rows)


def rows_summary(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``{"columns", "sources": rows, "mean", "min", "argmin"}``: each ``HOLDOUT_COLUMNS`` key's mean, minimum
    and the row of the minimum over ``rows`` (name -> a dict with every such key)."""
    values = {key: np.array([row[key] for row in rows.values()], dtype=float) for key in HOLDOUT_COLUMNS}
    return {
        "columns": list(HOLDOUT_COLUMNS),
        "sources": rows,
        "mean": {key: float(v.mean()) for key, v in values.items()},
        "min": {key: float(v.min()) for key, v in values.items()},
        "argmin": {key: list(rows)[int(np.argmin(v))] for key, v in values.items()},
    }


def time_report(run: Path) -> dict[str, Any]:
    """``RUN/cv_summary.json`` of a chronological run (``submit cv --by time``)::

        {"by": "time", "n_tasks": finished tasks, "missing": expected task folders without test metrics,
         "time": {"window": generators per window, "windows": [[source, ...], ...] oldest first,
                  "dates": {source: release date}, "columns": HOLDOUT_COLUMNS,
                  "cells": {"w0..wI": {"wJ": {column: ..., "real": n, "fake": n}}},
                  "sources": {"w0..wI->wJ": cells["w0..wI"]["wJ"] | {"folder": "time-I"}} (J = I+1),
                  "mean": {column: ...}, "min": {column: ...}, "argmin": {column: row}}}

    ``cells`` is the train-window x test-window matrix: cell (I, J), J > I, holds the metrics of task I's
    checkpoint (trained on the generators of windows 0..I) on the real test samples and every sample of
    window J's generators, computed from its per-image scores (``time_cells``); a window that the task
    did not test on has no cell. ``sources`` are the next-window cells (AI-GenBench's protocol), the
    headline: mean, minimum and argmin are over them. Plots ``cv_time.png`` (``plots.time_matrix``) and
    logs all of it to wandb, the cells as its table."""
    found = sorted((p.parent for p in run.glob("time-*/test_metrics.json")), key=task_index)
    if not found:
        raise UserError(f"{run}: no time-*/test_metrics.json yet; are the runs finished? (aidetect status {run})")
    data = load_config(str(found[0] / "config.yaml")).data
    jobs = load_jobs(run) if (run / JOBS_FILE).exists() else {}
    windows = jobs.get("windows") or chrono_windows(data.shards, len(data.train_sources) // (task_index(found[0]) + 1))
    tasks = {task_index(folder): folder for folder in found}
    cells = {trained_on(task): time_cells(folder, windows) for task, folder in tasks.items()}
    next_window = {time_row(i): cells[trained_on(i)][f"w{i + 1}"] | {"folder": f.name} for i, f in tasks.items()}
    dates = source_dates(read_manifest(data.shards))
    matrix = {"window": len(windows[0]), "windows": windows, "dates": dates, "cells": cells} | rows_summary(next_window)
    missing = [time_folder(i) for i in range(len(windows) - 1) if i not in tasks]
    summary = {"by": "time", "n_tasks": len(found), "missing": missing, "time": matrix}
    atomic_write_json(run / "cv_summary.json", summary)
    title = f"Chronological: trained on windows 0..I of {len(windows[0])} generators, tested on each later one"
    paths = {"time": plots.time_matrix(matrix, run / "cv_time.png", title)}
    columns = matrix["columns"]
    table = (
        ["trained", "test", *columns],
        [[name, test, *(cell[k] for k in columns)] for name, row in cells.items() for test, cell in row.items()],
    )
    configs = [folder / "config.yaml" for folder in found]
    log_to_wandb(run, configs, holdout_wandb_values(matrix, "cv/time"), paths, table)
    return summary


def time_cells(folder: Path, windows: list[list[str]]) -> dict[str, dict[str, float]]:
    """Row ``trained_on(I)`` of the chronological matrix from task folder ``time-I``: for each later window J
    whose generators the task tested on (its config's ``data.test_sources``), ``{"wJ": {column: ..., "real":
    n, "fake": n}}``, the ``compute_metrics`` (threshold 0.5, as test_metrics.json) of the scores in its
    ``scores_test.parquet`` of every real image and the fakes of window J's generators. The probability is
    ``sigmoid(logit)``, the uncalibrated one test_metrics.json's figures are of (the file's ``prob_fake``
    carries the checkpoint's temperature). ``UserError`` when the scores file is missing."""
    scores = read_scores(folder / "scores_test.parquet")
    labels = scores.column("label").to_numpy().astype(np.int64)
    sources = np.asarray(scores.column("source").to_pylist())
    probabilities = apply_temperature(scores.column("logit").to_numpy(), None)
    tested = set(load_config(str(folder / "config.yaml")).data.test_sources or ())
    cells = {}
    for later in range(task_index(folder) + 1, len(windows)):
        if not tested.issuperset(windows[later]):  # a run made when tasks tested on the next window only
            continue
        chosen = (labels == 0) | np.isin(sources, windows[later])
        metrics = compute_metrics(Predictions(probabilities[chosen].tolist(), labels[chosen].tolist()))
        cells[f"w{later}"] = {key: metrics[key] for key in ROW_KEYS}
    return cells


def trained_on(task: int) -> str:
    """The matrix row of chronological task ``task``: trained on windows 0..task."""
    return f"w0..w{task}"


def time_row(task: int) -> str:
    """The next-window row of chronological task ``task``: trained on windows 0..task, tested on window task+1."""
    return f"{trained_on(task)}->w{task + 1}"


def task_index(folder: Path) -> int:
    """The task of a chronological run's folder ``time-I``: I (it trained on I+1 full windows)."""
    return int(folder.name.rpartition("-")[2])


def expected_sources(run: Path, folder: Path) -> list[str]:
    """The held-out sources a leave-one-source-out run should have: those its jobs.json records, else the
    fake sources of the pack that ``folder``'s run trained on."""
    if (run / JOBS_FILE).exists():
        return list(load_jobs(run)["sources"])
    return fake_sources(load_config(str(folder / "config.yaml")).data.shards)


def mean_std(rows: list[dict[str, Any]], keys: Iterable[str]) -> dict[str, dict[str, float]]:
    """``{"mean": {key: ...}, "std": {key: ...}}`` of each key over the rows that have it (keys no row has
    are left out); the standard deviation is the sample one (ddof=1), 0.0 from a single value."""
    values = {
        key: np.array([row[key] for row in rows if key in row], dtype=float)
        for key in keys
        if any(key in row for row in rows)
    }
    return {
        "mean": {key: float(v.mean()) for key, v in values.items()},
        "std": {key: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for key, v in values.items()},
    }


def fold_intervals(rows: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """``{"intervals": {key: [low, high]}}``: each key's bootstrap interval averaged over the folds (rows) that
    have ``intervals``, bound by bound; ``{}`` when none has. Every fold tests on the same test split, so the
    test-sampling uncertainty of the mean over folds is about that of one fold (averaging the folds does not
    narrow it): this is the typical per-run interval, while ``std`` is the spread training gives."""
    found = [row["intervals"] for row in rows if "intervals" in row]
    if not found:
        return {}
    keys = dict.fromkeys(key for intervals in found for key in intervals)
    return {"intervals": {key: np.mean([i[key] for i in found if key in i], axis=0).tolist() for key in keys}}


def per_source_summary(tables: list[dict[str, Any]]) -> dict[str, Any]:
    """Folds' per-source tables (``compute_metrics(...)["per_source"]``) across folds::

        {"n_folds": folds with a table,
         "sources": {source: {"folds": folds it appears in, "mean": {key: ...}, "std": {key: ...},
                              "intervals": {key: [low, high]} (``fold_intervals``, where the folds have them)}},
         "mean": {"fake_accuracy_mean": ..., "fake_accuracy_min": ...}, "std": {...}}

    where a source's keys are every key of its entries (n, accuracy, fake_accuracy, auroc, ap,
    real_accuracy), each over the folds whose entry has it; mean and std as in ``mean_std``."""
    names = sorted({name for table in tables for name in table["sources"]})
    sources = {}
    for name in names:
        entries = [table["sources"][name] for table in tables if name in table["sources"]]
        keys = dict.fromkeys(key for entry in entries for key in entry if key != "intervals")
        sources[name] = {"folds": len(entries)} | mean_std(entries, keys) | fold_intervals(entries)
    overall = mean_std(tables, ("fake_accuracy_mean", "fake_accuracy_min"))
    return {"n_folds": len(tables), "sources": sources} | overall


def per_source_plot(table: dict[str, Any], path: Path) -> Path:
    """``plots.per_source`` of a ``per_source_summary``: the means as bars, the standard deviations as errors."""
    means = {"sources": {name: entry["mean"] for name, entry in table["sources"].items()}} | table["mean"]
    errors = {name: entry["std"] for name, entry in table["sources"].items()}
    title = f"{table['n_folds']}-fold cross-validation (mean ± std), test split"
    return plots.per_source(means, path, title, errors)


def wandb_values(summary: dict[str, Any]) -> dict[str, float]:
    """What ``cv_report`` puts in the wandb summary: ``cv/{mean,std}/KEY``, and with a per-source table
    ``cv/per_source/SOURCE/KEY/{mean,std}`` and ``cv/per_source/fake_accuracy_{mean,min}/{mean,std}``."""
    values = {f"cv/{stat}/{key}": value for stat in ("mean", "std") for key, value in summary[stat].items()}
    table = summary.get("per_source")
    if table:
        parts = {"cv/per_source": table} | {f"cv/per_source/{n}": e for n, e in table["sources"].items()}
        for prefix, part in parts.items():
            values |= {f"{prefix}/{key}/{stat}": v for stat in ("mean", "std") for key, v in part[stat].items()}
    return values


def holdout_wandb_values(matrix: dict[str, Any], prefix: str = "cv/holdout") -> dict[str, float]:
    """What ``holdout_report`` puts in the wandb summary: ``cv/holdout/SOURCE/KEY`` and
    ``cv/holdout/{mean,min}/KEY`` for every column KEY (``time_report``: under ``cv/time``, a row per task)."""
    rows = matrix["sources"] | {"mean": matrix["mean"], "min": matrix["min"]}
    return {f"{prefix}/{name}/{key}": row[key] for name, row in rows.items() for key in matrix["columns"]}


def log_to_wandb(
    run: Path,
    configs: list[Path],
    values: dict[str, float],
    paths: dict[str, Path],
    table: tuple[list[str], list[list[Any]]] | None = None,
) -> None:
    """One wandb run (job_type cv-summary) in the group of the runs whose ``configs`` are given (nothing
    without one): ``values`` in its summary, the plots, and ``table`` (columns, rows) as ``cv/table``."""
    if not configs:
        return
    config = load_config(str(configs[0]))
    group = config.wandb.group or run.name
    config = replace(config, wandb=replace(config.wandb, job_type="cv-summary", name=f"{group}-summary"))
    tracker = Tracker(config, run, None, enabled=True)
    tracker.summary(values)
    tracker.log_plots("cv", paths, 0)
    if table:
        tracker.log_table("cv/table", *table, 0)
    tracker.finish()


def job_states(job_ids: list[str]) -> dict[str, str]:
    if not shutil.which("sacct"):
        return {}
    output = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-o", "JobID,State,Elapsed", "-j", ",".join(job_ids)],
        capture_output=True,
        text=True,
    ).stdout
    states = {}
    for line in output.splitlines():
        job_id, state, elapsed = line.split("|")
        states[job_id] = f"{state.split()[0]} ({elapsed})"
    return states


def progress(run: Path) -> str:
    rows = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
    config = load_config(str(run / "config.yaml")) if (run / "config.yaml").exists() else None
    if (run / "test_metrics.json").exists():
        metrics = json.loads((run / "test_metrics.json").read_text())
        return f"done: test accuracy {metrics['accuracy']:.4f}, auroc {metrics['auroc']:.4f}"
    if not rows:
        return "not started"
    last = json.loads(rows[-1])
    total = config.train.epochs if config else "?"
    return f"epoch {last['epoch']}/{total}, val accuracy {last['val']['accuracy']:.4f}"


def status(run: Path) -> str:
    jobs = load_jobs(run)
    states = job_states([j["job_id"] for j in jobs["jobs"]]) if jobs["executor"] == "slurm" else {}
    lines = [f"{run}: {jobs['kind']} on {jobs['profile']} ({jobs['executor']})"]
    folders = run_folders(run, jobs)
    width = max(8, *(len(folder.name) for folder in folders))
    for job, folder in zip(jobs["jobs"], folders, strict=True):
        state = states.get(job["job_id"], "see log" if not states else "unknown")
        lines.append(
            f"  {folder.name:<{width}} job {job['job_id']:<10} {state:<22} {progress(folder)}  log {job['stdout']}"
        )
    if (run / "cv_summary.json").exists():
        lines.append(f"  summary: {run / 'cv_summary.json'}")
    return "\n".join(lines)


def run_folders(run: Path, jobs: dict[str, Any]) -> list[Path]:
    """The run folder of each job of a submission, in the order of ``jobs["jobs"]``."""
    if jobs["kind"] == "train":
        return [run]
    if jobs.get("by") == "source":
        return [run / folder for folder in jobs["sources"].values()]
    if jobs.get("by") == "time":
        return [run / time_folder(i) for i in range(len(jobs["windows"]) - 1)]
    return [run / f"fold{k}" for k in range(jobs["folds"])]


def headline(summary: dict[str, Any]) -> str:
    """One line of a ``cv_report`` summary: accuracy and AUROC, mean ± std over folds, or for a
    leave-one-source-out (or chronological) run mean and minimum (and which source or task) over its rows."""
    if "holdout" not in summary and "time" not in summary:
        mean, std = summary["mean"], summary["std"]
        return (
            f"accuracy {mean['accuracy']:.4f} ± {std['accuracy']:.4f}, auroc {mean['auroc']:.4f} ± {std['auroc']:.4f}"
        )
    matrix, what = (summary["holdout"], "held-out") if "holdout" in summary else (summary["time"], "next-window")
    return ", ".join(
        f"{what} {key} mean {matrix['mean'][key]:.4f}, min {matrix['min'][key]:.4f} ({matrix['argmin'][key]})"
        for key in ("fake_accuracy", "auroc")
    )


def offline_runs(run: Path) -> list[Path]:
    return sorted(p for p in run.rglob("offline-run-*") if p.is_dir())


def wandb_sync(run: Path, list_only: bool = False) -> int:
    """Upload every offline wandb run under a run folder (from a login node with internet)."""
    found = offline_runs(run)
    if not found:
        raise UserError(f"{run}: no offline wandb runs (wandb/offline-run-*) under it")
    for path in found:
        print(path)
    if list_only:
        return 0
    executable = Path(sys.executable).with_name("wandb")
    return subprocess.run([str(executable) if executable.exists() else "wandb", "sync", *map(str, found)]).returncode
