"""Shared fixtures (one small synthetic dataset with every defect, packed once per test session) and the
markers of tests that need more than this machine:

- ``slurm``: needs the local SLURM test cluster (``sudo bash hpc/local_cluster/start.sh --nodes 3``);
- ``multinode``: needs that cluster with 2 or more nodes (hosts of their own);
- ``gpu``: needs a CUDA GPU; tests/test_gpu.py skips those itself, each with its reason.

Whether the cluster answers is decided once per session (``sinfo``, at most 15 s) and only when a selected
test is marked ``slurm`` or ``multinode``. Where it does not answer, or has fewer than 2 nodes for a
``multinode`` test, those tests SKIP with the reason, so that ``pytest -m "not slurm and not multinode and not
gpu"`` and a plain ``pytest`` both work on a machine without a cluster. Under CI (the environment variable
``CI`` set to anything but "", "0" or "false", as CI services and .ci/run set it) they FAIL with the same
reason instead: CI starts the cluster before pytest, and a cluster that died or never came up must not turn
its tests into silent skips.

Shared helpers live in tests/helpers/ (imported as ``helpers.*``; asserts in them are rewritten as in tests).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
pytest.register_assert_rewrite("helpers")  # before the first import of a helper

from helpers.slurm import START, cluster_nodes, unanswered  # noqa: E402

from aidetect.allocator import keep_freed_memory  # noqa: E402
from aidetect.data.pack import PackSettings, pack  # noqa: E402
from aidetect.data.synth import synth  # noqa: E402

SYNTH_N = 48
SHARD_SIZE = 6
CLUSTER_MARKERS = ("slurm", "multinode")


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


@pytest.fixture
def nodes() -> list[str]:
    """The cluster's node names, at the time the test starts (``multinode`` made sure there are 2 or more)."""
    return cluster_nodes()


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


@functools.cache
def cluster_missing(multinode: bool) -> str | None:
    """Why the cluster cannot run a ``slurm`` test (``multinode``: a ``multinode`` one), in one line; None when
    it can. Decided once per session and kind: ``sinfo`` at most once."""
    reason = cluster_missing(False) if multinode else unanswered()
    if reason or not multinode:
        return reason
    names = cluster_nodes()
    if len(names) >= 2:
        return None
    return (
        f"cross-host tests need a cluster of 2 or more nodes, this one has {len(names)} ({', '.join(names)}): {START}"
    )


def pytest_configure(config: pytest.Config) -> None:
    """In-process training in tests starts as every aidetect command does: glibc keeps freed memory."""
    keep_freed_memory()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """A ``slurm`` or ``multinode`` test the cluster cannot run skips (fails under CI), before its fixtures."""
    marks = {marker.name for marker in item.iter_markers() if marker.name in CLUSTER_MARKERS}
    reason = cluster_missing("multinode" in marks) if marks else None
    if reason and in_ci():
        pytest.fail(f"{reason} (CI is set: a cluster test must not skip)", pytrace=False)
    if reason:
        pytest.skip(reason)
