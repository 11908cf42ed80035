"""A pack as its manifest describes it: the manifest, what a run reads of it (splits, folds, a choice of
fake sources: held out, or by release date), the samples' records, and every shard checked against it.

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


def run_splits(
    manifest: dict[str, Any],
    fold: int | None,
    holdout_source: str | None = None,
    train_sources: list[str] | None = None,
    test_sources: list[str] | None = None,
) -> dict[str, Selection]:
    """The ``train``, ``val`` and ``test`` selections of a run on the pack of ``manifest``: with ``fold``,
    cross-validation on it (``fold_splits``); without, training on every fold, fold 0 still reporting
    validation figures. A choice of fake sources (``sources_keep``): ``train_sources`` (None: all) are
    trained and validated on, ``test_sources`` (None: all) tested on, the test reading every split for a
    source never trained on. ``holdout_source`` S, leave-one-source-out, is training on every fake source
    but S and testing on S."""
    folds = manifest["settings"]["folds"]
    if fold is None:
        splits = {"train": [f"fold{k}" for k in range(folds)], "val": ["fold0"], "test": ["test"]}
    else:
        splits = fold_splits(folds, fold)
    if holdout_source:
        fakes = sorted(manifest.get("sources", {}).get("fake", {}))
        train_sources, test_sources = [s for s in fakes if s != holdout_source], [holdout_source]
    if train_sources is None and test_sources is None:
        return {name: Selection(chosen) for name, chosen in splits.items()}
    splits["test"] = list(manifest["splits"])
    train, test = as_set(train_sources), as_set(test_sources)
    return {name: Selection(chosen, sources_keep(train, test, name == "test")) for name, chosen in splits.items()}


def as_set(names: list[str] | None) -> frozenset[str] | None:
    return None if names is None else frozenset(names)


def fold_splits(folds: int, val_fold: int) -> dict[str, list[str]]:
    """Cross-validation splits: train on every fold but ``val_fold``, validate on it, test on ``test``."""
    if not 0 <= val_fold < folds:
        raise UserError(f"fold {val_fold} does not exist: the pack has folds 0..{folds - 1}")
    return {
        "train": [f"fold{k}" for k in range(folds) if k != val_fold],
        "val": [f"fold{val_fold}"],
        "test": ["test"],
    }


def sources_keep(train: frozenset[str] | None, test: frozenset[str] | None, for_test: bool) -> Keep:
    """A choice of fake sources as a ``keep`` predicate (None: every source). Training and validation keep
    every real sample and the fakes of ``train``; the test keeps the real samples of the test split and the
    fakes of ``test``: from the test split for a source in ``train``, from every split for one never
    trained on."""
    if not for_test:
        return lambda r: r["class"] != "fake" or train is None or r["source"] in train

    def keep(r: dict[str, Any]) -> bool:
        if r["class"] != "fake":
            return r["split"] == "test"
        if test is not None and r["source"] not in test:
            return False
        return r["split"] == "test" or (train is not None and r["source"] not in train)

    return keep


def check_holdout(shard_dir: str | Path, source: str) -> None:
    """``UserError`` unless ``source`` is a fake source of the pack."""
    check_sources(shard_dir, [source], "holdout source")


def check_sources(shard_dir: str | Path, sources: list[str], what: str) -> None:
    """``UserError`` naming ``what`` unless every one of ``sources`` is a fake source of the pack."""
    fakes = fake_sources(shard_dir)
    unknown = [source for source in sources if source not in fakes]
    if unknown:
        listed = ", ".join(fakes) or "none recorded (pack again to record sources)"
        raise UserError(
            f"{what} {', '.join(map(repr, unknown))}: no fake source of {shard_dir}; its fake sources: {listed}"
        )


# ----------------------------------------------------------------------------------------------------
# The chronological protocol


def source_dates(manifest: dict[str, Any]) -> dict[str, str]:
    """The release date (YYYY-MM-DD or YYYY-MM) of each source of the pack that has one."""
    return manifest.get("source_dates", {})


def time_windows(dates: dict[str, str], window: int) -> list[list[str]]:
    """The sources of ``dates`` from the oldest release to the newest (ties by name), in groups of
    ``window`` consecutive ones: window 0 the ``window`` oldest, ...; the last may hold fewer."""
    if window < 1:
        raise UserError(f"--window {window}: a window holds at least 1 generator")
    ordered = sorted(dates, key=lambda source: (dates[source], source))
    return [ordered[start : start + window] for start in range(0, len(ordered), window)]


def chrono_windows(shard_dir: str | Path, window: int) -> list[list[str]]:
    """``time_windows`` of the fake sources of the pack at ``shard_dir``; ``UserError`` when one has no
    release date or there are fewer than 2 windows (nothing to train on before a test)."""
    manifest = read_manifest(shard_dir)
    dates, fakes = source_dates(manifest), fake_sources(shard_dir)
    undated = [source for source in fakes if source not in dates]
    if undated:
        raise UserError(
            f"{shard_dir}: no release date for fake source {', '.join(undated)}; pack again with "
            "--source-dates FILE (YAML source: date) or a CSV list's date column"
        )
    windows = time_windows({source: dates[source] for source in fakes}, window)
    if len(windows) < 2:
        raise UserError(
            f"{shard_dir}: --window {window} makes {len(windows)} window of its {len(fakes)} fake sources; "
            "the chronological protocol needs 2 or more (a smaller --window)"
        )
    return windows


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
