"""``aidetect bench cv``: wall time of K folds as one parallel job array against one fold alone.

Both go through ``aidetect submit`` on a cluster profile, from submission to the last job's end.
``cv_time_ratio`` = K folds / one fold: K when folds run one after another, K / (folds running at once)
at best (2.5 for 5 folds on the 2-CPU local test cluster).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from aidetect.bench.data import machine
from aidetect.cluster.profiles import Profile
from aidetect.cluster.submit import submit_cv, submit_train, wait
from aidetect.config import Config
from aidetect.errors import UserError
from aidetect.fileio import atomic_write_json


def timed(submit: Any) -> float:
    started = time.perf_counter()
    if not wait(submit(), poll_s=1.0):
        raise UserError("a benchmark job failed; see its log (aidetect status RUN)")
    return time.perf_counter() - started


def bench_cv(config: Config, profile: Profile, folds: int, out: Path, json_path: str | None = None) -> dict[str, Any]:
    one_config = replace(
        config, train=replace(config.train, out=str(out / "one_fold")), data=replace(config.data, fold=0)
    )
    cv_config = replace(config, train=replace(config.train, out=str(out / "cv")))
    one = timed(lambda: submit_train(one_config, profile, 1, 1))
    all_folds = timed(lambda: submit_cv(cv_config, profile, folds, 1, 1))
    results = {
        "profile": profile.name,
        "folds": folds,
        "one_fold_s": one,
        "all_folds_s": all_folds,
        "cv_time_ratio": all_folds / one,
        "sequential_ratio": float(folds),
        "machine": machine(),
    }
    if json_path:
        atomic_write_json(json_path, results)
    return results
