"""A pack as its manifest describes it: the manifest, what a run reads of it (splits, folds, a held-out
source), the samples' records, and every shard checked against it.

Pack writes ``manifest.json`` last: every shard's split, sample count, size and sha256, every sample's
source per class and split, and the settings. Everything that chooses which shards and samples a
run or an evaluation reads works it out here, once.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from aidetect.data.integrity import ShardProblem, file_problem, manifest_problems
from aidetect.data.packformat import FORMAT, MANIFEST
from aidetect.data.shardfile import Shard, shard_records, tar_problem
from aidetect.errors import UserError

Keep = Callable[[dict[str, Any]], bool]  # a predicate on a sample's ``.json`` record: is it read?


@dataclass(frozen=True)
class Selection:
    """What one loader of a run reads: the samples of ``splits`` that ``keep`` accepts (None: all)."""

    splits: list[str]
    keep: Keep | None = None


def read_manifest(shard_dir: str | Path) -> dict[str, Any]:
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise UserError(f"{path}: not found; run 'aidetect pack SRC {shard_dir}' first")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc}); re-run pack") from None
    if manifest.get("format") != FORMAT:
        raise UserError(f"{path}: not an aidetect shard manifest (format {manifest.get('format')!r})")
    return manifest


def fake_sources(shard_dir: str | Path) -> list[str]:
    """The fake sources of the pack at ``shard_dir``, sorted; none for packs made before sources were recorded."""
    return sorted(read_manifest(shard_dir).get("sources", {}).get("fake", {}))


# ----------------------------------------------------------------------------------------------------
# What a run reads


def run_splits(manifest: dict[str, Any], fold: int | None, holdout_source: str | None) -> dict[str, Selection]:
    """The ``train``, ``val`` and ``test`` selections of a run on the pack of ``manifest``: with ``fold``,
    cross-validation on it (``fold_splits``); without, training on every fold, fold 0 still reporting
    validation figures. With ``holdout_source``, leave-one-source-out (``holdout_keep``): the held-out
    source's samples in the folds are test samples too, so the test reads every split."""
    folds = manifest["settings"]["folds"]
    if fold is None:
        splits = {"train": [f"fold{k}" for k in range(folds)], "val": ["fold0"], "test": ["test"]}
    else:
        splits = fold_splits(folds, fold)
    if not holdout_source:
        return {name: Selection(chosen) for name, chosen in splits.items()}
    splits["test"] = list(manifest["splits"])
    return {name: Selection(chosen, holdout_keep(holdout_source, name == "test")) for name, chosen in splits.items()}


def fold_splits(folds: int, val_fold: int) -> dict[str, list[str]]:
    """Cross-validation splits: train on every fold but ``val_fold``, validate on it, test on ``test``."""
    if not 0 <= val_fold < folds:
        raise UserError(f"fold {val_fold} does not exist: the pack has folds 0..{folds - 1}")
    return {
        "train": [f"fold{k}" for k in range(folds) if k != val_fold],
        "val": [f"fold{val_fold}"],
        "test": ["test"],
    }


def holdout_keep(source: str, test: bool) -> Keep:
    """Leave-one-source-out selection (a ``keep`` predicate): training and validation keep every sample but
    fake source ``source``'s; the test keeps the real samples of the test split and every fake sample of
    ``source``, from all splits (none of it was trained on)."""
    if test:
        return lambda r: r["source"] == source if r["class"] == "fake" else r["split"] == "test"
    return lambda r: r["class"] != "fake" or r["source"] != source


def check_holdout(shard_dir: str | Path, source: str) -> None:
    """``UserError`` unless ``source`` is a fake source of the pack."""
    fakes = fake_sources(shard_dir)
    if source not in fakes:
        listed = ", ".join(fakes) or "none recorded (pack again to record sources)"
        raise UserError(f"holdout source {source!r} is no fake source of {shard_dir}; its fake sources: {listed}")


def select_shards(shard_dir: str | Path, splits: list[str], keep: Keep | None = None) -> list[Shard]:
    """The shards of ``splits`` (each checked by size against the manifest); with ``keep``, a predicate on
    a sample's ``.json`` record, only the samples it accepts (shards left empty are dropped)."""
    manifest = read_manifest(shard_dir)
    unknown = sorted(set(splits) - set(manifest["splits"]))
    if unknown:
        raise UserError(f"{shard_dir}: no split {', '.join(unknown)}; it has {', '.join(manifest['splits'])}")
    shards = []
    for entry in manifest["shards"]:
        path = Path(shard_dir) / entry["name"]
        if entry["split"] in splits and entry["count"] > 0:
            problem = file_problem(path, entry["bytes"])  # a stat: a truncated copy fails here, before any work
            if problem:
                raise problem.error()
            shards.append(Shard(str(path), entry["count"], entry["bytes"], entry["sha256"]))
    if keep is not None:
        shards = [replace(s, keep=tuple(i for i, r in enumerate(shard_records(s.path)) if keep(r))) for s in shards]
    return [s for s in shards if s.count]


# ----------------------------------------------------------------------------------------------------
# Records and checks of the whole pack


def sample_records(shard_dir: str | Path) -> list[dict[str, Any]]:
    """Every sample's ``.json`` record (path, class, source, split, file facts) in the pack, in shard order."""
    entries = read_manifest(shard_dir)["shards"]
    return [r for entry in entries for r in shard_records(str(Path(shard_dir) / entry["name"]))]


def verify_shards(shard_dir: str | Path, workers: int = 4) -> list[ShardProblem]:
    """Every shard the manifest of ``shard_dir`` lists, checked against it: present, its size, its sha256;
    and, when they match, readable as a shard of ours: every member header intact, every record JSON.

    Returns the damaged shards, in manifest order (empty when the pack is intact); ``str()`` of each is a
    line naming the file and how to restore it. Reads every shard once, ``workers`` at a time. Raises
    ``UserError`` when the folder holds no readable manifest.
    """
    return manifest_problems(shard_dir, read_manifest(shard_dir)["shards"], workers, readable=tar_problem)
