"""After jobs: the cross-validation summary, the status of a submitted run, and syncing offline wandb runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from aidetect import plots
from aidetect.cluster.submit import load_jobs
from aidetect.config import load_config
from aidetect.errors import UserError
from aidetect.fileio import atomic_write_json
from aidetect.metrics import METRIC_KEYS
from aidetect.tracking import Tracker


def cv_report(run: Path) -> dict[str, Any]:
    """``RUN/cv_summary.json``: each fold's test metrics, and mean and standard deviation of every key."""
    results = {p.parent.name: json.loads(p.read_text()) for p in sorted(run.glob("fold*/test_metrics.json"))}
    if not results:
        raise UserError(f"{run}: no fold*/test_metrics.json yet; are the folds finished? (aidetect status {run})")
    expected = load_jobs(run).get("folds") if (run / "jobs.json").exists() else None
    missing = [f"fold{k}" for k in range(expected or 0) if f"fold{k}" not in results]
    values = {key: np.array([r[key] for r in results.values()], dtype=float) for key in METRIC_KEYS}
    summary = {
        "n_folds": len(results),
        "missing": missing,
        "mean": {key: float(v.mean()) for key, v in values.items()},
        "std": {key: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for key, v in values.items()},
        "folds": results,
    }
    atomic_write_json(run / "cv_summary.json", summary)
    plot = plots.cv_summary(summary, run / "cv_summary.png")
    log_to_wandb(run, summary, plot)
    return summary


def log_to_wandb(run: Path, summary: dict[str, Any], plot: Path) -> None:
    first = sorted(run.glob("fold*/config.yaml"))
    if not first:
        return
    config = load_config(str(first[0]))
    group = config.wandb.group or run.name
    config = replace(config, wandb=replace(config.wandb, job_type="cv-summary", name=f"{group}-summary"))
    tracker = Tracker(config, run, None, enabled=True)
    tracker.summary({f"cv/{stat}/{key}": value for stat in ("mean", "std") for key, value in summary[stat].items()})
    tracker.log_plots("cv", {"summary": plot}, 0)
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
    folders = [run] if jobs["kind"] == "train" else [run / f"fold{k}" for k in range(jobs["folds"])]
    for job, folder in zip(jobs["jobs"], folders, strict=True):
        state = states.get(job["job_id"], "see log" if not states else "unknown")
        lines.append(f"  {folder.name:<8} job {job['job_id']:<10} {state:<22} {progress(folder)}  log {job['stdout']}")
    if (run / "cv_summary.json").exists():
        lines.append(f"  summary: {run / 'cv_summary.json'}")
    return "\n".join(lines)


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
