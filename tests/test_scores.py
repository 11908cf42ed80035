"""Per-image scores: training's test and ``aidetect evaluate`` (under torchrun) write one row per image, from
which the run's test metrics come back, with what identifies the checkpoint, the pack and the preprocessing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.commands import run_cli, torchrun
from helpers.training import train_args
from sklearn.metrics import roc_auc_score

from aidetect.checkpoint import load_checkpoint
from aidetect.data.integrity import sha256_file
from aidetect.data.manifest import read_manifest
from aidetect.errors import UserError
from aidetect.metrics import Predictions
from aidetect.scores import read_scores, save_scores, scores_metadata_of, write_scores


@pytest.fixture(scope="module")
def run(tiny_pack: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-epoch run on the tiny pack (32 px): its folder."""
    out = tmp_path_factory.mktemp("scores") / "run"
    result = run_cli(*train_args(tiny_pack, out, "--epochs", "1"))
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def test_training_scores_give_back_the_test_metrics(run: Path, tiny_pack: Path) -> None:
    table = read_scores(run / "scores_test.parquet")
    metrics = json.loads((run / "test_metrics.json").read_text())
    keys, labels = table.column("key").to_pylist(), np.asarray(table.column("label").to_pylist())
    assert len(keys) == metrics["samples"] and keys == sorted(set(keys))
    # The evaluation's probabilities: sigmoid in float32 of the logits.
    probabilities = torch.sigmoid(torch.tensor(table.column("logit").to_pylist(), dtype=torch.float32)).numpy()
    assert np.mean((probabilities >= 0.5) == (labels == 1)) == metrics["accuracy"]
    assert roc_auc_score(labels, probabilities) == pytest.approx(metrics["auroc"], abs=1e-12)
    temperature = load_checkpoint(run / "best.pt").temperature  # fitted on validation
    calibrated = 1 / (1 + np.exp(-np.asarray(table.column("logit").to_pylist()) / temperature))
    assert np.allclose(table.column("prob_fake").to_pylist(), calibrated, rtol=0, atol=1e-12)
    manifest = read_manifest(tiny_pack)
    test_paths = {path for shard in manifest["shards"] if shard["split"] == "test" for path in shard["paths"]}
    paths = table.column("path").to_pylist()
    assert set(paths) == test_paths
    assert [hashlib.sha1(p.encode()).hexdigest()[:20] for p in paths] == keys  # each row's own file
    assert labels.tolist() == [int(p.startswith("fake/")) for p in paths]
    assert table.column("crop_logits").null_count == len(keys)
    metadata = scores_metadata_of(table)
    assert metadata["checkpoint_sha256"] == sha256_file(run / "best.pt")
    assert metadata["manifest_sha256"] == sha256_file(tiny_pack / "manifest.json")
    assert metadata["temperature"] == temperature
    assert (metadata["split"], metadata["model"], metadata["source_root"]) == (
        "test",
        "seed_cnn1",
        manifest["source"]["path"],
    )
    preprocess = metadata["preprocess"]
    assert (preprocess["mode"], preprocess["size"], preprocess["crop"]) == ("crop", 32, None)
    assert preprocess["mean"] == pytest.approx([0.485, 0.456, 0.406]) and len(preprocess["std"]) == 3


def test_evaluate_under_torchrun_scores_every_image_once(run: Path, tiny_pack: Path, tmp_path: Path) -> None:
    result = torchrun(
        "evaluate", str(run / "best.pt"), "--data", str(tiny_pack), "--out", str(tmp_path), "--scores-format", "csv"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    evaluated, trained = read_scores(tmp_path / "scores_test.csv"), read_scores(run / "scores_test.parquet")
    for column in ("key", "path", "source", "label", "crop_logits"):
        assert evaluated.column(column).to_pylist() == trained.column(column).to_pylist(), column
    assert np.allclose(evaluated.column("logit").to_pylist(), trained.column("logit").to_pylist(), atol=1e-5)
    assert scores_metadata_of(evaluated) == scores_metadata_of(trained)
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_temperature_scales_the_probabilities(run: Path, tiny_pack: Path, tmp_path: Path) -> None:
    table = read_scores(run / "scores_test.parquet")
    checkpoint = load_checkpoint(run / "best.pt")
    checkpoint.temperature = 2.0
    logits = table.column("logit").to_pylist()
    predictions = Predictions(
        keys=table.column("key").to_pylist(),
        logits=logits,
        labels=table.column("label").to_pylist(),
        sources=table.column("source").to_pylist(),
    )
    path = save_scores(tmp_path, predictions, run / "best.pt", checkpoint, tiny_pack, ["test"], "test")
    scaled = read_scores(path)
    expected = torch.sigmoid(torch.tensor(logits) / 2).numpy()
    assert np.allclose(scaled.column("prob_fake").to_pylist(), expected, atol=1e-7)
    assert scores_metadata_of(scaled)["temperature"] == 2.0
    with pytest.raises(UserError, match="xlsx"):
        write_scores(tmp_path, scaled, "xlsx")
    twice = Predictions(keys=predictions.keys * 2, logits=logits * 2, labels=predictions.labels * 2)
    with pytest.raises(ValueError, match="more than once"):
        save_scores(tmp_path, twice, run / "best.pt", checkpoint, tiny_pack, ["test"], "test")
