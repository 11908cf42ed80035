"""Shared fixtures: one small synthetic dataset with every defect, packed once per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")

from aidetect.data.pack import PackSettings, pack
from aidetect.data.synth import synth

SYNTH_N = 48
SHARD_SIZE = 6


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "raw"
    synth(out, n=SYNTH_N, seed=3, defects=True, workers=2, min_side=256, max_side=640)
    return out


@pytest.fixture(scope="session")
def packed_dir(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "shards"
    pack(synth_dir, out, PackSettings(shard_size=SHARD_SIZE), workers=2, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small native crops for fast training tests (period-2 traces survive 32 px crops)."""
    root = tmp_path_factory.mktemp("tiny")
    synth(root / "raw", n=120, seed=5, defects=True, workers=2, min_side=64, max_side=128)
    pack(root / "raw", root / "shards", PackSettings(mode="crop", size=32, shard_size=16), workers=2, progress=False)
    return root / "shards"


def run_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """Run the installed command line as a user would, in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "aidetect.cli", *args], capture_output=True, text=True, timeout=600, **kwargs
    )
