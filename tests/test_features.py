"""The feature cache (``aidetect features``) and linear probes on it (``aidetect train --features``): the same
features from 1 process, 2 torchrun processes and srun over 2 hosts; resume after SIGKILL and a group
SIGTERM; a changed pack refused in one line; a probe on the cache trained as the same probe on the images
(``model.tune probe``), under torchrun too; its checkpoint evaluated and used for predictions end to end."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.commands import ONE_THREAD, run_cli, signal_group_at, torchrun
from helpers.slurm import hosts_of_ranks, submit_cli
from helpers.training import weights

from aidetect.data.manifest import read_manifest
from aidetect.preemption import RESUME_EXIT_CODE

# A tiny ViT (timm's test_vit, random weights drawn from train.seed) reading the tiny pack's 32 px images.
VIT = ["--model", "timm:test_vit", "--set", "model.input_size=32", "--precision", "fp32"]
# Batches of 5 cut the tiny pack's 16-sample shards unevenly: a shard's features must not depend on them.
EXTRACT = [*VIT, "--batch-size", "5", "--set", "data.workers=1", "--layers", "2,4"]
# Batches of 1 in the training process: the extraction takes long enough to be interrupted after a shard.
SLOW = [*VIT, "--batch-size", "1", "--set", "data.workers=0"]
PROBE = [*VIT, "--set", "model.tune=probe", "--set", "model.channels_last=false", "--epochs", "2", "--lr", "0.01"]
PROBE += ["--set", "data.workers=1", "--set", "train.log_every=1"]


def features_command(pack: Path, out: Path, *options: str) -> list[str]:
    return [sys.executable, "-m", "aidetect.cli", "features", "--data", str(pack), "--out", str(out), *options]


def cached(cache: Path) -> dict[str, np.ndarray]:
    """Every array of every feature file of ``cache``, concatenated and sorted by sample key."""
    parts: dict[str, list[np.ndarray]] = {}
    for path in sorted(cache.glob("*.npz")):
        with np.load(path) as stored:
            for name in stored.files:
                if stored[name].ndim:  # per sample, not the shard's name, split and sha256
                    parts.setdefault(name, []).append(stored[name])
    arrays = {name: np.concatenate(chosen) for name, chosen in parts.items()}
    order = np.argsort(arrays["keys"])
    return {name: value[order] for name, value in arrays.items()}


def assert_same_bytes(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> None:
    assert expected.keys() == actual.keys()
    for name in expected:
        assert expected[name].dtype == actual[name].dtype and expected[name].tobytes() == actual[name].tobytes(), name


@pytest.fixture(scope="module")
def cache(tiny_pack: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pack's features from one process, one thread (as each torchrun process and SLURM task)."""
    out = tmp_path_factory.mktemp("cache") / "features"
    result = subprocess.run(features_command(tiny_pack, out, *EXTRACT), capture_output=True, text=True,
                            env=os.environ | ONE_THREAD, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def probe_run(tiny_pack: Path, cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A probe trained on the cache for 2 epochs, one thread."""
    out = tmp_path_factory.mktemp("probe") / "run"
    args = ["train", "--data", str(tiny_pack), "--features", str(cache), "--out", str(out), "--batch-size", "8"]
    result = run_cli(*args, *PROBE, env=os.environ | ONE_THREAD)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def test_every_sample_once_with_the_manifest_of_what_made_it(tiny_pack: Path, cache: Path) -> None:
    arrays, manifest = cached(cache), json.loads((cache / "features.json").read_text())
    keys = arrays["keys"].tolist()
    assert len(keys) == len(set(keys)) == read_manifest(tiny_pack)["samples"]
    assert arrays["features"].dtype == np.float32 and arrays["features"].shape == (len(keys), manifest["dim"])
    assert arrays["layer2"].shape == arrays["layer4"].shape == arrays["features"].shape
    assert not np.array_equal(arrays["features"], arrays["flipped"])
    shards = {entry["name"]: entry["sha256"] for entry in read_manifest(tiny_pack)["shards"]}
    assert manifest["pack"]["shards"] == shards and manifest["model"] == "timm:test_vit"
    assert manifest["preprocess"] | {"mean": None} == {
        "side": 32, "size": 32, "crop": "centre", "mean": None, "std": [0.5, 0.5, 0.5], "views": ["features", "flipped"]
    }  # fmt: skip


def test_two_processes_extract_the_bytes_one_does(tiny_pack: Path, cache: Path, tmp_path: Path) -> None:
    result = torchrun("features", "--data", str(tiny_pack), "--out", str(tmp_path / "two"), *EXTRACT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "rank 0 wrote" in result.stdout and "rank 1 wrote" in result.stdout
    assert result.stdout.count(" wrote ") == len(read_manifest(tiny_pack)["shards"])  # each shard once
    assert_same_bytes(cached(cache), cached(tmp_path / "two"))


def test_a_sigkilled_extraction_keeps_its_shards_and_completes(tiny_pack: Path, cache: Path, tmp_path: Path) -> None:
    out, shards = tmp_path / "killed", len(read_manifest(tiny_pack)["shards"])
    process = subprocess.Popen(features_command(tiny_pack, out, *SLOW), stdout=subprocess.PIPE, text=True)
    for line in process.stdout:
        if " wrote " in line:
            process.kill()
            break
    process.wait()
    assert process.returncode == -signal.SIGKILL
    kept = {path.name: path.stat().st_mtime_ns for path in out.glob("*.npz")}
    assert 0 < len(kept) < shards and not list(out.glob(".*.tmp"))
    resumed = run_cli("features", "--data", str(tiny_pack), "--out", str(out), *SLOW)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"features: {shards - len(kept)} shard(s)" in resumed.stdout
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept
    expected, actual = cached(cache), cached(out)
    for name in ("keys", "sources", "labels"):
        np.testing.assert_array_equal(actual[name], expected[name])
    for name in ("features", "flipped"):  # batches of 1 here, 5 there: the same to float tolerance
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-5, atol=1e-6)


def test_a_group_sigterm_stops_after_a_shard_with_the_stop_code(tiny_pack: Path, tmp_path: Path) -> None:
    out = tmp_path / "stopped"
    result = signal_group_at(features_command(tiny_pack, out, *SLOW), " wrote ", signal.SIGTERM)
    assert result.returncode == RESUME_EXIT_CODE, result.stderr[-2000:]
    assert "stopped by a signal" in result.stderr and "run the same command to continue" in result.stderr
    assert 0 < len(list(out.glob("*.npz"))) < len(read_manifest(tiny_pack)["shards"])


def test_a_changed_pack_is_refused_in_one_line(tiny_pack: Path, cache: Path, tmp_path: Path) -> None:
    pack = tmp_path / "pack"
    shutil.copytree(tiny_pack, pack)
    manifest = json.loads((pack / "manifest.json").read_text())
    changed = manifest["shards"][1]
    changed["sha256"] = "0" * 64  # as a pack made again from other files records it
    (pack / "manifest.json").write_text(json.dumps(manifest))
    train = run_cli("train", "--data", str(pack), "--features", str(cache), "--out", str(tmp_path / "run"), *PROBE)
    again = run_cli("features", "--data", str(pack), "--out", str(cache), *EXTRACT)
    for result in (train, again):
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
        assert changed["name"] in result.stderr and "the pack changed; extract again" in result.stderr
    other = run_cli("train", "--data", str(tiny_pack), "--features", str(cache), "--out", str(tmp_path / "other"),
                    *PROBE, "--model", "timm:test_vit2")  # fmt: skip
    assert other.returncode == 2 and "features of timm:test_vit, not of model.name timm:test_vit2" in other.stderr


def test_a_probe_on_the_cache_trains_as_on_the_images(tiny_pack: Path, probe_run: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    result = run_cli("train", "--data", str(tiny_pack), "--out", str(images), "--batch-size", "8", *PROBE,
                     env=os.environ | ONE_THREAD)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    for name in (
        "best.pt",
        "last.pt",
        "config.yaml",
        "metrics.jsonl",
        "curves.png",
        "test_metrics.json",
        "test_roc.png",
    ):
        assert (probe_run / name).is_file(), name
    expected, actual = weights(images), weights(probe_run)
    assert expected.keys() == actual.keys()
    for key in expected:  # the whole model: the backbone as extracted, the head as trained
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    rows = [
        [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (images, probe_run)
    ]
    for on_images, on_features in zip(*rows, strict=True):
        assert on_features["train_loss"] == pytest.approx(on_images["train_loss"], rel=1e-5)
        assert on_features["val"]["auroc"] == pytest.approx(on_images["val"]["auroc"], abs=1e-6)


def test_two_processes_train_a_probe_as_one(tiny_pack: Path, cache: Path, probe_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "two"
    result = torchrun("train", "--data", str(tiny_pack), "--features", str(cache), "--out", str(out), *PROBE,
                      "--batch-size", "4")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    expected, actual = weights(probe_run), weights(out)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


def test_the_probe_checkpoint_evaluates_and_predicts_images(tiny_pack: Path, probe_run: Path, tmp_path: Path) -> None:
    result = run_cli("evaluate", str(probe_run / "best.pt"), "--data", str(tiny_pack), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    on_images = json.loads((tmp_path / "eval_test.json").read_text())
    on_features = json.loads((probe_run / "test_metrics.json").read_text())
    assert on_images["auroc"] == pytest.approx(on_features["auroc"], abs=1e-6)
    assert on_images["loss"] == pytest.approx(on_features["loss"], rel=1e-5)
    raw, csv = tiny_pack.parent / "raw", tmp_path / "predictions.csv"
    predicted = run_cli("predict", str(probe_run / "best.pt"), str(raw), "--csv", str(csv))
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    scored = [row for row in csv.read_text().splitlines()[1:] if row.split(",")[1]]
    assert len(scored) >= read_manifest(tiny_pack)["samples"]


@pytest.mark.slurm
@pytest.mark.multinode
def test_srun_over_two_hosts_extracts_the_bytes_one_process_does(
    tiny_pack: Path, cache: Path, tmp_path: Path, nodes: list[str]
) -> None:
    out = tmp_path / "srun"
    command = ["srun", "--nodes=2", "--ntasks-per-node=1", *features_command(tiny_pack, out, *EXTRACT)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=os.environ | ONE_THREAD)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    log = tmp_path / "srun.log"
    log.write_text(result.stdout)
    hosts = hosts_of_ranks(log)
    assert len(hosts) == 2 and set(hosts) <= set(nodes), hosts
    assert_same_bytes(cached(cache), cached(out))


@pytest.mark.slurm
@pytest.mark.multinode
def test_submit_features_over_two_hosts_then_cv_on_the_cache(tiny_pack: Path, cache: Path, tmp_path: Path) -> None:
    features, run = tmp_path / "features", tmp_path / "cv"
    job = ["--profile", "local", "--wait", "--data", str(tiny_pack)]
    result = submit_cli("features", *job, "--nodes", "2", "--tasks-per-node", "1", "--out", str(features), *EXTRACT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert json.loads((features / "jobs.json").read_text())["kind"] == "features"
    assert_same_bytes(cached(cache), cached(features))
    result = submit_cli("cv", *job, "--folds", "2", "--features", str(features), "--out", str(run), *PROBE)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads((run / "cv_summary.json").read_text())
    assert summary["n_folds"] == 2 and not summary["missing"]
    assert all(f"features: {features}" in (run / f"fold{k}" / "config.yaml").read_text() for k in range(2))


def test_bench_train_times_extraction_and_the_probe(tmp_path: Path) -> None:
    figures_path = tmp_path / "train.json"
    args = ["--model", "timm:test_vit", "--image-size", "32", "--batch-size", "8", "--steps", "2"]
    result = run_cli("bench", "train", "--json", str(figures_path), *args, "--precisions", "fp32")
    assert result.returncode == 0, result.stderr[-2000:]
    probe = json.loads(figures_path.read_text())["probe"]
    assert probe["extract_img_per_s"] > 0 and probe["probe_img_per_s"] > 0
    assert "linear probe on cached features" in result.stdout
