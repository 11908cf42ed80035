"""``aidetect evaluate`` (a checkpoint on a split of a pack) and ``aidetect predict`` (on raw image files).

Both rebuild the model and the preprocessing from the checkpoint alone: ``predict`` decodes and
preprocesses raw files exactly as ``pack`` did for training (the settings travel in the checkpoint),
then crops and normalises as the evaluation loader does: the centre crop, or with ``--crops N`` the same N
tiled crops whose logits ``evaluate --crops N`` combines, combined the same way.

Robustness (``--perturb``): one fixed degradation (``aidetect.data.degrade.Perturbation``) of both
classes alike, deterministic; ``evaluate`` applies it to the stored images, ``predict`` to each raw file
before preprocessing.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from aidetect import plots
from aidetect.backbones import Preprocess
from aidetect.calibration import apply_temperature
from aidetect.checkpoint import Checkpoint, load_checkpoint
from aidetect.config import TrainConfig
from aidetect.data.decode import SYSTEM_FILES, UnreadableImage
from aidetect.data.degrade import Perturbation
from aidetect.data.loader import build_loader, normalize_batch
from aidetect.data.manifest import Selection, read_manifest
from aidetect.data.pack import PackSettings, decode_and_preprocess, encode
from aidetect.data.stored import decode_stored
from aidetect.data.transforms import tiles
from aidetect.distributed import cleanup_distributed, peers_watched, setup_distributed
from aidetect.engine import evaluate as evaluate_split
from aidetect.engine import stop_check
from aidetect.errors import UserError, first_line
from aidetect.fileio import atomic_write_bytes, atomic_write_json
from aidetect.hardware import memory_named, resolve_precision
from aidetect.metrics import Predictions, report_metrics
from aidetect.models import preprocess_of
from aidetect.preemption import StopRequest
from aidetect.robustness import robustness_report, write_robustness
from aidetect.scores import check_crops, combine_logits, over_crops, save_scores
from aidetect.train import build_trained_model


def model_from_checkpoint(checkpoint: Checkpoint, device: torch.device) -> nn.Module:
    """The checkpoint's model with its weights, on ``device``, in eval mode: built as it was trained (a timm
    backbone at its input side, with the LoRA adapters of ``model.tune lora``), no pretrained file read."""
    image_size = checkpoint.preprocess["crop"] or checkpoint.preprocess["size"]
    config = replace(checkpoint.config.model, pretrained=None, channels_last=False)  # the checkpoint's weights
    model = build_trained_model(config, image_size, device)
    model.load_state_dict(checkpoint.model)
    return model.to(device).eval()


def checkpoint_preprocess(checkpoint: Checkpoint) -> Preprocess:
    """How the checkpoint's model normalises its inputs (``models.preprocess_of`` its model section)."""
    return preprocess_of(checkpoint.config.model.name, checkpoint.config.model.input_size)


def evaluate(
    checkpoint_path: str,
    data: str,
    split: str = "test",
    out: str | None = None,
    batch_size: int = 64,
    workers: int = 2,
    perturbations: Sequence[Perturbation] = (),
    scores_format: str = "parquet",
    crops: int = 1,
    combine: str = "mean",
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Metrics of a checkpoint on one split, as one process or under torchrun; returns (the clean metrics,
    the robustness report or None without ``perturbations``) on every rank.

    Rank 0 writes OUT/eval_SPLIT.json, its plots and the per-image scores OUT/scores_SPLIT.parquet (or .csv:
    ``scores_format``; ``aidetect.scores``) of the clean evaluation, and with ``perturbations``
    OUT/robustness.json (``robustness_report``) and robustness.png, and logs them to wandb. The clean
    evaluation runs first, then one per perturbation (one given twice runs once), each through a loader
    of the same settings. With ``crops`` N > 1, each evaluation reads the split N times, one tiled crop of
    every image each time, and ``combine``s each image's N logits (``scores.over_crops``). Nothing is
    written until every evaluation is done: a stop signal leaves no partial result. Every evaluation's
    metrics are ``metrics.report_metrics``: bootstrap intervals, and with the checkpoint's temperature the
    calibration after it.
    """
    check_crops(crops, combine)
    checkpoint = load_checkpoint(checkpoint_path)
    check_preprocessing(data, checkpoint)
    info = setup_distributed(TrainConfig.dist_timeout_s)
    try:
        with StopRequest() as stop, peers_watched(info), memory_named(batch_size, info.device):
            evaluate_with = split_evaluator(checkpoint, data, split, batch_size, workers, info.device, stop)
            predictions, crop_logits = over_crops(evaluate_with, None, crops, combine)
            evaluated = {p: over_crops(evaluate_with, p, crops, combine)[0] for p in dict.fromkeys(perturbations)}
        perturbed = {p: report_metrics(found, temperature=checkpoint.temperature) for p, found in evaluated.items()}
        metrics = report_metrics(predictions, temperature=checkpoint.temperature)
        report = robustness_report(split, metrics, perturbed) if perturbations else None
        if info.is_main:
            folder = Path(out) if out else Path(checkpoint_path).parent
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(folder / f"eval_{split}.json", metrics)
            plots.report_plots(predictions, metrics, folder, f"eval_{split}")
            chosen = evaluated_selection(checkpoint, data, split).splits
            save_scores(
                folder,
                predictions,
                checkpoint_path,
                checkpoint,
                data,
                chosen,
                split,
                scores_format,
                crop_logits,
                combine,
            )
            if report:
                write_robustness(report, folder, checkpoint.config, Path(checkpoint_path).parent.name)
        return metrics, report
    finally:
        cleanup_distributed(info)


def check_preprocessing(data: str, checkpoint: Checkpoint) -> None:
    """``UserError`` unless pack ``data`` was made with the preprocessing the checkpoint was trained on."""
    packed, trained = read_manifest(data)["settings"], checkpoint.preprocess
    defaults = asdict(PackSettings())  # what packs made before a setting existed did
    mismatched = [
        k for k in ("mode", "size", "max_side", "codec", "parity") if (defaults | packed)[k] != (defaults | trained)[k]
    ]
    if mismatched:
        raise UserError(f"{data}: packed with other {', '.join(mismatched)} than the checkpoint was trained on")


def split_evaluator(
    checkpoint: Checkpoint,
    data: str,
    split: str,
    batch_size: int,
    workers: int,
    device: torch.device,
    stop: StopRequest,
) -> Callable[[Perturbation | None, tuple[int, int]], Predictions]:
    """``evaluate_with(degrade, tile)``: the checkpoint's model on ``split`` of pack ``data``, every rank's
    predictions gathered. Each call reads the split through a new loader of the same settings, with
    ``degrade`` applied to each stored image before the crop (None: the images as stored) and the crop
    window ``tile`` (``build_loader``; (0, 1): the centre crop). The test
    split of a leave-one-source-out run is the one it was trained for: real test samples and every
    sample of the held-out source."""
    model = model_from_checkpoint(checkpoint, device)
    chosen = evaluated_selection(checkpoint, data, split)
    precision = resolve_precision(checkpoint.config.train.precision, device)
    preprocess = checkpoint_preprocess(checkpoint)

    def evaluate_with(degrade: Perturbation | None, tile: tuple[int, int] = (0, 1)) -> Predictions:
        loader = build_loader(
            data,
            chosen.splits,
            batch_size=batch_size,
            train=False,
            crop=checkpoint.preprocess["crop"],
            num_workers=workers,
            device=device,
            keep=chosen.keep,
            degrade=degrade,
            mean=preprocess.mean,
            std=preprocess.std,
            tile=tile,
        )
        with loader, stop.deferred():
            return evaluate_split(model, loader, device, precision, False, stop_check(stop, loader, device)).gather()

    return evaluate_with


def evaluated_selection(checkpoint: Checkpoint, data: str, split: str) -> Selection:
    """What evaluating ``checkpoint`` on ``split`` of pack ``data`` reads."""
    if split != "test":
        return Selection([split])
    return checkpoint.config.data.selections(read_manifest(data), None)["test"]


def image_files(paths: list[str]) -> Iterator[Path]:
    """The files named, and every file under the folders named, in sorted order."""
    for name in paths:
        path = Path(name)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                yield from (Path(root) / f for f in sorted(files) if f.lower() not in SYSTEM_FILES)
        else:
            yield path


def load_for_prediction(path: Path, settings: dict[str, Any], perturb: Perturbation | None = None) -> torch.Tensor:
    """One raw file -> uint8 HWC tensor, the image the checkpoint's pack would store (``settings``: its
    ``preprocess``); ``perturb`` degrades the decoded file first, before the pack's parity and resizing or
    cropping."""
    if not path.is_file():
        raise UnreadableImage("file not found")
    packed = PackSettings(**{key: value for key, value in settings.items() if key != "crop"})
    _, pixels = decode_and_preprocess(path, packed, perturb)
    # Through the same encoder and decoder as pack and the loader: the model saw these JPEG artefacts.
    return torch.from_numpy(np.ascontiguousarray(decode_stored(encode(pixels, packed.codec, packed.quality))))


def prediction_crops(
    path: Path, settings: dict[str, Any], perturb: Perturbation | None = None, crops: int = 1
) -> torch.Tensor:
    """The model's inputs for one raw file: ``crops`` x side x side x 3 (uint8), the windows of the model's
    side (the checkpoint's crop, else the pack's size) that ``evaluate --crops`` reads of the stored image
    (``load_for_prediction``), in its order (``transforms.tiles``; one: the centre crop). ``ValueError``
    when the stored image is smaller than the side."""
    stored = load_for_prediction(path, settings, perturb).numpy()
    return torch.from_numpy(tiles(stored, settings["crop"] or settings["size"], crops))


def predict(
    checkpoint_path: str,
    paths: list[str],
    csv_path: str,
    batch_size: int = 32,
    perturb: Perturbation | None = None,
    unsure: tuple[float, float] | None = None,
    crops: int = 1,
    combine: str = "mean",
) -> dict[str, int]:
    """Write ``csv_path`` with one row per file: path, probability of fake (calibrated by the checkpoint's
    temperature where it has one), label (fake at 0.5 or above, else real; ``unsure`` where the probability
    lies in the band ``unsure`` (LO, HI) when given), error (if unreadable); with ``perturb``, of each file
    degraded so (see ``load_for_prediction``). With ``crops`` N, the logit of a file ``combine``s those of
    its N tiled crops (``prediction_crops``), as ``evaluate --crops N`` does of the same stored image;
    ``batch_size`` files (N crops each) go through the model at a time."""
    check_crops(crops, combine)
    checkpoint = load_checkpoint(checkpoint_path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, preprocess = model_from_checkpoint(checkpoint, device), checkpoint_preprocess(checkpoint)
    scored = partial(score, model, device=device, preprocess=preprocess, temperature=checkpoint.temperature)
    rows: list[dict[str, Any]] = []
    pending: list[tuple[int, torch.Tensor]] = []
    for path in image_files(paths):
        try:
            images = prediction_crops(path, checkpoint.preprocess, perturb, crops)
            rows.append({"path": str(path), "prob_fake": "", "label": "", "error": ""})
            pending.append((len(rows) - 1, images))
        except (UnreadableImage, ValueError, OSError) as exc:
            rows.append({"path": str(path), "prob_fake": "", "label": "", "error": first_line(exc)})
        if len(pending) == batch_size:
            scored(pending, rows, unsure=unsure, combine=combine)
            pending = []
    if pending:
        scored(pending, rows, unsure=unsure, combine=combine)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["path", "prob_fake", "label", "error"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(csv_path, buffer.getvalue().encode())
    return {"files": len(rows), "errors": sum(1 for r in rows if r["error"])}


@torch.no_grad()
def score(
    model: nn.Module,
    pending: list[tuple[int, torch.Tensor]],
    rows: list[dict],
    device: torch.device,
    preprocess: Preprocess,
    temperature: float | None = None,
    unsure: tuple[float, float] | None = None,
    combine: str = "mean",
) -> None:
    """Score the files ``pending`` (row index, its crops: N x side x side x 3 uint8, N alike for all) in one
    batch, normalised as ``preprocess`` says: a file's logit ``combine``s its crops' logits
    (``scores.combine_logits``), its probability is ``sigmoid(logit / temperature)``, its label ``label_of``."""
    crops = torch.stack([images for _, images in pending])
    normalized = normalize_batch(crops.flatten(0, 1).to(device), mean=preprocess.mean, std=preprocess.std)
    logits = model(normalized).float().cpu().view(crops.shape[:2])
    probabilities = apply_temperature(combine_logits(logits.T, combine), temperature).tolist()
    for (index, _), probability in zip(pending, probabilities, strict=True):
        rows[index]["prob_fake"] = f"{probability:.6f}"
        rows[index]["label"] = label_of(probability, unsure)


def label_of(probability: float, unsure: tuple[float, float] | None) -> str:
    """``unsure`` where ``probability`` lies in the band ``unsure`` (LO <= p <= HI), else fake at 0.5 or above."""
    if unsure is not None and unsure[0] <= probability <= unsure[1]:
        return "unsure"
    return "fake" if probability >= 0.5 else "real"
