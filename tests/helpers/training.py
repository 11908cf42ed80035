"""Small training runs on the tiny pack, and what a run leaves behind: its weights."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import torch

from aidetect.checkpoint import load_checkpoint
from helpers.commands import run_cli

BASE = [
    "--model",
    "seed_cnn1",
    "--epochs",
    "3",
    "--lr",
    "0.001",
    "--precision",
    "fp32",
    "--set",
    "data.workers=1",
    "--set",
    "data.noise_std=0.05",
    "--set",
    "schedule.name=cosine",
    "--set",
    "train.log_every=1",
]


# Blur and JPEG on about half the training images: their per-sample draws must keep runs exact too.
AUGMENTED = ["--set", "data.blur_prob=0.5", "--set", "data.jpeg_prob=0.5"]


def train_args(pack: Path, out: Path, *extra: str) -> list[str]:
    """``train`` on ``pack`` into ``out`` with the BASE options, then ``extra`` (later options win)."""
    return ["train", "--data", str(pack), "--out", str(out), *BASE, *extra]


def weights(run: Path, name: str = "last.pt") -> dict[str, torch.Tensor]:
    """The model weights of the checkpoint ``name`` in the run folder ``run``."""
    return load_checkpoint(run / name).model


def kill_and_resume(pack: Path, tmp_path: Path, args: list[str]) -> tuple[subprocess.CompletedProcess, list[str]]:
    """A reference run, and the same run SIGKILLed in the middle of its second epoch and resumed with
    ``--resume auto``; returns the reference's result and the keys of the weights that differ."""
    reference = run_cli(*train_args(pack, tmp_path / "reference", *args))
    assert reference.returncode == 0, reference.stderr[-2000:]
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "aidetect.cli", *train_args(pack, out, *args)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in process.stdout:  # kill -9 in the middle of the second epoch
        if "epoch 2 batch 3/" in line:
            process.kill()
            break
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert load_checkpoint(out / "last.pt").state.epoch == 1
    resumed = run_cli(*train_args(pack, out, *args, "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = weights(tmp_path / "reference"), weights(out)
    return reference, [key for key in a if not torch.equal(a[key], b[key])]
