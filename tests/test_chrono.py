"""The chronological protocol (AI-GenBench): generators in windows by release date, each task trained on the
windows so far and tested on every later one; the selection on a real pack, and ``submit cv --by time`` end to
end with its train-window x test-window matrix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers.commands import run_cli
from helpers.plots import assert_png
from helpers.slurm import REPO, options, submit, wait_for
from sklearn.metrics import average_precision_score, roc_auc_score

from aidetect.cluster.report import HOLDOUT_COLUMNS, cv_report, status
from aidetect.data.manifest import (
    chrono_windows,
    read_manifest,
    run_splits,
    sample_records,
    select_shards,
    time_windows,
)
from aidetect.data.pack import PackSettings, pack
from aidetect.data.shardfile import shard_records
from aidetect.data.synth import synth
from aidetect.errors import UserError
from aidetect.scores import read_scores

# Released in another order than their names sort: gen3 first, gen1 last.
DATES = {"gen1": "2023-07-26", "gen2": "2022-08", "gen3": "2022-04-06", "gen4": "2022-08-22"}
ORDER = ["gen3", "gen2", "gen4", "gen1"]  # 2022-08 sorts before any day of August 2022


@pytest.fixture(scope="module")
def dated_pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fakes of four generators with release dates, reals of two sources, as small native crops."""
    root = tmp_path_factory.mktemp("dated")
    synth(root / "raw", n=96, seed=11, workers=2, min_side=64, max_side=96, sources=4)
    (root / "dates.yaml").write_text("".join(f"{source}: {date}\n" for source, date in DATES.items()))
    settings = PackSettings(mode="crop", size=32, shard_size=16, folds=2, source_dates=str(root / "dates.yaml"))
    pack(root / "raw", root / "shards", settings, workers=2, progress=False)
    return root / "shards"


def test_windows_are_consecutive_generators_oldest_first() -> None:
    assert time_windows(DATES, 1) == [[s] for s in ORDER]
    assert time_windows(DATES, 2) == [["gen3", "gen2"], ["gen4", "gen1"]]
    assert time_windows(DATES, 3) == [["gen3", "gen2", "gen4"], ["gen1"]]
    assert time_windows({"b": "2024-01", "a": "2024-01"}, 1) == [["a"], ["b"]]  # ties by name
    with pytest.raises(UserError, match="a window holds at least 1 generator"):
        time_windows(DATES, 0)


def selected(shards: Path, selection) -> set[str]:
    """The paths of the samples a run's loader reads for ``selection``."""
    paths = set()
    for shard in select_shards(shards, selection.splits, selection.keep):
        records = shard_records(shard.path)
        paths.update(records[i]["path"] for i in (shard.keep if shard.keep is not None else range(len(records))))
    return paths


@pytest.mark.parametrize("task", [0, 1, 2])
def test_a_task_trains_on_the_windows_so_far_and_tests_on_the_next(dated_pack: Path, task: int) -> None:
    windows = chrono_windows(dated_pack, 1)
    assert windows == [[s] for s in ORDER] and read_manifest(dated_pack)["source_dates"] == DATES
    trained, tested = ORDER[: task + 1], ORDER[task + 1]
    splits = run_splits(read_manifest(dated_pack), 0, None, trained, [tested])
    records = sample_records(dated_pack)

    def paths(split_ok, fake_ok) -> set[str]:
        return {
            r["path"]
            for r in records
            if split_ok(r["split"]) and (fake_ok(r["source"]) if r["class"] == "fake" else True)
        }

    assert selected(dated_pack, splits["train"]) == paths(lambda s: s == "fold1", lambda s: s in trained)
    assert selected(dated_pack, splits["val"]) == paths(lambda s: s == "fold0", lambda s: s in trained)
    real_test = {r["path"] for r in records if r["class"] == "real" and r["split"] == "test"}
    every_of_next = {r["path"] for r in records if r["source"] == tested}  # all splits: never trained on
    assert selected(dated_pack, splits["test"]) == real_test | every_of_next
    assert len(every_of_next) == read_manifest(dated_pack)["sources"]["fake"][tested]["total"]


def test_holdout_is_the_same_selection_as_training_on_the_rest(dated_pack: Path) -> None:
    manifest = read_manifest(dated_pack)
    held = run_splits(manifest, 0, "gen2")
    chosen = run_splits(manifest, 0, None, ["gen1", "gen3", "gen4"], ["gen2"])
    for name in ("train", "val", "test"):
        assert selected(dated_pack, held[name]) == selected(dated_pack, chosen[name])


def test_a_pack_without_every_date_is_refused_in_one_line(tiny_pack: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"no release date for fake source fake; pack again with --source-dates FILE"):
        chrono_windows(tiny_pack, 1)
    result = run_cli(
        "submit", "cv", "--by", "time", "--profile", "local", "--executor", "local", "--data", str(tiny_pack),
        "--out", str(tmp_path / "run"),
    )  # fmt: skip
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "no release date for fake source fake" in result.stderr and not (tmp_path / "run" / "jobs.json").exists()


def test_submit_cv_by_time_runs_each_window_and_reports_the_matrix(dated_pack: Path, tmp_path: Path) -> None:
    run = tmp_path / "chrono"
    result = run_cli(
        "submit", "cv", "--by", "time", "--window", "1", "--profile", "local", "--executor", "local", "--wait",
        "--data", str(dated_pack), "--out", str(run), *options(1, 16),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "next-window fake_accuracy mean" in result.stdout  # --wait ran cv-report
    jobs = json.loads((run / "jobs.json").read_text())
    assert jobs["by"] == "time" and jobs["window"] == 1 and jobs["windows"] == [[s] for s in ORDER]
    task_config = yaml.safe_load((run / "time-0" / "config.yaml").read_text())
    config = task_config["data"]
    assert config["train_sources"] == ["gen3"] and config["test_sources"] == ["gen2", "gen4", "gen1"]
    summary, manifest = json.loads((run / "cv_summary.json").read_text()), read_manifest(dated_pack)
    matrix = summary["time"]
    assert summary["n_tasks"] == 3 and not summary["missing"] and matrix["dates"] == DATES
    assert {row: list(cells) for row, cells in matrix["cells"].items()} == {
        "w0..w0": ["w1", "w2", "w3"],
        "w0..w1": ["w2", "w3"],
        "w0..w2": ["w3"],
    }
    cell = matrix["cells"]["w0..w0"]["w2"]  # trained on gen3, tested on gen4: off the next-window diagonal
    assert cell == pytest.approx(cell_by_hand(run / "time-0", "gen4"), nan_ok=True)
    assert (
        cell["real"] == manifest["splits"]["test"]["real"]
        and cell["fake"] == manifest["sources"]["fake"]["gen4"]["total"]
    )
    next_window = {
        f"w0..w{i}->w{i + 1}": matrix["cells"][f"w0..w{i}"][f"w{i + 1}"] | {"folder": f"time-{i}"} for i in range(3)
    }
    assert matrix["sources"] == next_window and matrix["columns"] == list(HOLDOUT_COLUMNS)
    assert matrix["mean"]["auroc"] == pytest.approx(sum(row["auroc"] for row in next_window.values()) / 3)
    last = json.loads((run / "time-2" / "test_metrics.json").read_text())  # its test: reals and window 3 only
    assert matrix["cells"]["w0..w2"]["w3"] == pytest.approx({key: last[key] for key in cell}, nan_ok=True)
    metrics = json.loads((run / "time-0" / "test_metrics.json").read_text())
    assert set(metrics["per_source"]["sources"]) == {"art", "photo", "gen2", "gen4", "gen1"}
    evaluated = run_cli("evaluate", str(run / "time-0" / "best.pt"), "--data", str(dated_pack), "--out", str(run))
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]  # the checkpoint's test: every later window
    counts = {name: row["n"] for name, row in metrics["per_source"]["sources"].items()}
    evaluated_sources = json.loads((run / "eval_test.json").read_text())["per_source"]["sources"]
    assert {name: row["n"] for name, row in evaluated_sources.items()} == counts
    assert_png(run / "cv_time.png")
    assert "time-2" in status(run) and "done: test accuracy" in status(run)
    written = (run / "cv_summary.json").read_text()
    (run / "jobs.json").unlink()  # as an sbatch run has none: the windows come from the task's config
    cv_report(run)
    assert (run / "cv_summary.json").read_text() == written
    config["test_sources"] = ["gen2"]  # as a task tested on the next window only: no cells beyond it
    (run / "time-0" / "config.yaml").write_text(yaml.safe_dump(task_config))
    assert list(cv_report(run)["time"]["cells"]["w0..w0"]) == ["w1"]


def cell_by_hand(folder: Path, generator: str) -> dict[str, float]:
    """The metrics of a task's checkpoint on the real test images and ``generator``'s, from its score file."""
    scores = {
        key: np.asarray(values) for key, values in read_scores(folder / "scores_test.parquet").to_pydict().items()
    }
    chosen = (scores["label"] == 0) | (scores["source"] == generator)
    fake, logit = scores["label"][chosen] == 1, scores["logit"][chosen]
    said_fake = logit >= 0  # sigmoid(logit) >= 0.5
    return {
        "accuracy": float(np.mean(fake == said_fake)),
        "real_accuracy": float(np.mean(~said_fake[~fake])),
        "fake_accuracy": float(np.mean(said_fake[fake])),
        "auroc": roc_auc_score(fake, logit),
        "ap": average_precision_score(fake, logit),
        "real": int(np.sum(~fake)),
        "fake": int(np.sum(fake)),
    }


def test_time_task_names_each_array_task_s_folder_and_sources(dated_pack: Path) -> None:
    result = run_cli("time-task", "1", "--window", "1", "--data", str(dated_pack))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\t") == [
        "time-1",
        'data.train_sources=["gen3", "gen2"]',
        'data.test_sources=["gen4", "gen1"]\n',  # every later window
    ]
    beyond = run_cli("time-task", "3", "--window", "1", "--data", str(dated_pack))  # 4 windows: tasks 0-2
    assert beyond.returncode == 2 and "has windows 0..3, tasks 0..2" in beyond.stderr and not beyond.stdout


@pytest.mark.slurm
def test_cv_sbatch_by_time_trains_the_task_s_windows(dated_pack: Path, tmp_path: Path) -> None:
    run, sbatch = tmp_path / "chronosb", str(REPO / "slurm" / "cv.sbatch")
    by_time = "--export=ALL,AIDETECT_CV_BY=time,AIDETECT_CV_WINDOW=1"
    job = submit("--array=1", by_time, sbatch, str(run), "--data", str(dated_pack), *options(1, 16), cwd=tmp_path)
    assert wait_for(f"{job}_1", {"COMPLETED", "FAILED", "CANCELLED"}) == "COMPLETED"
    config = yaml.safe_load((run / "time-1" / "config.yaml").read_text())
    assert config["data"]["train_sources"] == ["gen3", "gen2"] and config["data"]["test_sources"] == ["gen4", "gen1"]
    assert config["wandb"]["job_type"] == "time-1"
    summary = cv_report(run)  # no jobs.json: the windows come from the task's config and the pack
    assert summary["time"]["windows"] == [[s] for s in ORDER] and summary["missing"] == ["time-0", "time-2"]
    assert list(summary["time"]["sources"]) == ["w0..w1->w2"] and list(summary["time"]["cells"]["w0..w1"]) == [
        "w2",
        "w3",
    ]
