"""Per-image scores of an evaluation: ``scores_SPLIT.parquet`` (or ``.csv``), one row per image, with what
is needed to recompute and compare the results elsewhere.

Columns (``SCHEMA``), one row per image of the split, each image exactly once, sorted by key:
``key`` (the pack's sample key), ``path`` (the original file's path, relative to the folder the pack was
made from: ``source_root`` below), ``source``, ``label`` (1 = fake), ``logit`` (the model's raw output),
``prob_fake`` (the calibrated probability sigmoid(logit / T), T the checkpoint's temperature, 1 without
one: ``calibration.apply_temperature``) and ``crop_logits`` (each crop's logit when the evaluation
combined several crops; null otherwise).

File-level metadata (``scores_metadata``): the format tag, the split, the checkpoint's path and sha256,
the pack's path, its manifest's sha256 and source root, the model name, the preprocessing (the pack's
settings, the crop, the normalisation's mean and std), the temperature, the validation threshold, and
the crops per image and how their logits were combined (``over_crops``).
In parquet it is the schema's ``aidetect`` metadata (JSON); a CSV file starts with one line ``# JSON``.
Files are written atomically.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import torch
from torch.nn import functional as F

from aidetect.calibration import apply_temperature
from aidetect.checkpoint import Checkpoint
from aidetect.data.integrity import sha256_file
from aidetect.data.manifest import read_manifest
from aidetect.data.packformat import MANIFEST
from aidetect.data.shardfile import keyed_records
from aidetect.errors import UserError
from aidetect.fileio import replaced_atomically
from aidetect.metrics import Predictions
from aidetect.models import preprocess_of

FORMAT = "aidetect-scores/1"
FORMATS = ("parquet", "csv")
COMBINE = ("mean", "max")  # how an image's crop logits become its logit
METADATA_KEY = b"aidetect"
SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("path", pa.string()),
        ("source", pa.string()),
        ("label", pa.int8()),
        ("logit", pa.float64()),
        ("prob_fake", pa.float64()),
        ("crop_logits", pa.list_(pa.float64())),
    ]
)


def preprocessing(checkpoint: Checkpoint) -> dict[str, Any]:
    """How the model's inputs are made: the pack's settings and the crop (the checkpoint's), and the mean and
    std the loader normalises [0, 1] pixels with for its model (``models.preprocess_of``)."""
    model = checkpoint.config.model
    normalisation = preprocess_of(model.name, model.input_size)
    return checkpoint.preprocess | {"mean": list(normalisation.mean), "std": list(normalisation.std)}


def checkpoint_facts(checkpoint_path: str | Path, checkpoint: Checkpoint) -> dict[str, Any]:
    """What identifies ``checkpoint`` (stored at ``checkpoint_path``) and how its inputs and outputs are read:
    its path and sha256, the model name, the preprocessing, the temperature and the validation threshold
    (on sigmoid(logit); None for checkpoints made before thresholds were chosen)."""
    return {
        "checkpoint": str(checkpoint_path),
        "checkpoint_sha256": sha256_file(checkpoint_path),
        "model": checkpoint.config.model.name,
        "preprocess": preprocessing(checkpoint),
        "temperature": checkpoint.temperature,
        "threshold": checkpoint.state.best.get("threshold"),
    }


def scores_metadata(checkpoint_path: str | Path, checkpoint: Checkpoint, data: str | Path, split: str) -> dict:
    """The file-level metadata of the scores of ``checkpoint`` (stored at ``checkpoint_path``) on ``split`` of
    pack ``data``: what identifies the weights, the pack and the preprocessing."""
    return {
        "format": FORMAT,
        "split": split,
        **checkpoint_facts(checkpoint_path, checkpoint),
        "pack": str(data),
        "manifest_sha256": sha256_file(Path(data) / MANIFEST),
        "source_root": read_manifest(data)["source"]["path"],
    }


def source_paths(data: str | Path, splits: list[str]) -> dict[str, str]:
    """Sample key -> the original file's path (relative to the pack's source root) of every sample of
    ``splits`` of pack ``data``, from the samples' records."""
    entries = [e for e in read_manifest(data)["shards"] if e["split"] in splits and e["count"]]
    return {key: record["path"] for e in entries for key, record in keyed_records(str(Path(data) / e["name"])).items()}


def scores_table(
    predictions: Predictions, paths: dict[str, str], metadata: dict, crop_logits: list[list[float]] | None = None
) -> pa.Table:
    """One row per image of the gathered ``predictions`` (``SCHEMA``), sorted by key, with ``metadata``;
    ``crop_logits``: each image's crop logits, in the order of ``predictions``. ``ValueError`` when a key
    appears twice: every image is scored once."""
    if len(set(predictions.keys)) != len(predictions.keys):
        raise ValueError("an image was scored more than once")
    order = sorted(range(len(predictions.keys)), key=predictions.keys.__getitem__)
    probabilities = apply_temperature(predictions.logits, metadata["temperature"]).tolist()
    columns = {
        "key": predictions.keys,
        "path": [paths[key] for key in predictions.keys],
        "source": predictions.sources,
        "label": predictions.labels,
        "logit": predictions.logits,
        "prob_fake": probabilities,
        "crop_logits": crop_logits or [None] * len(order),
    }
    table = pa.table({name: [values[i] for i in order] for name, values in columns.items()}, schema=SCHEMA)
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata)})


def write_scores(folder: Path, table: pa.Table, file_format: str = "parquet") -> Path:
    """Write ``table`` atomically to FOLDER/scores_SPLIT.FORMAT (SPLIT from its metadata); returns the path."""
    if file_format not in FORMATS:
        raise UserError(f"scores format {file_format!r} is unknown; choose one of {', '.join(FORMATS)}")
    path = Path(folder) / f"scores_{scores_metadata_of(table)['split']}.{file_format}"
    with replaced_atomically(path) as tmp:
        if file_format == "parquet":
            pq.write_table(table, tmp)
        else:
            tmp.write_bytes(csv_bytes(table))
    return path


def csv_bytes(table: pa.Table) -> bytes:
    """``table`` as CSV after a ``# METADATA_JSON`` line; ``crop_logits`` as a JSON list (empty: null)."""
    crops = [json.dumps(c) if c is not None else None for c in table.column("crop_logits").to_pylist()]
    flat = table.set_column(table.schema.get_field_index("crop_logits"), "crop_logits", pa.array(crops, pa.string()))
    buffer = io.BytesIO()
    pa_csv.write_csv(flat, buffer)
    return b"# " + table.schema.metadata[METADATA_KEY] + b"\n" + buffer.getvalue()


def read_scores(path: str | Path) -> pa.Table:
    """The table ``write_scores`` wrote at ``path`` (parquet or CSV, by its suffix), of ``SCHEMA``, with its
    metadata (``scores_metadata_of``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: scores file not found")
    if path.suffix != ".csv":
        return pq.read_table(path)
    header, _, body = path.read_bytes().partition(b"\n")
    types = {field.name: field.type for field in SCHEMA} | {"crop_logits": pa.string()}
    table = pa_csv.read_csv(io.BytesIO(body), convert_options=pa_csv.ConvertOptions(column_types=types))
    crops = [json.loads(c) if c else None for c in table.column("crop_logits").to_pylist()]
    table = table.set_column(len(SCHEMA) - 1, "crop_logits", pa.array(crops, SCHEMA.field("crop_logits").type))
    return table.replace_schema_metadata({METADATA_KEY: header.removeprefix(b"# ")})


def scores_metadata_of(table: pa.Table) -> dict[str, Any]:
    """The file-level metadata of a scores table (``scores_metadata``)."""
    return json.loads(table.schema.metadata[METADATA_KEY])


def save_scores(
    folder: Path,
    predictions: Predictions,
    checkpoint_path: str | Path,
    checkpoint: Checkpoint,
    data: str | Path,
    splits: list[str],
    split: str,
    file_format: str = "parquet",
    crop_logits: list[list[float]] | None = None,
    combine: str | None = None,
) -> Path:
    """Write the per-image scores of ``checkpoint`` on ``split`` (which reads ``splits`` of pack ``data``) from
    the gathered ``predictions`` to ``folder``; returns the file's path. Call it on one rank. ``crop_logits``
    and ``combine``: each image's crop logits and how they were combined (``over_crops``), when several."""
    metadata = scores_metadata(checkpoint_path, checkpoint, data, split)
    metadata |= {"crops": len(crop_logits[0]) if crop_logits else 1, "combine": combine if crop_logits else None}
    table = scores_table(predictions, source_paths(data, splits), metadata, crop_logits)
    return write_scores(folder, table, file_format)


def check_crops(crops: int, combine: str) -> None:
    """``UserError`` unless ``crops`` is at least 1 and ``combine`` one of ``COMBINE``."""
    if crops < 1:
        raise UserError(f"--crops {crops}: at least 1")
    if combine not in COMBINE:
        raise UserError(f"--combine {combine!r}: one of {', '.join(COMBINE)}")


def over_crops(
    evaluate_with: Callable[[Any, tuple[int, int]], Predictions], degrade: Any, crops: int, combine: str
) -> tuple[Predictions, list[list[float]] | None]:
    """(predictions, each image's crop logits or None for one crop) of ``evaluate_with(degrade, tile)`` over
    ``crops`` tiles (K, crops) of every image, combined (``combine_crops``)."""
    if crops == 1:
        return evaluate_with(degrade, (0, 1)), None
    passes = [evaluate_with(degrade, (k, crops)) for k in range(crops)]
    return combine_crops(passes, combine), [list(logits) for logits in zip(*(p.logits for p in passes), strict=True)]


def combine_crops(passes: list[Predictions], combine: str) -> Predictions:
    """One prediction per image from the gathered predictions of each crop (``passes``, the images in the
    same order: each pass reads the split with the same plan): the mean or the max of its crop logits, in
    float32 as the evaluation computes, its probability and loss from that logit."""
    first = passes[0]
    if any(p.keys != first.keys for p in passes):
        raise ValueError("the crops' evaluations read the images in different orders")
    logits = combine_logits(torch.tensor([p.logits for p in passes], dtype=torch.float32), combine)
    loss = F.binary_cross_entropy_with_logits(logits, torch.tensor(first.labels, dtype=torch.float32), reduction="sum")
    return Predictions(
        probabilities=torch.sigmoid(logits).tolist(),
        labels=first.labels,
        keys=first.keys,
        sources=first.sources,
        logits=logits.tolist(),
        loss_sum=loss.item(),
    )


def combine_logits(stacked: torch.Tensor, combine: str) -> torch.Tensor:
    """Each image's logit from its crops' logits ``stacked`` (crops x images, float32): their mean, or their
    max with ``combine`` "max"; what ``evaluate --crops`` and ``predict --crops`` alike compute."""
    return stacked.mean(0) if combine == "mean" else stacked.amax(0)
