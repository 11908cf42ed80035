"""One seeded, stratified assignment of every sample to ``test`` or one of K folds.

Samples are stratified by group, (class, source): every source (a generator, a photo site) is in the
test split and in every fold in proportion. The order within a group is a keyed hash of (seed,
relative path): it depends on neither the file-system listing order nor the number of workers, and
adding a file never moves the others' relative order. Every later run, fold and model reads the same
assignment from the manifest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any


def hash_order_key(seed: int, relpath: str) -> str:
    return hashlib.sha256(f"{seed}\0{relpath}".encode()).hexdigest()


def assign_splits(
    paths_by_group: dict[Any, Iterable[str]],
    *,
    seed: int,
    test_fraction: float,
    folds: int,
    fixed_test: set[str] | None = None,
) -> dict[str, str]:
    """Map each relative path to ``"test"`` or ``"fold{k}"``, stratified by group (sortable keys such as
    (class, source); a group's share of the test split is rounded on its own).

    ``fixed_test``: paths of a source's own test split (the Kaggle layout); when given, exactly those
    are ``test`` and ``test_fraction`` is not used.
    """
    if folds < 1:
        raise ValueError("folds must be at least 1")
    assignment: dict[str, str] = {}
    next_fold = 0  # carried across groups so that fold sizes differ by at most one overall
    for group in sorted(paths_by_group):
        ordered = sorted(paths_by_group[group], key=lambda p: hash_order_key(seed, p))
        if fixed_test is not None:
            test = [p for p in ordered if p in fixed_test]
            rest = [p for p in ordered if p not in fixed_test]
        else:
            n_test = round(test_fraction * len(ordered))
            test, rest = ordered[:n_test], ordered[n_test:]
        assignment.update(dict.fromkeys(test, "test"))
        for path in rest:
            assignment[path] = f"fold{next_fold}"
            next_fold = (next_fold + 1) % folds
    return assignment


def split_names(folds: int) -> list[str]:
    return ["test"] + [f"fold{k}" for k in range(folds)]
