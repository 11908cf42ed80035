"""Checkpoints: everything needed to continue a run exactly, written atomically, loaded safely.

``Checkpoint`` is the schema and this module the one place that writes and reads it: ``save_checkpoint``
turns one into the plain dict that ``torch.save`` stores, ``load_checkpoint`` checks such a dict and turns
it back. A checkpoint holds the model, optimizer, scheduler and GradScaler states, the position (epoch and
batches done in it; the loader is a pure function of (seed, epoch), so the position is all it needs), the
RNG states of every rank, the best metric so far, the resolved config, the pack's preprocessing and the
wandb run id. It is loaded with ``torch.load(weights_only=True)``: no pickled code runs.

Versions: the stored ``format`` marker is ``aidetect-checkpoint/VERSION``. ``load_checkpoint`` reads its
own version and older ones (stored keys it does not know, such as the ``world`` that early version 1
files hold, are ignored) and refuses a newer one with a one-line ``UserError``.
"""

from __future__ import annotations

import dataclasses
import io
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aidetect.config import Config, build, to_dict
from aidetect.errors import UserError, first_line
from aidetect.fileio import atomic_write_bytes

VERSION = 1
MARKER = "aidetect-checkpoint/"


@dataclass
class RunState:
    """Where the run is: saved in every checkpoint."""

    epoch: int = 0  # epoch in progress (or next to start)
    batch: int = 0  # global batches of that epoch already done (the same count on every rank)
    step: int = 0  # optimiser steps so far
    best: dict[str, Any] = field(default_factory=dict)  # {"metric", "value", "epoch", "loss", "threshold"}
    history: list[dict] = field(default_factory=list)
    # The epoch is trained and its validation pending (stopped during it): {"train_loss", "img_per_s"}.
    pending: dict[str, float] | None = None


@dataclass
class Checkpoint:
    """One saved run: ``last.pt`` (to continue it) or ``best.pt`` (its best epoch). Every field but
    ``version`` and those in ``OPTIONAL`` is required in the file."""

    model: dict[str, torch.Tensor]  # the plain model's weights (no DDP or torch.compile prefixes)
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any]  # empty unless the run is fp16
    state: RunState
    rng: list[dict[str, Any]]  # every rank's RNG states (rng_state), by rank: one per process that saved it
    config: Config  # the run's resolved config
    preprocess: dict[str, Any]  # how inputs are made: the pack's settings (PackSettings fields) and "crop"
    wandb_id: str | None
    temperature: float | None = None  # fitted on the validation fold for best.pt (calibration); older files: None
    version: int = VERSION  # the schema: stored in the marker, newer ones refused
    weights_sha256: str | None = None  # of the pretrained weights file the run started from (None: none)


PARTS = tuple(f.name for f in dataclasses.fields(Checkpoint) if f.name != "version")
# Fields added after version 1 files were written: optional in the file (their default when missing).
OPTIONAL = ("weights_sha256", "temperature")


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` to ``path`` atomically, as the dict of plain types that ``load_checkpoint`` reads."""
    stored = {name: getattr(checkpoint, name) for name in PARTS}
    stored |= {"state": dataclasses.asdict(checkpoint.state), "config": to_dict(checkpoint.config)}
    buffer = io.BytesIO()
    torch.save({"format": f"{MARKER}{checkpoint.version}", **stored}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | Path) -> Checkpoint:
    """The checkpoint at ``path``; a one-line ``UserError`` naming the file when it is missing, unreadable,
    no aidetect checkpoint, of a newer version than this code reads, or lacks one of ``PARTS``."""
    path = Path(path)
    stored = read_stored(path)
    version = stored_version(path, stored)
    missing = [name for name in PARTS if name not in stored and name not in OPTIONAL]
    if missing:
        raise UserError(f"{path}: incomplete checkpoint, no {', '.join(missing)}")
    try:
        state, config = RunState(**stored["state"]), build(Config, stored["config"], "")
    except (TypeError, UserError) as exc:
        raise UserError(f"{path}: checkpoint with an unreadable state or config ({first_line(exc)})") from None
    parts = {name: stored[name] for name in PARTS if name in stored} | {"state": state, "config": config}
    return Checkpoint(**parts, version=version)


def read_stored(path: Path) -> Any:
    """What ``torch.save`` stored at ``path``, loaded with ``weights_only``."""
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, ...: all mean "not a usable checkpoint"
        reason = first_line(exc)[:160]
        raise UserError(f"{path}: not a readable checkpoint (truncated or foreign file: {reason})") from None


def stored_version(path: Path, stored: Any) -> int:
    """The schema version in the stored marker; ``UserError`` without one or when it is newer than ``VERSION``."""
    marker = stored.get("format") if isinstance(stored, dict) else None
    version = marker.removeprefix(MARKER) if isinstance(marker, str) and marker.startswith(MARKER) else ""
    if not version.isdigit():
        raise UserError(f"{path}: not an aidetect checkpoint (no {MARKER + 'N'!r} marker)")
    if int(version) > VERSION:
        raise UserError(
            f"{path}: checkpoint version {version} is newer than this aidetect reads ({VERSION}): upgrade it"
        )
    return int(version)


def rng_state() -> dict[str, Any]:
    """This process's RNG states, in types that ``weights_only`` loading accepts."""
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
