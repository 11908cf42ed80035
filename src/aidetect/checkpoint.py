"""Checkpoints: everything needed to continue a run exactly, written atomically, loaded safely.

A checkpoint holds the model, optimizer, scheduler and GradScaler states, the position (epoch and
batches done in it; the loader is a pure function of (seed, epoch), so the position is all it needs),
the RNG states of every rank, the best metric so far, the resolved config, the pack's preprocessing
and the wandb run id. It is loaded with ``torch.load(weights_only=True)``: no pickled code runs.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aidetect.errors import UserError, first_line
from aidetect.fileio import atomic_write_bytes

FORMAT = "aidetect-checkpoint/1"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, ...: all mean "not a usable checkpoint"
        reason = first_line(exc)[:160]
        raise UserError(f"{path}: not a readable checkpoint (truncated or foreign file: {reason})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path}: not an aidetect checkpoint (no {FORMAT!r} marker)")
    return state


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
